"""Peak extra memory of one call: the most bytes held by tensors at any moment, minus what was held before; and
how a call that failed (out of memory or otherwise) is reported.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() - memory_allocated()``: tensor bytes
  from the caching allocator, the allocator's cache excluded.
- CPU: the PyTorch profiler with ``profile_memory=True``: c10's CPU allocator reports every allocation and free
  with the running total of allocated bytes; the peak of that total minus its value before the first event is the
  CPU twin of the CUDA figure (temporaries inside an op and ``torch.compile``'d buffers included, the inputs not).
  Why not process RSS: ``docs/benchmarks.md``, "How memory is measured".
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (the profiler's C++ start/stop lines) for the duration; Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _walk(nodes) -> Iterator:
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def peak_extra_bytes(fn: Callable[[], object], *, device: torch.device) -> tuple[int | None, str]:
    """``(bytes, method)``: the peak extra tensor memory of one ``fn()`` call, or ``(None, why not)``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - before, 0), "torch.cuda.max_memory_allocated delta"
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> tuple[int | None, str]:
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as err:  # pragma: no cover - depends on the torch build
        return None, f"profiler unavailable ({err})"
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
        allocations = [n for n in _walk(tree) if n.tag == _EventType.Allocation]
    except AttributeError as err:  # pragma: no cover - private profiler API moved
        return None, f"profiler memory events unavailable ({err})"
    method = "CPU allocator total via torch.profiler(profile_memory=True)"
    if not allocations:
        return 0, method
    allocations.sort(key=lambda n: n.start_time_ns)
    first = allocations[0].extra_fields
    base = first.total_allocated - first.alloc_size
    peak = max(n.extra_fields.total_allocated for n in allocations)
    return max(peak - base, 0), method


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def short_error(err: BaseException) -> str:
    """``"Type: first line of the message"``, at most 300 characters: the ``reason`` of a row that failed."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def release(device: torch.device) -> None:
    """After a measurement or a failed call, on CUDA: collect reference cycles and hand cached blocks back, so the
    next implementation's peak and out-of-memory figures start from the same free memory. On CPU nothing: tensors
    go with their last reference, and a full ``gc.collect()`` per implementation (0.3 s with torch loaded) cost
    more than the short runs it served."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()

"""Wall time of repeated calls: median and the 20th/80th percentiles, in milliseconds.

- CUDA: one pair of CUDA events per call, the L2 cache flushed (a 256 MiB buffer zeroed) before each call so no
  call reads the previous call's data from cache; the same protocol as ``triton.testing.do_bench``, with counts
  instead of time budgets so ``--warmup``/``--reps`` mean the same on every device.
- CPU: ``time.perf_counter`` around each call after the warm-up calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Milliseconds per call: ``median`` and the spread ``p20``..``p80`` over ``reps`` calls."""

    median: float
    p20: float
    p80: float
    reps: int

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "p20": self.p20, "p80": self.p80, "reps": self.reps}


def summarize(samples_ms: list[float]) -> Timing:
    """Median and 20/80 % quantiles (linear interpolation) of per-call times."""
    if not samples_ms:
        raise ValueError("`samples_ms` must hold at least one time")
    t = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(median=float(q[0]), p20=float(q[1]), p80=float(q[2]), reps=len(samples_ms))


def time_calls(fn: Callable[[], object], *, device: torch.device, warmup: int, reps: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``reps`` times timed; return the summary."""
    if device.type == "cuda":
        return _time_cuda(fn, warmup=warmup, reps=reps)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def _time_cuda(fn: Callable[[], object], *, warmup: int, reps: int) -> Timing:
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    del flush
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])

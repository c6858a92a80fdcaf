"""Which implementation runs: the one place that decides, for every op with a Triton kernel.

Three kernel families, each with a fallback written in PyTorch:

==============  ======================================  =================  ==================================
``kind``        op                                      fallback           ``impl=`` values
==============  ======================================  =================  ==================================
``"logits"``    `token_logprobs`                         ``"chunked"``      auto, triton, chunked, reference
``"linear"``    `token_logprobs_from_hidden`             ``"chunked"``      auto, triton, chunked
``"tb_loss"``   `trajectory_balance_loss`'s sequence     ``"pytorch"``      auto, triton, pytorch
                terms
==============  ======================================  =================  ==================================

``impl="auto"`` picks the Triton kernels only where they are known to work:

1. CUDA tensors of a float dtype the kernels take (fp32, bf16, fp16), and triton importable (`triton_available`:
   the package's one check);
2. a kernel family that has run on a GPU (`GPU_VERIFIED`: a path that never ran on a GPU is never the CUDA
   default; ``impl="triton"`` opts in);
3. a launch configuration checked for the device (`flowloss.kernels.configs`: per target and dtype, compiled
   offline with its shared memory and spills bounded): none for an unchecked GPU, for fp32 on the fused lm_head
   without TF32, for the fused lm_head on ``sm_75``; and never on ROCm (compiled offline only, never run).

When 1 and 2 hold but 3 does not, ``"auto"`` takes the fallback with a one-time `FallbackWarning` that names the
reason and the ``impl=`` to pass; otherwise the fallback is silent (it is the documented default). ``impl="triton"``
raises instead, naming the argument or the reason. On CPU tensors it needs Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported, as the tests do), which has no hardware limits. The Triton
modules are imported on first use (by `flowloss.ops.library`), never at ``import flowloss``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import torch

from flowloss._validation import describe, require_choice

IMPLS: tuple[str, ...] = ("auto", "triton", "chunked", "reference")
LINEAR_IMPLS: tuple[str, ...] = ("auto", "triton", "chunked")
LOSS_IMPLS: tuple[str, ...] = ("auto", "triton", "pytorch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_FALLBACK = {"logits": "chunked", "linear": "chunked", "tb_loss": "pytorch"}
_OPS = {"logits": "token_logprobs", "linear": "token_logprobs_from_hidden", "tb_loss": "trajectory_balance_loss"}
_CHOICES = {"logits": IMPLS, "linear": LINEAR_IMPLS, "tb_loss": LOSS_IMPLS}

# Where each kernel family has run on a GPU (None: never). `impl="auto"` sends CUDA tensors only to families
# with an entry; the others run on request (`impl="triton"`) until a device run confirms them.
GPU_VERIFIED: dict[str, str | None] = {
    "logits": "NVIDIA H200 (sm_90), 2026-11-30: tests and benchmark (docs/kernels.md)",
    "linear": None,
    "tb_loss": None,
}


class FallbackWarning(UserWarning):
    """``impl="auto"`` would have run a Triton kernel but has no checked configuration for this device or dtype,
    and runs the PyTorch fallback instead (issued once per reason and process)."""


_WARNED: set[tuple[str, str]] = set()


def interpreter_on() -> bool:
    """Whether Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available(kind: str = "logits") -> bool:
    """Whether triton can be imported: the package's one availability check (every family needs only triton;
    ``kind`` is accepted for the callers that name theirs)."""
    del kind
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_reason(tensors: Sequence[tuple[str, torch.Tensor | None]], *, cpu_ok: bool) -> str | None:
    """Why the Triton kernels cannot take these tensors (None when they can): a float dtype they do not take
    (reported first: no device can fix it), then a tensor off CUDA (unless ``cpu_ok``: the interpreter)."""
    present = [(name, t) for name, t in tensors if t is not None]
    for name, t in present:
        if t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            return f"`{name}` is {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    for name, t in present:
        if not (t.is_cuda or cpu_ok):
            return f"`{name}` is not a CUDA tensor ({describe(t)})"
    return None


def hardware_reason(kind: str, tensors: Sequence[tuple[str, torch.Tensor | None]], *, auto: bool) -> str | None:
    """Why ``kind``'s kernels have no checked launch configuration for these CUDA tensors' device and dtype (None
    when they have one). ``auto``: also refuse ROCm, where the kernels were compiled offline but never run.
    Reads device properties (cached), never device memory; imports the kernels (triton) on first use."""
    present = [t for _, t in tensors if t is not None]
    cuda = next((t for t in present if t.is_cuda), None)
    if cuda is None:
        return None
    from flowloss.kernels import configs

    info = configs.device_info(cuda.device)
    if info.target is None:
        return info.reason
    if auto and info.target.backend not in configs.AUTO_BACKENDS:
        return f"{info.description}: the kernels were compiled for {info.target.name} offline but never ran on ROCm"
    if kind == "linear":
        dtype = next((t.dtype for t in present if t.is_floating_point()), torch.float32)
        try:
            configs.linear_config(info.target, dtype, allow_tf32=configs.tf32_allowed())
        except configs.NoConfig as err:
            return f"{err} ({info.description})"
    return None


def _warn_once(kind: str, reason: str) -> None:
    if (kind, reason) in _WARNED:
        return
    _WARNED.add((kind, reason))
    fallback = _FALLBACK[kind]
    warnings.warn(
        f"flowloss: {_OPS[kind]} runs impl={fallback!r} instead of its Triton kernels: {reason}. Pass "
        f"impl={fallback!r} to choose it (and silence this warning), or impl='triton' to insist.",
        FallbackWarning,
        stacklevel=4,
    )


def choose(kind: str, impl: str, tensors: Sequence[tuple[str, torch.Tensor | None]]) -> str:
    """The implementation of ``kind`` that runs for ``impl`` on these ``(name, tensor)`` inputs.

    ``"auto"`` -> ``"triton"`` for CUDA tensors the kernels take when triton imports, the family is in
    `GPU_VERIFIED` and the device has a checked configuration (`hardware_reason`; a `FallbackWarning` once when
    that alone fails), else the fallback (``"chunked"`` / ``"pytorch"``). ``"triton"`` raises, naming the argument
    or the reason, when the kernels cannot take the inputs. Other values are returned as given.
    """
    require_choice("impl", impl, _CHOICES[kind])
    if impl != "auto" and impl != "triton":
        return impl
    fallback = _FALLBACK[kind]
    if impl == "auto":
        if GPU_VERIFIED[kind] is None or unsupported_reason(tensors, cpu_ok=False) is not None:
            return fallback
        if not triton_available(kind):
            return fallback
        reason = hardware_reason(kind, tensors, auto=True)
        if reason is not None:
            _warn_once(kind, reason)
            return fallback
        return "triton"
    reason = unsupported_reason(tensors, cpu_ok=interpreter_on())
    if reason is not None:
        hint = "TRITON_INTERPRET=1 for the interpreter, or " if "CUDA" in reason else ""
        raise (ValueError if "CUDA" in reason else TypeError)(
            f"`impl='triton'` cannot run {_OPS[kind]} here: {reason}; use {hint}impl={fallback!r}"
        )
    if not triton_available(kind):
        raise ImportError(f"`impl='triton'` needs triton (not importable here); use impl={fallback!r}")
    reason = hardware_reason(kind, tensors, auto=False)
    if reason is not None:
        raise ValueError(f"`impl='triton'` cannot run {_OPS[kind]} here: {reason}; use impl={fallback!r}")
    return impl


def resolve_impl(impl: str, x: torch.Tensor, *, kind: str = "logits", name: str = "logits") -> str:
    """`choose` for one input tensor (the log-prob ops' form)."""
    return choose(kind, impl, [(name, x)])

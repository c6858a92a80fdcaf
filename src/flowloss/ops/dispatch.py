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

``impl="auto"`` picks the Triton kernels only where they are known to work: CUDA tensors of a float dtype the
kernels take, triton importable, and a kernel family that has run on a GPU (`GPU_VERIFIED`: a path that never
ran on a GPU is never the CUDA default; ``impl="triton"`` opts in). Everything else takes the fallback.
``impl="triton"`` on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported, as the tests do). The Triton modules are imported on first use, never at ``import flowloss``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from flowloss._validation import describe, require_choice

IMPLS: tuple[str, ...] = ("auto", "triton", "chunked", "reference")
LINEAR_IMPLS: tuple[str, ...] = ("auto", "triton", "chunked")
LOSS_IMPLS: tuple[str, ...] = ("auto", "triton", "pytorch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_FALLBACK = {"logits": "chunked", "linear": "chunked", "tb_loss": "pytorch"}
_TRITON_MODULES = {
    "logits": "flowloss.ops.triton_logprobs",
    "linear": "flowloss.ops.triton_linear",
    "tb_loss": "flowloss.kernels.tb_loss",
}
_OPS = {"logits": "token_logprobs", "linear": "token_logprobs_from_hidden", "tb_loss": "trajectory_balance_loss"}

# Where each kernel family has run on a GPU (None: never). `impl="auto"` sends CUDA tensors only to families
# with an entry; the others run on request (`impl="triton"`) until a device run confirms them.
GPU_VERIFIED: dict[str, str | None] = {
    "logits": "NVIDIA H200 (sm_90), 2026-11-30: tests and benchmark (docs/kernels.md)",
    "linear": None,
    "tb_loss": None,
}


def interpreter_on() -> bool:
    """Whether Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available(kind: str = "logits") -> bool:
    """Whether the Triton implementation of ``kind`` can be imported (triton installed, kernels compile-ready)."""
    try:
        triton_module(kind)
    except ImportError:
        return False
    return True


def triton_module(kind: str = "logits") -> ModuleType:
    """The module holding the Triton implementation of ``kind`` (imported on first use: it imports triton)."""
    if kind == "logits":
        from flowloss.ops import triton_logprobs

        return triton_logprobs
    if kind == "linear":
        from flowloss.ops import triton_linear

        return triton_linear
    from flowloss.kernels import tb_loss

    return tb_loss


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


def choose(kind: str, impl: str, tensors: Sequence[tuple[str, torch.Tensor | None]]) -> str:
    """The implementation of ``kind`` that runs for ``impl`` on these ``(name, tensor)`` inputs.

    ``"auto"`` -> ``"triton"`` for CUDA tensors the kernels take when triton imports and the family is in
    `GPU_VERIFIED`, else the fallback (``"chunked"`` / ``"pytorch"``). ``"triton"``
    raises, naming the argument, when the kernels cannot take the inputs. Other values are returned as given.
    """
    require_choice("impl", impl, LOSS_IMPLS if kind == "tb_loss" else (IMPLS if kind == "logits" else LINEAR_IMPLS))
    if impl != "auto" and impl != "triton":
        return impl
    if impl == "auto":
        fast = GPU_VERIFIED[kind] is not None and unsupported_reason(tensors, cpu_ok=False) is None
        return "triton" if fast and triton_available(kind) else _FALLBACK[kind]
    reason = unsupported_reason(tensors, cpu_ok=interpreter_on())
    fallback = _FALLBACK[kind]
    if reason is not None:
        hint = "TRITON_INTERPRET=1 for the interpreter, or " if "CUDA" in reason else ""
        raise (ValueError if "CUDA" in reason else TypeError)(
            f"`impl='triton'` cannot run {_OPS[kind]} here: {reason}; use {hint}impl={fallback!r}"
        )
    if not triton_available(kind):
        raise ImportError(f"`impl='triton'` needs triton and {_TRITON_MODULES[kind]}; use impl={fallback!r}")
    return impl


def resolve_impl(impl: str, x: torch.Tensor, *, kind: str = "logits", name: str = "logits") -> str:
    """`choose` for one input tensor (the log-prob ops' form)."""
    return choose(kind, impl, [(name, x)])

"""Which implementation runs: the one Triton-availability check, and ``impl=`` resolution.

``impl="auto"`` picks the fused Triton kernels for CUDA tensors (fp16/bf16/fp32) when triton imports, else the
chunked PyTorch path. ``impl="triton"`` on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported, as the tests do). Nothing here is imported at ``import flowloss`` time except this
module: the Triton modules are imported on first use.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from flowloss._validation import describe

IMPLS: tuple[str, ...] = ("auto", "triton", "chunked", "reference")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MODULES = {"logits": "flowloss.ops.triton_logprobs", "linear": "flowloss.ops.triton_linear"}


def interpreter_on() -> bool:
    """Whether Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available(kind: str = "logits") -> bool:
    """Whether the Triton implementation of ``kind`` (``"logits"`` or ``"linear"``) can be imported."""
    try:
        triton_module(kind)
    except ImportError:
        return False
    return True


def triton_module(kind: str = "logits") -> ModuleType:
    """The module holding the Triton ``forward``/``backward`` of ``kind`` (imported on first use: importing it
    imports triton)."""
    if kind == "logits":
        from flowloss.ops import triton_logprobs

        return triton_logprobs
    from flowloss.ops import triton_linear  # type: ignore[attr-defined]

    return triton_linear


def resolve_impl(impl: str, x: torch.Tensor, *, kind: str = "logits", name: str = "logits") -> str:
    """``"auto"`` -> ``"triton"`` for CUDA fp16/bf16/fp32 tensors when the kernels import, else ``"chunked"``.

    float64 stays on the chunked path (the kernels compute in fp32; float64 is for checking).
    """
    if impl == "auto":
        fast = x.is_cuda and x.dtype in TRITON_DTYPES
        return "triton" if fast and triton_available(kind) else "chunked"
    if impl == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"`{name}` must be float32, bfloat16 or float16 for the Triton kernels (impl='triton'), got "
                f"{describe(x)}; use impl='chunked' for float64"
            )
        if not x.is_cuda and not interpreter_on():
            raise ValueError(
                f"`impl='triton'` needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter), got `{name}` "
                f"{describe(x)}; use impl='chunked' on CPU"
            )
        if not triton_available(kind):
            raise ImportError(f"`impl='triton'` needs triton and {_TRITON_MODULES[kind]}; use impl='chunked'")
    return impl

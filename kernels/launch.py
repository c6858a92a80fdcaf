"""Where a launch runs: Triton launches on the *current* CUDA device, not on the device of its arguments.

A tensor on ``cuda:1`` launched while ``cuda:0`` is current reads the wrong device's memory (an illegal address,
or silently wrong results with peer access): triton-lang/triton#2441, Liger-Kernel#1303. Every launcher in this
package therefore runs under ``with on_device(tensor):``.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(tensor.device)`` for a CUDA (or ROCm) tensor; a no-op elsewhere (the interpreter's CPU
    tensors, meta tensors). Entering it reads no device memory and does not synchronise."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()

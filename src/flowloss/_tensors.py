"""Tiny tensor helpers for the hot path: skip the dispatch of no-op conversions (each is an op on a GPU)."""

from __future__ import annotations

import torch


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without dispatching anything when ``t`` already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


def constant(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.detach().to(dtype)``: a value that carries no gradient, with no op when none is needed."""
    return as_dtype(t.detach() if t.requires_grad else t, dtype)

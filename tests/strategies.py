"""Hypothesis strategies for token-level RL batches: shapes, masks (all-masked rows, length-1 responses),
dtypes, and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Batch:
    logprobs: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor  # [B, T]
    old_logprobs: torch.Tensor  # [B, T]
    rollout_logprobs: torch.Tensor  # [B, T]
    rewards: torch.Tensor  # [B]
    log_z: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T] bool
    dtype: torch.dtype


@st.composite
def masks(draw, batch: int, length: int) -> torch.Tensor:
    """Right-padded, left-padded or scattered masks; rows may be empty or have a single token."""
    kind = draw(st.sampled_from(["right", "left", "scattered"]))
    rows = []
    for _ in range(batch):
        n = draw(st.integers(0, length))
        if kind == "right":
            row = [t < n for t in range(length)]
        elif kind == "left":
            row = [t >= length - n for t in range(length)]
        else:
            row = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(batch, length)


@st.composite
def batches(draw, *, max_batch: int = 6, max_len: int = 7, dtypes=DTYPES, scale: float = 3.0) -> Batch:
    b = draw(st.integers(1, max_batch))
    t = draw(st.integers(1, max_len))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    logprobs = -rand(b, t).abs()
    mask = draw(masks(b, t))
    return Batch(
        logprobs=logprobs,
        ref_logprobs=-rand(b, t).abs(),
        old_logprobs=logprobs.to(torch.float64).add(rand(b, t, s=0.3).to(torch.float64)).to(dtype),
        rollout_logprobs=logprobs.to(torch.float64).add(rand(b, t, s=0.3).to(torch.float64)).to(dtype),
        rewards=rand(b, s=1.0),
        log_z=rand(b, s=1.0),
        mask=mask,
        dtype=dtype,
    )


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def f64_leaf(t: torch.Tensor) -> torch.Tensor:
    """The same (already dtype-rounded) values as a float64 leaf for the reference."""
    return t.detach().to(torch.float64).clone().requires_grad_(True)

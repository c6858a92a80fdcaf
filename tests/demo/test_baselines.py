"""The GRPO baseline loss against a float64 loop of its formula (values and gradients)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from flowloss.demo.baselines import grpo_loss
from tests.conftest import assert_close


def _loop_grpo(lp, old, ref, adv, mask, eps_low, eps_high, kl_coef):
    """-(1/B) sum_i (1/|y_i|) sum_t [min(rho A, clip(rho) A) - kl_coef k3], one scalar at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(lp.shape[0]):
        tokens = [t for t in range(lp.shape[1]) if bool(mask[i, t])]
        row = torch.zeros((), dtype=torch.float64)
        for t in tokens:
            rho = torch.exp(lp[i, t] - float(old[i, t]))
            a = float(adv[i])
            clipped = min(max(float(rho.detach()), 1 - eps_low), 1 + eps_high)
            surrogate = rho * a if rho * a <= clipped * a else torch.tensor(clipped * a, dtype=torch.float64)
            q = float(ref[i, t]) - lp[i, t]
            row = row - surrogate + kl_coef * (torch.exp(q) - q - 1)
        total = total + (row / len(tokens) if tokens else row)
    return total / lp.shape[0]


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    length=st.integers(1, 6),
    kl_coef=st.sampled_from([0.0, 0.04]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_grpo_loss_matches_loop(seed, batch, length, kl_coef, dtype):
    g = torch.Generator().manual_seed(seed)
    lp64 = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    old = lp64 + 0.4 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = lp64 + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=g) < 0.8
    mask[:, 0] = True
    lp = lp64.to(dtype).requires_grad_(True)
    got = grpo_loss(lp, old.to(dtype), ref.to(dtype), adv.to(dtype), mask, kl_coef=kl_coef)
    lp_ref = lp.detach().to(torch.float64).requires_grad_(True)
    expected = _loop_grpo(lp_ref, old.to(dtype), ref.to(dtype), adv.to(dtype), mask, 0.2, 0.28, kl_coef)
    scale = 1.0 + float(adv.abs().max()) * math.exp(3)
    assert_close(got, expected, dtype=dtype, what="GRPO clipped surrogate value", scale=scale)
    (grad,) = torch.autograd.grad(got, lp)
    (grad_ref,) = torch.autograd.grad(expected, lp_ref)
    assert_close(grad, grad_ref, dtype=dtype, what="GRPO clipped surrogate gradient", scale=scale)


def test_on_policy_gradient_is_reinforce_with_group_baseline():
    """old = lp.detach(), no KL: grad = -(1/B) sum_i A_i (1/|y_i|) grad sum_t log pi(y_it)."""
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    (grad,) = torch.autograd.grad(grpo_loss(lp, lp.detach(), lp.detach(), adv, mask), lp)
    torch.testing.assert_close(grad, (-adv / (4 * 3))[:, None].expand(4, 3), rtol=1e-14, atol=1e-14)

"""The "2 beta GRPO + KL / (beta L)" reading of the trajectory-balance gradient (docs/math.md), checked exactly.

With length normalization (``l = (1/L) log pi``, responses of ``L`` tokens), on policy (``w = 1``), group z-scored
rewards ``r_hat`` and a ``log Z`` that does not depend on the policy's log-probs:

* per batch, w.r.t. every token log-prob (so w.r.t. any parameter, by the chain rule):
  ``grad loss_TB = 2 beta grad loss_GRPO + (2 / (B L)) sum_i (log Z_i + l_i - l_ref_i) grad log pi(y_i)``;
* in expectation over ``y ~ pi`` (``r_hat`` a fixed function of ``y``), for any constant ``log Z``:
  ``E grad delta^2 = 2 beta E grad loss_GRPO + (2 / L^2) grad KL(pi || pi_ref)
  = -(2 beta / L) grad [E_pi r_hat - KL(pi || pi_ref) / (beta L)]``;
* a group whose rewards are all equal has ``r_hat = 0``: GRPO's gradient is exactly 0 and TB's is the KL term alone.
"""

from __future__ import annotations

import pytest
import torch

import flowloss
from flowloss.demo.baselines import grpo_loss
from flowloss.demo.problem import make_problem


def _token_grad(loss: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logprobs)
    return grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_gradient_is_two_beta_grpo_plus_the_reference_term(seed):
    g = torch.Generator().manual_seed(seed)
    k, groups, length, beta = 8, 3, 5, 15.0
    b = k * groups
    logprobs = (-3.0 * torch.rand(b, length, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -3.0 * torch.rand(b, length, generator=g, dtype=torch.float64)
    rewards = (torch.rand(b, generator=g) < 0.6).double()
    r_hat = flowloss.group_normalize_rewards(rewards, k)
    log_z = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, length, dtype=torch.bool)

    tb = _token_grad(flowloss.trajectory_balance_loss(logprobs, ref, r_hat, log_z, mask, beta=beta), logprobs)
    grpo = _token_grad(grpo_loss(logprobs, logprobs.detach(), ref, r_hat, mask), logprobs)
    lp_mean, ref_mean = logprobs.detach().mean(dim=1), ref.mean(dim=1)
    reference_term = (2.0 / (b * length)) * (log_z + lp_mean - ref_mean)[:, None].expand(b, length)
    torch.testing.assert_close(tb, 2 * beta * grpo + reference_term, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_expected_gradient_is_kl_regularized_reward_maximization(seed):
    """Enumerate every response of a tabular autoregressive policy (V = 4, L = 3): exact expectations."""
    problem = make_problem(seed=seed, vocab_size=4, length=3, heights=(1.0, 0.6))
    length, beta, log_z = problem.length, 15.0, 0.7
    g = torch.Generator().manual_seed(seed + 10)
    table = (problem.ref_logits + 0.8 * torch.randn(problem.ref_logits.shape, generator=g, dtype=torch.float64))
    table.requires_grad_(True)
    ys = problem.all_sequences()
    r_hat = torch.randn(ys.shape[0], generator=g, dtype=torch.float64)  # any fixed reward function of y
    lp = problem.token_logprobs(table, ys)
    ref = problem.token_logprobs(problem.ref_logits, ys)
    pi = lp.sum(dim=1).exp()
    weight = pi.detach()  # E_{y ~ pi}[f(y)] = sum_y sg(pi(y)) f(y): samples held fixed
    mask = torch.ones_like(lp, dtype=torch.bool)

    per_y = flowloss.trajectory_balance_loss(
        lp, ref, r_hat, torch.full_like(r_hat, log_z), mask, beta=beta, reduction="none"
    )
    (tb,) = torch.autograd.grad((weight * per_y).sum(), table, retain_graph=True)
    per_y_grpo = -r_hat * lp.mean(dim=1)  # GRPO's on-policy per-sample loss (its surrogate at ratio 1)
    (grpo,) = torch.autograd.grad((weight * per_y_grpo).sum(), table, retain_graph=True)
    kl = (pi * (lp.sum(dim=1) - ref.sum(dim=1))).sum()  # exact KL(pi || pi_ref), differentiable
    (grad_kl,) = torch.autograd.grad(kl, table, retain_graph=True)
    torch.testing.assert_close(tb, 2 * beta * grpo + (2.0 / length**2) * grad_kl, rtol=1e-9, atol=1e-11)

    objective = (pi * r_hat).sum() - kl / (beta * length)  # E_pi[r_hat] - KL(pi || pi_ref) / (beta L)
    (grad_objective,) = torch.autograd.grad(objective, table)
    torch.testing.assert_close(tb, -(2 * beta / length) * grad_objective, rtol=1e-9, atol=1e-11)


def test_an_all_correct_group_leaves_only_the_reference_term():
    g = torch.Generator().manual_seed(4)
    k, length, beta = 8, 3, 15.0
    logprobs = (-2.0 * torch.rand(k, length, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -2.0 * torch.rand(k, length, generator=g, dtype=torch.float64)
    r_hat = flowloss.group_normalize_rewards(torch.ones(k, dtype=torch.float64), k)
    assert torch.equal(r_hat, torch.zeros(k, dtype=torch.float64)), "z-score of an all-correct group"
    mask = torch.ones(k, length, dtype=torch.bool)
    grpo = _token_grad(grpo_loss(logprobs, logprobs.detach(), ref, r_hat, mask), logprobs)
    assert torch.count_nonzero(grpo) == 0, "GRPO learns nothing from a group of equal rewards"
    log_z = torch.full((k,), -0.3, dtype=torch.float64)
    tb = _token_grad(flowloss.trajectory_balance_loss(logprobs, ref, r_hat, log_z, mask, beta=beta), logprobs)
    expected = (2.0 / (k * length)) * (log_z + logprobs.detach().mean(1) - ref.mean(1))[:, None].expand(k, length)
    torch.testing.assert_close(tb, expected, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(tb) == tb.numel(), "TB still pulls each answer's log-ratio to the reference"

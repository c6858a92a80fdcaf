"""Proposition 1 of FlowRL, checked exactly on an enumerable sequence space.

A tabular autoregressive policy over vocabulary {0, 1, EOS=2} and responses of at most 3 tokens (15 sequences,
EOS-terminated or truncated at 3). Every expectation below is an exact sum over the space, so the identities hold
to float64 rounding:

* on-policy, any constant log Z:  E_pi[grad delta^2] = 2 grad KL(pi || p*),   p* = pi_ref exp(beta r) / Z;
* the reverse-KL surrogate:        E_pi[grad surrogate] = grad KL;
* off-policy, exact detached w = pi / pi_old: E_old[w grad delta^2] = 2 grad KL (clipped w: biased);
* the optimal constant log Z is log Z_true - KL(pi || p*);
* VarGrad log Z from K samples:   E[grad mean_k delta_k^2] = 2 (K - 1)/K grad KL;
* length normalization departs from it for variable lengths, and for one fixed length L equals the
  unnormalized objective with beta * L and L log Z, scaled by 1/L^2.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowloss import reverse_kl_surrogate, trajectory_balance_loss, vargrad_log_z

VOCAB, EOS, MAX_LEN = 3, 2, 3
F64 = torch.float64


def enumerate_sequences(*, fixed_length: int | None = None) -> list[tuple[int, ...]]:
    """All responses: EOS-terminated or truncated at MAX_LEN (or, with fixed_length, all EOS-free L-tuples)."""
    if fixed_length is not None:
        return list(itertools.product(range(EOS), repeat=fixed_length))
    out: list[tuple[int, ...]] = []
    for length in range(1, MAX_LEN + 1):
        for body in itertools.product(range(EOS), repeat=length - 1):
            out.append((*body, EOS))
            if length == MAX_LEN:
                out.extend((*body, last) for last in range(EOS))
    return out


class TabularPolicy:
    """pi(y_t | y_<t) = softmax(theta[prefix])[y_t], one row of logits per EOS-free prefix."""

    def __init__(self, generator: torch.Generator, *, scale: float = 1.0, requires_grad: bool = False):
        self.prefixes = {
            p: i
            for i, p in enumerate(p for n in range(MAX_LEN) for p in itertools.product(range(EOS), repeat=n))
        }
        self.theta = torch.randn(len(self.prefixes), VOCAB, generator=generator, dtype=F64) * scale
        self.theta.requires_grad_(requires_grad)

    def token_logprobs(self, sequences: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S, MAX_LEN]`` token log-probs (0 where padded) and the ``[S, MAX_LEN]`` response mask."""
        log_p = torch.log_softmax(self.theta, dim=-1)
        rows, mask = [], []
        for seq in sequences:
            row = [log_p[self.prefixes[seq[:t]], tok] for t, tok in enumerate(seq)]
            pad = MAX_LEN - len(seq)
            rows.append(torch.stack(row + [torch.zeros((), dtype=F64)] * pad))
            mask.append([True] * len(seq) + [False] * pad)
        return torch.stack(rows), torch.tensor(mask)


def problem(seed: int, *, fixed_length: int | None = None):
    g = torch.Generator().manual_seed(seed)
    seqs = enumerate_sequences(fixed_length=fixed_length)
    policy = TabularPolicy(g, requires_grad=True)
    reference = TabularPolicy(g)
    old = TabularPolicy(g, scale=0.5)
    rewards = torch.randn(len(seqs), generator=g, dtype=F64)
    beta = 1.5
    lp, mask = policy.token_logprobs(seqs)
    ref_lp, _ = reference.token_logprobs(seqs)
    old_lp, _ = old.token_logprobs(seqs)
    return policy, seqs, lp, ref_lp.detach(), old_lp.detach(), mask, rewards, beta


def exact_kl(lp, ref_lp, mask, rewards, beta) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(pi || p*) with gradient, and log Z_true = log sum_y pi_ref(y) exp(beta r(y))."""
    log_pi = (lp * mask).sum(-1)
    log_ref = (ref_lp * mask).sum(-1)
    log_z_true = torch.logsumexp(log_ref + beta * rewards, dim=0)
    kl = (log_pi.exp() * (log_pi - log_ref - beta * rewards)).sum() + log_z_true
    return kl, log_z_true


def grad_of(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, theta, retain_graph=True)
    return g


def sequence_probs(lp, mask) -> torch.Tensor:
    return (lp * mask).sum(-1).exp().detach()


seeds = st.integers(0, 10_000)


@given(seed=seeds, log_z=st.floats(-5, 5))
def test_on_policy_tb_gradient_is_twice_kl_gradient_for_any_log_z(seed, log_z):
    policy, seqs, lp, ref_lp, _, mask, rewards, beta = problem(seed)
    kl, _ = exact_kl(lp, ref_lp, mask, rewards, beta)
    per_seq = trajectory_balance_loss(
        lp,
        ref_lp,
        rewards,
        torch.full((len(seqs),), log_z, dtype=F64),
        mask,
        beta=beta,
        length_normalization=False,
        reduction="none",
    )
    expected_tb = (sequence_probs(lp, mask) * per_seq).sum()
    torch.testing.assert_close(
        grad_of(expected_tb, policy.theta), 2 * grad_of(kl, policy.theta), rtol=1e-9, atol=1e-10
    )


@given(seed=seeds, baseline=st.floats(-5, 5))
def test_on_policy_surrogate_gradient_is_kl_gradient(seed, baseline):
    policy, _, lp, ref_lp, _, mask, rewards, beta = problem(seed)
    kl, _ = exact_kl(lp, ref_lp, mask, rewards, beta)
    per_seq = reverse_kl_surrogate(lp, ref_lp, rewards, mask, beta=beta, baseline=baseline, reduction="none")
    expected = (sequence_probs(lp, mask) * per_seq).sum()
    torch.testing.assert_close(
        grad_of(expected, policy.theta), grad_of(kl, policy.theta), rtol=1e-9, atol=1e-10
    )


@given(seed=seeds)
def test_off_policy_exact_weights_keep_proposition1_and_clipped_weights_bias_it(seed):
    """E_{y ~ pi_old}[w(y) grad delta(y)^2] with w = pi/pi_old ("sequence" mode) is 2 grad KL; clipping biases."""
    policy, seqs, lp, ref_lp, old_lp, mask, rewards, beta = problem(seed)
    kl, _ = exact_kl(lp, ref_lp, mask, rewards, beta)
    target = 2 * grad_of(kl, policy.theta)
    old_probs = sequence_probs(old_lp, mask)
    log_z = torch.zeros(len(seqs), dtype=F64)

    def expected_gradient(mode: str) -> torch.Tensor:
        per_seq = trajectory_balance_loss(
            lp,
            ref_lp,
            rewards,
            log_z,
            mask,
            beta=beta,
            old_logprobs=old_lp,
            importance_weights=mode,
            length_normalization=False,
            reduction="none",
        )
        return grad_of((old_probs * per_seq).sum(), policy.theta)

    torch.testing.assert_close(expected_gradient("sequence"), target, rtol=1e-9, atol=1e-10)
    clipped = expected_gradient("sequence_clipped")
    assert (clipped - target).norm() > 1e-3 * target.norm(), "clipped weights should be biased off-policy"


@given(seed=seeds)
def test_optimal_constant_log_z_is_log_z_true_minus_kl(seed):
    """argmin_c E_pi[(c + log pi - beta r - log pi_ref)^2] = log Z_true - KL(pi || p*)."""
    _, seqs, lp, ref_lp, _, mask, rewards, beta = problem(seed)
    kl, log_z_true = exact_kl(lp, ref_lp, mask, rewards, beta)
    probs = sequence_probs(lp, mask)

    def d_loss_d_c(c: float) -> float:
        log_z = torch.full((len(seqs),), c, dtype=F64, requires_grad=True)
        per_seq = trajectory_balance_loss(
            lp.detach(), ref_lp, rewards, log_z, mask, beta=beta, length_normalization=False, reduction="none"
        )
        (g,) = torch.autograd.grad((probs * per_seq).sum(), log_z)
        return float(g.sum())

    c_star = float((log_z_true - kl).detach())
    assert abs(d_loss_d_c(c_star)) < 1e-9
    assert d_loss_d_c(c_star + 0.1) == pytest.approx(0.2, rel=1e-9)  # d/dc E[delta^2] = 2 (c - c*)


@settings(max_examples=10)
@given(seed=seeds, k=st.sampled_from([2, 3]))
def test_vargrad_log_z_gives_k_minus_one_over_k_of_the_kl_gradient(seed, k):
    """Exact expectation over all K-tuples of on-policy samples of grad mean_k delta_k^2 with VarGrad log Z."""
    policy, seqs, lp, ref_lp, _, mask, rewards, beta = problem(seed)
    kl, _ = exact_kl(lp, ref_lp, mask, rewards, beta)
    tuples = torch.tensor(list(itertools.product(range(len(seqs)), repeat=k))).reshape(-1)
    b_lp, b_ref, b_mask, b_r = lp[tuples], ref_lp[tuples], mask[tuples], rewards[tuples]
    log_z = vargrad_log_z(b_lp, b_ref, b_r, b_mask, k, beta=beta, length_normalization=False)
    per_seq = trajectory_balance_loss(
        b_lp, b_ref, b_r, log_z, b_mask, beta=beta, length_normalization=False, reduction="none"
    )
    probs = sequence_probs(lp, mask)[tuples].reshape(-1, k).prod(-1)
    expected = (probs[:, None] * per_seq.reshape(-1, k)).sum() / k
    torch.testing.assert_close(
        grad_of(expected, policy.theta), 2 * (k - 1) / k * grad_of(kl, policy.theta), rtol=1e-8, atol=1e-10
    )


@settings(max_examples=20)
@given(seed=seeds, log_z=st.floats(-2, 2))
def test_length_normalized_objective_for_one_fixed_length_is_rescaled_tb(seed, log_z):
    """For |y| = L: delta_norm(beta, log Z) = delta(beta L, L log Z) / L, so gradients differ by 1/L^2."""
    length = 3
    policy, seqs, lp, ref_lp, _, mask, rewards, beta = problem(seed, fixed_length=length)
    probs = sequence_probs(lp, mask)
    n = len(seqs)
    normalized = trajectory_balance_loss(
        lp, ref_lp, rewards, torch.full((n,), log_z, dtype=F64), mask, beta=beta, reduction="none"
    )
    unnormalized = trajectory_balance_loss(
        lp,
        ref_lp,
        rewards,
        torch.full((n,), length * log_z, dtype=F64),
        mask,
        beta=beta * length,
        length_normalization=False,
        reduction="none",
    )
    torch.testing.assert_close(normalized, unnormalized / length**2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        grad_of((probs * normalized).sum(), policy.theta),
        grad_of((probs * unnormalized).sum(), policy.theta) / length**2,
        rtol=1e-9,
        atol=1e-12,
    )


def test_length_normalized_objective_departs_from_kl_on_variable_lengths():
    """Documented departure: on variable-length responses the length-normalized TB gradient is not
    proportional to grad KL (the docs quote the cosine similarities printed by this check)."""
    cosines = []
    for seed in range(20):
        policy, seqs, lp, ref_lp, _, mask, rewards, beta = problem(seed)
        kl, _ = exact_kl(lp, ref_lp, mask, rewards, beta)
        g_kl = grad_of(kl, policy.theta).flatten()
        per_seq = trajectory_balance_loss(
            lp, ref_lp, rewards, torch.zeros(len(seqs), dtype=F64), mask, beta=beta, reduction="none"
        )
        g_norm = grad_of((sequence_probs(lp, mask) * per_seq).sum(), policy.theta).flatten()
        cosines.append(float(torch.nn.functional.cosine_similarity(g_kl, g_norm, dim=0)))
    # Not an identity: the directions differ (cosine < 0.99) on most problems of this space...
    assert sum(c < 0.99 for c in cosines) >= 10, cosines
    # ...though on every one of these problems it stays a descent direction for the KL (docs/math.md).
    assert min(cosines) > 0.0, cosines

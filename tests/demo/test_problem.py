"""The demo's toy problem: table indexing, rewards and the exact target vs brute-force loops in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowloss.demo.problem import exact_target, make_problem


def _loop_logprob(problem, logits, y) -> float:
    """``log pi(y) = sum_t log softmax(logits[row(y_<t)])[y_t]``, walking the table prefix by prefix."""
    total, offset, code = 0.0, 0, 0
    for t, token in enumerate(y):
        row = logits[offset + code].to(torch.float64)
        total += float(row[token] - torch.logsumexp(row, dim=0))
        code = code * problem.vocab_size + token
        offset += problem.vocab_size**t
    return total


def _loop_reward(problem, y) -> float:
    best = 0.0
    for mode, h in zip(problem.modes.tolist(), problem.heights.tolist()):
        matches = sum(int(a == b) for a, b in zip(y, mode))
        best = max(best, h * (matches / problem.length) ** 2)
    return best


@given(seed=st.integers(0, 10_000), vocab=st.integers(3, 5), length=st.integers(1, 3))
def test_logprobs_rewards_and_target_match_brute_force(seed, vocab, length):
    problem = make_problem(seed=seed, vocab_size=vocab, length=length, heights=(1.0, 0.7, 0.4))
    beta = 3.0
    target = exact_target(problem, beta)
    all_y = list(itertools.product(range(vocab), repeat=length))
    assert target.sequences.tolist() == [list(y) for y in all_y], "enumeration must be lexicographic"
    logp = [_loop_logprob(problem, problem.ref_logits, y) for y in all_y]
    rewards = [_loop_reward(problem, y) for y in all_y]
    got = problem.sequence_logprobs(problem.ref_logits, target.sequences)
    torch.testing.assert_close(got, torch.tensor(logp, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert math.isclose(math.fsum(math.exp(v) for v in logp), 1.0, rel_tol=1e-12), "pi_ref must sum to 1"
    torch.testing.assert_close(target.rewards, torch.tensor(rewards, dtype=torch.float64), rtol=0, atol=1e-15)
    log_z = math.log(math.fsum(math.exp(lp + beta * r) for lp, r in zip(logp, rewards)))
    assert math.isclose(target.log_z, log_z, rel_tol=1e-12), "log Z = log sum_y pi_ref(y) exp(beta r(y))"
    expected = torch.tensor([lp + beta * r - log_z for lp, r in zip(logp, rewards)], dtype=torch.float64)
    torch.testing.assert_close(target.log_target, expected, rtol=1e-12, atol=1e-12)
    for m, row in enumerate(target.mode_rows.tolist()):
        assert all_y[row] == tuple(problem.modes[m].tolist()), "mode_rows must point at y^(m)"
        assert math.isclose(rewards[row], float(problem.heights[m])), "r(y^(m)) = h_m"


def test_modes_differ_at_every_position():
    problem = make_problem(seed=3)
    for t in range(problem.length):
        column = problem.modes[:, t].tolist()
        assert len(set(column)) == len(column)
    assert problem.mode_index(problem.modes).tolist() == list(range(problem.modes.shape[0]))


def test_sampling_matches_the_policy():
    """Empirical frequencies of 200k draws vs exact probabilities (deterministic generator; 5-sigma bound)."""
    problem = make_problem(seed=1, vocab_size=3, length=3, heights=(1.0,))
    seqs = problem.all_sequences()
    p = problem.sequence_logprobs(problem.ref_logits, seqs).exp()
    n = 200_000
    draws = problem.sample(problem.ref_logits, n, torch.Generator().manual_seed(0))
    codes = (draws * torch.tensor([9, 3, 1])).sum(dim=-1)
    freq = torch.bincount(codes, minlength=27).to(torch.float64) / n
    sigma = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), f"max deviation {(freq - p).abs().max():.2e}"


def test_gradient_of_token_logprobs_is_softmax_jacobian():
    """d log pi(y) / d logits[row, v] = 1[v = y_t] - pi(v | row) at each visited row (float64 gradcheck)."""
    problem = make_problem(seed=0, vocab_size=3, length=2, heights=(1.0,))
    logits = problem.ref_logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: problem.sequence_logprobs(z, torch.tensor([[0, 2], [1, 1]])), (logits,)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1}, "vocab_size"),
        ({"length": 0}, "length"),
        ({"heights": ()}, "heights"),
        ({"vocab_size": 2, "heights": (1.0, 0.9, 0.8)}, "heights"),
        ({"vocab_size": 64, "length": 5}, "too many sequences"),
        ({"ref_scale": float("nan")}, "ref_scale"),
    ],
)
def test_bad_problem_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_problem(seed=0, **kwargs)

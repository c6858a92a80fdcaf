"""The sequences demo's exact scores against brute force: enumerated samples, loops, plain forwards.

* ``D_n = sum_{y correct} 1 - (1 - pi(y))^n`` equals the expected number of distinct correct answers in ``n``
  draws, computed by enumerating every ordered tuple of ``n`` draws (and by sampling, for ``n = 64``);
* mean reward, top share and KL equal their loop definitions; the target is ``pi_ref exp(beta r) / Z``;
* the task's rewards equal a digit-by-digit loop; the enumerated answer distribution of the transformer equals
  ``sum_t log softmax`` from a plain forward of every prompt + answer, and sampling follows it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowloss.demo.sequence_metrics import (
    correct_mass,
    expected_distinct,
    kl_divergence,
    score,
    target_logprobs,
    top_share,
)
from flowloss.demo.sequence_task import NUM_DIGITS, TOKENS, DigitSumTask, warm_start_answers


def _distribution(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(size, generator=g, dtype=torch.float64)
    correct = torch.rand(size, generator=g) < 0.6
    correct[0] = True
    return torch.log_softmax(logits, dim=0), correct


@given(seed=st.integers(0, 10_000), size=st.integers(1, 5), n=st.integers(1, 4))
def test_expected_distinct_equals_the_enumerated_expectation(seed, size, n):
    """E[#distinct correct y among n iid draws] by summing over all size^n ordered draws, each with its probability."""
    logp, correct = _distribution(seed, size)
    p = logp.exp().tolist()
    expected = 0.0
    for draws in itertools.product(range(size), repeat=n):
        prob = math.prod(p[d] for d in draws)
        expected += prob * len({d for d in draws if correct[d]})
    got = float(expected_distinct(logp[None], correct[None], n)[0])
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), "D_n = sum_{y correct} 1 - (1 - pi(y))^n"


def test_expected_distinct_of_64_samples_matches_sampling():
    """n = 64 over 30 answers: the formula against the mean over 20000 sampled sets of 64 draws."""
    logp, correct = _distribution(3, 30)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(logp.exp().expand(20_000, -1), 64, replacement=True, generator=g)
    seen = torch.zeros(20_000, 30, dtype=torch.bool).scatter_(1, draws, True)
    counts = (seen & correct).sum(dim=1).double()
    formula = float(expected_distinct(logp[None], correct[None], 64)[0])
    stderr = float(counts.std()) / math.sqrt(counts.numel())
    assert abs(formula - float(counts.mean())) < 5 * stderr + 1e-9, (formula, float(counts.mean()), stderr)


def test_expected_distinct_limits():
    correct = torch.ones(1, 4, dtype=torch.bool)
    uniform = torch.full((1, 4), math.log(0.25), dtype=torch.float64)
    assert float(expected_distinct(uniform, correct, 1)[0]) == pytest.approx(1.0)
    assert float(expected_distinct(uniform, correct, 10_000)[0]) == pytest.approx(4.0)
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]], dtype=torch.float64)
    assert float(expected_distinct(one_hot, correct, 64)[0]) == pytest.approx(1.0)
    tiny = torch.tensor([[math.log(1e-300)] * 4], dtype=torch.float64)
    assert float(expected_distinct(tiny, correct, 64)[0]) == pytest.approx(4 * 64e-300, rel=1e-9), "n pi for tiny pi"
    with pytest.raises(ValueError, match="samples"):
        expected_distinct(uniform, correct, 0)


@given(seed=st.integers(0, 10_000), size=st.integers(2, 12))
def test_reward_top_share_kl_and_target_equal_their_loops(seed, size):
    logp, correct = _distribution(seed, size)
    ref, _ = _distribution(seed + 1, size)
    p, q = logp.exp().tolist(), ref.exp().tolist()
    beta = 4.5
    z = sum(q[y] * math.exp(beta * float(correct[y])) for y in range(size))
    target = [q[y] * math.exp(beta * float(correct[y])) / z for y in range(size)]
    mass = sum(p[y] for y in range(size) if correct[y])
    log_target = target_logprobs(ref[None], correct[None].double(), beta)[0]
    assert log_target.exp().tolist() == pytest.approx(target, rel=1e-10), "p* = pi_ref exp(beta r) / Z"
    assert float(correct_mass(logp[None], correct[None])[0]) == pytest.approx(mass, rel=1e-12)
    top = max(p[y] for y in range(size) if correct[y]) / mass
    assert float(top_share(logp[None], correct[None])[0]) == pytest.approx(top, rel=1e-12)
    kl = sum(p[y] * math.log(p[y] / target[y]) for y in range(size) if p[y] > 0)
    assert float(kl_divergence(logp[None], log_target[None])[0]) == pytest.approx(kl, rel=1e-9, abs=1e-12)


def test_score_averages_over_prompts():
    rows = [_distribution(s, 6) for s in range(3)]
    logp = torch.stack([r[0] for r in rows])
    correct = torch.stack([r[1] for r in rows])
    s = score(logp, correct, logp, samples=64)
    assert s.kl_target == pytest.approx(0.0, abs=1e-12)
    assert s.reward == pytest.approx(float(correct_mass(logp, correct).mean()))
    assert s.distinct_correct == pytest.approx(float(expected_distinct(logp, correct, 64).mean()))


# --- the task ---------------------------------------------------------------------------------------------------


def _loop_reward(s: int, answer: list[int]) -> float:
    return float(all(t < NUM_DIGITS for t in answer) and sum(answer) == s)


def test_task_rewards_and_correct_table_equal_a_loop():
    task = DigitSumTask(sums=(0, 13, 27), answer_length=3)
    answers = task.all_answers()
    assert answers.shape == (13**3, 3)
    assert answers[13 * 13 * 1 + 13 * 3 + 10].tolist() == [1, 3, 10], "lexicographic: row = base-V number"
    table = task.correct_table()
    for p, s in enumerate(task.sums):
        expected = [_loop_reward(s, a) for a in answers.tolist()]
        assert table[p].double().tolist() == expected
    # 3 digits adding up to 13: 75 of 1000; to 0 and to 27: one each.
    assert table.sum(dim=1).tolist() == [1, 75, 1]
    assert task.prompt_ids().tolist() == [[0, 0, 10], [1, 3, 10], [2, 7, 10]]
    assert task.text_reward("13=", "4 9 0") == 1.0 and task.text_reward("13=", "490") == 1.0
    assert task.text_reward("13=", "49") == 0.0 and task.text_reward("13=", "491") == 0.0
    assert task.text_reward("13=", "4=9") == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"answer_length": 0}, "answer_length"), ({"sums": (28,)}, "sums"), ({"sums": ()}, "sums"),
     ({"sums": (3, 3)}, "distinct")],
)
def test_task_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitSumTask(**kwargs)


def test_warm_start_data_is_skewed_and_mixes_in_wrong_answers():
    task = DigitSumTask(sums=(13,))
    data = warm_start_answers(task, 4000, zipf=1.0, wrong_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert data.shape == (4000, 6) and (data[:, :3] == torch.tensor([1, 3, 10])).all()
    rewards = task.rewards(torch.full((4000,), 13), data[:, 3:])
    assert float(rewards.mean()) == pytest.approx(0.75, abs=1e-9), "exactly 1 - wrong_fraction of the rows"
    assert (data[:, 3:] < NUM_DIGITS).all(), "wrong answers are digit strings with the wrong sum"
    _, counts = torch.unique(data[rewards > 0, 3:], dim=0, return_counts=True)
    top = counts.max().item() / counts.sum().item()
    assert top > 3 / 75, f"Zipf weights favour the first answers (top share {top:.3f} vs uniform 1/75)"


# --- the model ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    pytest.importorskip("transformers")
    from flowloss.demo.sequence_model import build_policy

    task = DigitSumTask(sums=(5, 13), answer_length=2)
    return task, build_policy(task, seed=0, hidden_size=16, num_layers=1)


def test_exact_answer_logprobs_equal_plain_forwards(tiny_model):
    from flowloss.demo.sequence_model import exact_answer_logprobs

    task, model = tiny_model
    exact = exact_answer_logprobs(model, task)
    assert exact.shape == (2, 13**2) and exact.dtype == torch.float64
    answers = task.all_answers()
    with torch.no_grad():
        for p, prompt in enumerate(task.prompt_ids()):
            inputs = torch.cat([prompt.expand(answers.shape[0], -1), answers], dim=1)
            logp = torch.log_softmax(model(input_ids=inputs).logits.double(), dim=-1)
            per_token = logp[:, 2:-1].gather(-1, answers[..., None]).squeeze(-1)
            torch.testing.assert_close(exact[p], per_token.sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.logsumexp(exact, dim=1), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_answer_logprobs_from_hidden_equal_the_logits_path(tiny_model):
    from flowloss.demo.sequence_model import answer_logprobs, reference_logprobs

    task, model = tiny_model
    seqs = torch.cat([task.prompt_ids(), torch.tensor([[4, 1], [12, 0]])], dim=1)
    fused, hidden = answer_logprobs(model, seqs)
    assert hidden.shape == (2, 5, 16)
    torch.testing.assert_close(fused.detach(), reference_logprobs(model, seqs), rtol=1e-5, atol=1e-6)


def test_sampling_follows_the_enumerated_distribution(tiny_model):
    from flowloss.demo.sequence_model import exact_answer_logprobs, sample_answers

    task, model = tiny_model
    n = 40_000
    draws = sample_answers(model, task.prompt_ids()[:1].expand(n, -1), 2, torch.Generator().manual_seed(0))[:, 3:]
    rows = draws[:, 0] * len(TOKENS) + draws[:, 1]
    freq = torch.bincount(rows, minlength=13**2).double() / n
    p = exact_answer_logprobs(model, task)[0].exp()
    # Each frequency within 5 binomial standard errors of its exact probability.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()

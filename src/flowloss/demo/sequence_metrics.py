"""Exact scores of a policy over an enumerated answer space (``flowloss demo --task sequences``).

Inputs are ``log pi(y | x_p)`` for every prompt ``p`` and answer ``y``, ``[P, S]`` (rows sum to 1 in probability),
and ``correct [P, S]`` bool (reward 1, else 0). Every score is computed per prompt from the exact distribution and
averaged over prompts:

* mean reward ``E_pi[r] = sum_y pi(y) r(y)`` (the probability of a correct answer);
* expected number of distinct correct answers among ``n`` independent samples,
  ``D_n = sum_{y correct} (1 - (1 - pi(y))^n)`` (each correct ``y`` is among the ``n`` draws with probability
  ``1 - (1 - pi(y))^n``), default ``n = 64``;
* the top correct answer's share of the correct mass, ``max_{y correct} pi(y) / sum_{y correct} pi(y)``;
* ``KL(pi || p*)`` to FlowRL's target ``log p*(y) = log pi_ref(y) + beta_seq r(y) - log Z`` (`target_logprobs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DISTINCT_SAMPLES = 64


def expected_distinct(logprobs: torch.Tensor, correct: torch.Tensor, samples: int = DISTINCT_SAMPLES) -> torch.Tensor:
    """``D_n = sum_{y correct} 1 - (1 - pi(y))^n`` per row: ``[P, S], [P, S] -> [P]``.

    Computed as ``-expm1(n log1p(-pi))``, exact for tiny ``pi`` (where ``1 - (1 - pi)^n ~ n pi``).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"`samples` must be an int >= 1, got {samples!r}")
    p = logprobs.exp().clamp(max=1.0)
    seen = -torch.expm1(samples * torch.log1p(-p))
    return torch.where(correct, seen, torch.zeros_like(seen)).sum(dim=-1)


def correct_mass(logprobs: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``sum_{y correct} pi(y)``, the mean reward of 0/1 rewards: ``[P, S] -> [P]``."""
    p = logprobs.exp()
    return torch.where(correct, p, torch.zeros_like(p)).sum(dim=-1)


def top_share(logprobs: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``max_{y correct} pi(y) / sum_{y correct} pi(y)``: ``[P, S] -> [P]`` (1 = a single correct answer)."""
    p = logprobs.exp()
    masked = torch.where(correct, p, torch.zeros_like(p))
    return masked.amax(dim=-1) / masked.sum(dim=-1).clamp_min(torch.finfo(p.dtype).tiny)


def target_logprobs(ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``log p*(y) = log pi_ref(y) + beta r(y) - log Z`` per row, ``Z = sum_y pi_ref(y) exp(beta r(y))``."""
    unnormalized = ref_logprobs + beta * rewards.to(ref_logprobs.dtype)
    return unnormalized - torch.logsumexp(unnormalized, dim=-1, keepdim=True)


def kl_divergence(logprobs: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """``KL(pi || p) = sum_y pi(y) (log pi(y) - log p(y))`` per row (terms with ``pi(y) = 0`` are 0)."""
    p = logprobs.exp()
    terms = torch.where(p > 0, p * (logprobs - log_target), torch.zeros_like(p))
    return terms.sum(dim=-1)


@dataclass(frozen=True)
class SequenceScores:
    """The four exact scores of one policy, each averaged over the prompts."""

    reward: float  # E_pi[r]
    distinct_correct: float  # D_64
    top_share: float  # the top correct answer's share of the correct mass
    kl_target: float  # KL(pi || p*)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def score(
    logprobs: torch.Tensor, correct: torch.Tensor, log_target: torch.Tensor, *, samples: int = DISTINCT_SAMPLES
) -> SequenceScores:
    """All four scores of ``logprobs [P, S]``, averaged over the ``P`` prompts."""
    return SequenceScores(
        reward=float(correct_mass(logprobs, correct).mean()),
        distinct_correct=float(expected_distinct(logprobs, correct, samples).mean()),
        top_share=float(top_share(logprobs, correct).mean()),
        kl_target=float(kl_divergence(logprobs, log_target).mean()),
    )

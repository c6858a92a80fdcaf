"""A small sequence problem whose FlowRL target can be enumerated exactly.

Responses are token sequences ``y = (y_1, ..., y_L)`` over a vocabulary of ``V`` tokens, all of length ``L``
(default ``V = 8``, ``L = 4``: ``V^L = 4096`` sequences). There is one prompt, so ``Z`` is a single number.

* Reference policy ``pi_ref``: a random tabular autoregressive policy,
  ``pi_ref(y_t | y_<t) = softmax(a[y_<t])`` with one logit vector ``a[prefix] ~ N(0, ref_scale^2 I_V)``
  (``ref_scale = 0.5``) per prefix (``1 + V + ... + V^(L-1)`` prefixes).
* Reward: ``M`` modes ``y^(m)`` (pairwise different at every position) with heights ``h_m`` and partial credit
  ``r(y) = max_m h_m * (match_m(y) / L)^2``, ``match_m(y) = #{t : y_t = y^(m)_t}``; so ``r(y^(m)) = h_m``.
* Target (FlowRL, Proposition 1, on sequence-level log-likelihoods):
  ``p*(y) = pi_ref(y) exp(beta r(y)) / Z``, ``Z = sum_y pi_ref(y) exp(beta r(y))``, enumerated exactly.

A policy is a table ``logits [num_prefixes, V]``; `TabularProblem.token_logprobs` gives the ``[N, L]``
token log-probs ``log pi(y_t | y_<t)`` of any batch of sequences (differentiable in the table), and
`TabularProblem.all_sequences` the ``[V^L, L]`` enumeration used for exact KLs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Default mode heights: four good answers of different quality (the best is not the only one worth keeping).
DEFAULT_HEIGHTS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85)


@dataclass(frozen=True)
class TabularProblem:
    """The problem's fixed data (see the module docstring); build it with `make_problem`."""

    vocab_size: int
    length: int
    ref_logits: torch.Tensor  # [num_prefixes, V] float64: the reference policy (and the initial policy)
    modes: torch.Tensor  # [M, L] int64: the high-reward sequences y^(m)
    heights: torch.Tensor  # [M] float64: r(y^(m)) = h_m

    @property
    def num_prefixes(self) -> int:
        """``1 + V + ... + V^(L-1)``: one row of the policy table per prefix ``y_<t``."""
        return sum(self.vocab_size**t for t in range(self.length))

    @property
    def num_sequences(self) -> int:
        return self.vocab_size**self.length

    def prefix_index(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` tokens -> ``[N, L]`` table rows; ``y_<t`` is row ``offset_t + sum_s y_s V^(t-1-s)``."""
        n, length = sequences.shape
        index = torch.empty(n, length, dtype=torch.int64, device=sequences.device)
        code = torch.zeros(n, dtype=torch.int64, device=sequences.device)
        offset = 0
        for t in range(length):
            index[:, t] = offset + code
            code = code * self.vocab_size + sequences[:, t]
            offset += self.vocab_size**t
        return index

    def token_logprobs(self, logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """Per-token ``log pi(y_t | y_<t)``: ``sequences [N, L]`` -> ``[N, L]``."""
        log_p = torch.log_softmax(logits, dim=-1)
        rows = self.prefix_index(sequences)
        return log_p[rows, sequences]

    def sequence_logprobs(self, logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """``log pi(y) = sum_t log pi(y_t | y_<t)``: ``[N, L] -> [N]``."""
        return self.token_logprobs(logits, sequences).sum(dim=-1)

    def all_sequences(self) -> torch.Tensor:
        """Every sequence, ``[V^L, L]`` int64, in lexicographic order."""
        grids = torch.meshgrid(*[torch.arange(self.vocab_size)] * self.length, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=-1)

    def rewards(self, sequences: torch.Tensor) -> torch.Tensor:
        """``r(y) = max_m h_m (match_m(y) / L)^2``: ``[N, L] -> [N]`` float64."""
        matches = (sequences[:, None, :] == self.modes[None, :, :].to(sequences.device)).sum(dim=-1)
        scores = self.heights.to(sequences.device) * (matches.to(torch.float64) / self.length) ** 2
        return scores.amax(dim=-1)

    def mode_index(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64: ``m`` where ``y = y^(m)``, else -1."""
        equal = (sequences[:, None, :] == self.modes[None, :, :]).all(dim=-1)
        hit = equal.any(dim=-1)
        return torch.where(
            hit, equal.to(torch.int64).argmax(dim=-1), torch.full_like(hit, -1, dtype=torch.int64)
        )

    def sample(self, logits: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``num`` sequences ``y ~ pi`` token by token (no gradient): ``[num, L]`` int64."""
        with torch.no_grad():
            log_p = torch.log_softmax(logits.detach(), dim=-1)
            seqs = torch.zeros(num, self.length, dtype=torch.int64)
            code = torch.zeros(num, dtype=torch.int64)
            offset = 0
            for t in range(self.length):
                probs = log_p[offset + code].exp()
                seqs[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                code = code * self.vocab_size + seqs[:, t]
                offset += self.vocab_size**t
            return seqs


@dataclass(frozen=True)
class ExactTarget:
    """``p*`` enumerated over all sequences, with ``log Z`` and the per-mode target masses."""

    sequences: torch.Tensor  # [S, L]
    rewards: torch.Tensor  # [S] float64
    log_target: torch.Tensor  # [S] float64, log p*(y)
    log_z: float  # log sum_y pi_ref(y) exp(beta r(y))
    mode_rows: torch.Tensor  # [M] int64: row of y^(m) in `sequences`
    beta: float

    @property
    def mode_mass(self) -> torch.Tensor:
        """``p*(y^(m))`` for each mode, ``[M]``."""
        return self.log_target[self.mode_rows].exp()

    def reward_std(self) -> float:
        """Standard deviation of ``r(y)`` under ``y ~ p*``."""
        p = self.log_target.exp()
        mean = (p * self.rewards).sum()
        return float(((p * (self.rewards - mean) ** 2).sum()).sqrt())


def exact_target(problem: TabularProblem, beta: float) -> ExactTarget:
    """Enumerate ``log p*(y) = log pi_ref(y) + beta r(y) - log Z`` over all ``V^L`` sequences (float64)."""
    seqs = problem.all_sequences()
    rewards = problem.rewards(seqs)
    unnormalized = problem.sequence_logprobs(problem.ref_logits, seqs) + beta * rewards
    log_z = torch.logsumexp(unnormalized, dim=0)
    # Lexicographic order: row of y is its base-V number.
    powers = problem.vocab_size ** torch.arange(problem.length - 1, -1, -1)
    mode_rows = (problem.modes * powers).sum(dim=-1)
    return ExactTarget(seqs, rewards, unnormalized - log_z, float(log_z), mode_rows, float(beta))


def make_problem(
    *,
    seed: int,
    vocab_size: int = 8,
    length: int = 4,
    heights: tuple[float, ...] = DEFAULT_HEIGHTS,
    ref_scale: float = 0.5,
) -> TabularProblem:
    """Build the problem deterministically from ``seed``: random ``pi_ref`` table and random mode sequences.

    The ``M = len(heights)`` modes use different tokens at every position (needs ``M <= V``), so they are as
    far apart as possible (Hamming distance ``L``) and their partial-credit basins barely overlap.
    """
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"`vocab_size` must be an int >= 2, got {vocab_size!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"`length` must be an int >= 1, got {length!r}")
    if not 1 <= len(heights) <= vocab_size:
        raise ValueError(
            f"`heights` must hold between 1 and vocab_size={vocab_size} values, got {len(heights)}"
        )
    if vocab_size**length > 1 << 20:
        raise ValueError(
            f"vocab_size**length = {vocab_size**length} is too many sequences to enumerate (max 2^20)"
        )
    if not (isinstance(ref_scale, (int, float)) and math.isfinite(ref_scale) and ref_scale >= 0):
        raise ValueError(f"`ref_scale` must be a finite number >= 0, got {ref_scale!r}")
    gen = torch.Generator().manual_seed(int(seed))
    num_prefixes = sum(vocab_size**t for t in range(length))
    ref_logits = ref_scale * torch.randn(num_prefixes, vocab_size, generator=gen, dtype=torch.float64)
    columns = [torch.randperm(vocab_size, generator=gen)[: len(heights)] for _ in range(length)]
    modes = torch.stack(columns, dim=-1)
    return TabularProblem(vocab_size, length, ref_logits, modes, torch.tensor(heights, dtype=torch.float64))

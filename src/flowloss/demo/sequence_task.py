"""The task of ``flowloss demo --task sequences``: write ``L`` digits that add up to ``s``.

Vocabulary (``V = 13`` tokens, id = position in `TOKENS`): the digits ``0``-``9`` (id = the digit), ``=``,
``<pad>`` and ``<eos>``. A prompt is the target sum written with two digits and ``=`` (``"13="`` is the token
ids ``[1, 3, 10]``); an answer is any ``L`` tokens (default ``L = 3``), and it is correct (reward 1) when all
``L`` are digits and they add up to ``s``, otherwise wrong (reward 0)::

    r(s, y) = 1[y_1..y_L are digits and y_1 + ... + y_L = s]

Many answers are correct (``"13="``: 75 of the 1000 digit strings, ``"490"``, ``"526"``, ...), and the whole
answer space (``V^L = 2197`` sequences per prompt) is small enough to enumerate, so the demo can score a model
exactly (`flowloss.demo.sequence_model.exact_answer_logprobs`).

The supervised warm start that makes the reference ``pi_ref`` is deliberately skewed (`warm_start_answers`): for
each prompt it favours a few correct answers over the rest (Zipf weights over a random order of the correct
answers) and mixes in some wrong digit strings, so ``pi_ref`` is a plausible, imperfect, unevenly spread model of
the task, as a pretrained LLM is of a reasoning task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKENS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "=", "<pad>", "<eos>")
EQUALS_ID, PAD_ID, EOS_ID = 10, 11, 12
NUM_DIGITS = 10
PROMPT_LENGTH = 3  # two digits of s, then "="
DEFAULT_SUMS: tuple[int, ...] = (10, 11, 12, 13, 14, 15, 16, 17)


@dataclass(frozen=True)
class DigitSumTask:
    """``P`` prompts (one per target sum in ``sums``), answers of ``answer_length`` tokens over `TOKENS`."""

    sums: tuple[int, ...] = DEFAULT_SUMS
    answer_length: int = 3

    def __post_init__(self) -> None:
        length = self.answer_length
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 4:
            raise ValueError(f"`answer_length` must be an int in [1, 4] (V^L answers are enumerated), got {length!r}")
        if not self.sums:
            raise ValueError("`sums` must hold at least one target sum, got ()")
        top = min(99, 9 * length)
        bad = [s for s in self.sums if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= top]
        if bad:
            raise ValueError(f"`sums` must be ints in [0, {top}] (reachable with {length} digits), got {bad}")
        if len(set(self.sums)) != len(self.sums):
            raise ValueError(f"`sums` must be distinct, got {self.sums}")

    @property
    def vocab_size(self) -> int:
        return len(TOKENS)

    @property
    def num_prompts(self) -> int:
        return len(self.sums)

    @property
    def num_answers(self) -> int:
        """``V^L``: every token sequence of the answer length, correct or not."""
        return self.vocab_size**self.answer_length

    def prompt_text(self, s: int) -> str:
        return f"{s:02d}="

    def prompt_ids(self) -> torch.Tensor:
        """``[P, 3]`` int64: ``(tens digit, ones digit, "=")`` per prompt."""
        return torch.tensor([[s // 10, s % 10, EQUALS_ID] for s in self.sums], dtype=torch.int64)

    def sum_of_prompt(self) -> torch.Tensor:
        """``[P]`` int64: the target sum of each prompt."""
        return torch.tensor(self.sums, dtype=torch.int64)

    def all_answers(self) -> torch.Tensor:
        """Every answer, ``[V^L, L]`` int64, in lexicographic order (row of ``y`` = its base-``V`` number)."""
        grids = torch.meshgrid(*[torch.arange(self.vocab_size)] * self.answer_length, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=-1)

    def rewards(self, sums: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """``r = 1[all digits and sum = s]``: ``sums [N]``, ``answers [N, L]`` -> ``[N]`` float32 in {0, 1}."""
        digits = (answers >= 0) & (answers < NUM_DIGITS)
        total = torch.where(digits, answers, 0).sum(dim=-1)
        return (digits.all(dim=-1) & (total == sums)).to(torch.float32)

    def correct_table(self) -> torch.Tensor:
        """``[P, V^L]`` bool: which answers are correct for each prompt."""
        answers = self.all_answers()
        sums = self.sum_of_prompt()
        return torch.stack([self.rewards(s.expand(answers.shape[0]), answers) > 0 for s in sums])

    def decode_answer(self, text: str) -> list[int] | None:
        """A completion as TRL hands it over (decoded text) -> its tokens, or None if it holds a non-token."""
        chars = text.replace(" ", "")
        if any(c not in TOKENS[:EQUALS_ID + 1] for c in chars):
            return None
        return [TOKENS.index(c) for c in chars]

    def text_reward(self, prompt: str, completion: str) -> float:
        """The reward of a decoded ``completion`` to ``prompt`` (``"13="``): special tokens are skipped by the
        decoder, so a completion that held one is shorter than ``L`` and wrong."""
        s = int(prompt.replace(" ", "").rstrip("="))
        tokens = self.decode_answer(completion)
        if tokens is None or len(tokens) != self.answer_length:
            return 0.0
        return float(self.rewards(torch.tensor([s]), torch.tensor([tokens]))[0])


def warm_start_answers(
    task: DigitSumTask, num: int, *, zipf: float, wrong_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """The skewed supervised data: ``num`` answers per prompt, ``[P * num, 3 + L]`` prompt+answer token ids.

    Per prompt, a random order of its correct answers gets Zipf weights ``w_k = k^-zipf`` (``k = 1, 2, ...``);
    a fraction ``1 - wrong_fraction`` of the rows are correct answers drawn with these weights, the rest digit
    strings with the wrong sum, drawn uniformly.
    """
    if not 0.0 <= wrong_fraction < 1.0:
        raise ValueError(f"`wrong_fraction` must be in [0, 1), got {wrong_fraction!r}")
    if zipf < 0:
        raise ValueError(f"`zipf` must be >= 0, got {zipf!r}")
    answers = task.all_answers()
    digit_only = (answers < NUM_DIGITS).all(dim=-1)
    correct = task.correct_table()
    prompts = task.prompt_ids()
    rows = []
    num_correct = round(num * (1.0 - wrong_fraction))
    for p in range(task.num_prompts):
        good = correct[p].nonzero().squeeze(-1)
        good = good[torch.randperm(good.numel(), generator=generator)]
        weights = torch.arange(1, good.numel() + 1, dtype=torch.float64) ** -zipf
        picked = good[torch.multinomial(weights, num_correct, replacement=True, generator=generator)]
        bad = (digit_only & ~correct[p]).nonzero().squeeze(-1)
        picked_bad = bad[torch.randint(bad.numel(), (num - num_correct,), generator=generator)]
        chosen = answers[torch.cat([picked, picked_bad])]
        rows.append(torch.cat([prompts[p].expand(num, -1), chosen], dim=-1))
    return torch.cat(rows)

"""The public API's types that mypy cannot see yet (tests/test_typing.py: each ``# pending: <what>`` line is a mypy
error today, and no other line may be; the xfail test of ``<what>`` passes once that is typed: then the markers go
and the lines join public_api.py).

- ``token_logprobs``, ``from_hidden`` (``token_logprobs_from_hidden``): no ``typing.overload`` on
  ``return_entropy``, so every call is typed ``Tensor | tuple[Tensor, Tensor]``;
"""

from __future__ import annotations

import torch

from flowloss import token_logprobs, token_logprobs_from_hidden

Stats = dict[str, torch.Tensor]


def logprobs_only(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logprobs(logits, labels)  # pending: token_logprobs


def with_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return token_logprobs(logits, labels, return_entropy=True)  # pending: token_logprobs


def hidden_only(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logprobs_from_hidden(hidden, weight, labels)  # pending: from_hidden


def hidden_with_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return token_logprobs_from_hidden(hidden, weight, labels, return_entropy=True)  # pending: from_hidden

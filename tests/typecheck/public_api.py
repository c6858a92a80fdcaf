"""What a user's type checker sees of flowloss's public API: tests/test_typing.py runs mypy --strict on this file
(it must report nothing) and runs it (the types asserted here are the types returned).

`assert_type` fails the type check when a call's static type is not exactly the one written; the names come
from ``import flowloss`` as a user writes them.
"""

from __future__ import annotations

import torch
from typing_extensions import assert_type

from flowloss import (
    FlowRLOptions,
    LogZHead,
    TrajectoryBalanceLoss,
    token_logprobs,
    token_logprobs_from_hidden,
    trajectory_balance_loss,
)

Stats = dict[str, torch.Tensor]
Either = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # token_logprobs' return type for either return_entropy
B, T, H, V = 4, 6, 8, 11  # sequences, response tokens, hidden size, vocabulary


def batch() -> tuple[torch.Tensor, ...]:
    """``(logprobs [B, T], ref_logprobs [B, T], rewards [B], log_z [B], mask [B, T])``."""
    logprobs = (-torch.rand(B, T)).requires_grad_(True)
    return logprobs, -torch.rand(B, T), torch.randn(B), torch.zeros(B, requires_grad=True), torch.rand(B, T) > 0.2


def loss_of(logprobs: torch.Tensor, ref: torch.Tensor, rewards: torch.Tensor, log_z: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    return trajectory_balance_loss(logprobs, ref, rewards, log_z, mask, beta=15.0)  # a Tensor, not Any


def main() -> None:
    logprobs, ref, rewards, log_z, mask = batch()

    loss = trajectory_balance_loss(logprobs, ref, rewards, log_z, mask)
    assert_type(loss, torch.Tensor)
    loss.backward()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0

    loss, stats = trajectory_balance_loss(logprobs, ref, rewards, log_z, mask, return_stats=True)
    assert_type(loss, torch.Tensor)
    assert_type(stats, Stats)
    assert isinstance(stats, dict) and all(isinstance(v, torch.Tensor) for v in stats.values())
    assert isinstance(loss_of(logprobs, ref, rewards, log_z, mask), torch.Tensor)

    module = TrajectoryBalanceLoss(FlowRLOptions(beta=15.0))
    assert_type(module.options, FlowRLOptions)
    assert_type(module.forward(logprobs, ref, rewards, log_z, mask), torch.Tensor)
    module_loss, module_stats = module.forward(logprobs, ref, rewards, log_z, mask, return_stats=True)
    assert_type(module_loss, torch.Tensor)
    assert_type(module_stats, Stats)
    # module(...) has forward's types (torch types nn.Module.__call__ as returning Any; flowloss's modules do not)
    assert_type(module(logprobs, ref, rewards, log_z, mask), torch.Tensor)
    call_loss, call_stats = module(logprobs, ref, rewards, log_z, mask, return_stats=True)
    assert_type(call_loss, torch.Tensor)
    assert_type(call_stats, Stats)
    assert isinstance(module(logprobs, ref, rewards, log_z, mask), torch.Tensor)

    head = LogZHead(H)
    assert_type(head, LogZHead)

    # token_logprobs / token_logprobs_from_hidden: one return type for both values of return_entropy (no overload
    # on it yet; tests/typecheck/pending_overloads.py holds the precise types): a Tensor or a (logp, H) pair.
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    lp: Either = token_logprobs(logits, labels, temperature=0.7)
    lp_h: Either = token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    fused: Either = token_logprobs_from_hidden(hidden, weight, labels, temperature=0.7)
    fused_h: Either = token_logprobs_from_hidden(hidden, weight, labels, temperature=0.7, return_entropy=True)
    assert isinstance(lp, torch.Tensor) and lp.shape == (B, T)
    assert isinstance(fused, torch.Tensor) and fused.shape == (B, T)
    for pair in (lp_h, fused_h):
        assert isinstance(pair, tuple) and [t.shape for t in pair] == [(B, T), (B, T)]


if __name__ == "__main__":
    main()

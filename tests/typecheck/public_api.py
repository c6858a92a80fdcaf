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

    # token_logprobs / token_logprobs_from_hidden: a Tensor, or a (log-probs, entropy) pair with return_entropy=True;
    # a bool known only at run time gives the union.
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    lp = token_logprobs(logits, labels, temperature=0.7)
    assert_type(lp, torch.Tensor)
    lp_h, entropy = token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    assert_type(entropy, torch.Tensor)
    fused = token_logprobs_from_hidden(hidden, weight, labels, temperature=0.7)
    assert_type(fused, torch.Tensor)
    fused_h, fused_entropy = token_logprobs_from_hidden(hidden, weight, labels, temperature=0.7, return_entropy=True)
    assert_type(fused_entropy, torch.Tensor)
    decided_later = bool(torch.rand(()) < 2.0)
    either = token_logprobs(logits, labels, return_entropy=decided_later)
    assert_type(either, torch.Tensor | tuple[torch.Tensor, torch.Tensor])
    for t in (lp, lp_h, entropy, fused, fused_h, fused_entropy):
        assert isinstance(t, torch.Tensor) and t.shape == (B, T)
    assert isinstance(either, tuple)


if __name__ == "__main__":
    main()

"""The loss call: one TRL GRPO micro-batch -> `flowloss.trajectory_balance_loss`."""

from __future__ import annotations

from typing import Any

import torch

from flowloss import FlowRLOptions, TrajectoryBalanceLoss
from flowloss.adapters.trl.config import FlowRLConfig

__all__ = ["NUM_SEQUENCES_KEY", "flowrl_loss_from_grpo_inputs"]

# Valid sequences in the whole generation batch, over all processes (a 0-dim tensor added to TRL's batch).
NUM_SEQUENCES_KEY = "flowrl_num_sequences"


def flowrl_loss_from_grpo_inputs(
    per_token_logps: torch.Tensor,
    log_z: torch.Tensor,
    inputs: dict[str, Any],
    options: FlowRLOptions | FlowRLConfig,
    *,
    normalizer: torch.Tensor | float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FlowRL's loss on one TRL GRPO micro-batch: a direct call of `flowloss.trajectory_balance_loss`.

    ``per_token_logps [B, T]`` (the policy's completion log-probs, with gradient), ``log_z [B]`` (with
    gradient), ``inputs`` TRL's batch: ``completion_mask [B, T]`` (times ``tool_mask`` when present),
    ``advantages [B]`` (= ``r_hat``), ``ref_per_token_logps [B, T]``, optionally
    ``old_per_token_logps [B, T]``. ``options``: the loss options (or a `FlowRLConfig`). Returns
    ``(loss, stats)``.
    """
    if isinstance(options, FlowRLConfig):
        options = options.flowrl_options
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
    ref = inputs.get("ref_per_token_logps")
    if ref is None:
        raise KeyError(
            "TRL's batch has no `ref_per_token_logps`: FlowRL needs the reference policy's log-probs. "
            "Use FlowRLTrainer (it makes TRL compute them) or add them to the batch."
        )
    advantages = inputs["advantages"]
    if advantages.dim() != 1:
        raise ValueError(
            f"`advantages` must be one value per completion ([B]) for FlowRL's r_hat, got shape "
            f"{tuple(advantages.shape)}"
        )
    old = inputs.get("old_per_token_logps")
    # on-policy: w = 1 exactly, nothing to clip or mask
    on_policy: dict[str, Any] = {} if old is not None else {"importance_weights": "none", "token_clip_mask": False}
    return TrajectoryBalanceLoss(options)(  # holds the validated options object as is
        per_token_logps,
        ref,
        advantages if advantages.is_floating_point() else advantages.float(),
        log_z,
        mask,
        old_logprobs=old,
        rollout_logprobs=rollout_logprobs if old is not None else None,
        normalizer=normalizer,
        return_stats=True,
        **on_policy,
    )

"""`FlowRLPolicyLoss`: OpenRLHF's ``PolicyLoss`` call translated into `flowloss.TrajectoryBalanceLoss`.

``ActorPPOTrainer.training_step`` (openrlhf 0.11) calls ``self.actor_loss_fn(log_probs, old_log_probs, advantages,
action_mask=, rollout_log_probs=, dp_size=, batch_num_tokens=, global_batch_size=)`` and expects ``(loss,
clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. Per micro-batch of ``B`` sequences and ``A`` response positions::

    delta_i = log Z_phi(x_i) + mean_t log pi_theta(y_it) - beta * r_hat_i - mean_t log pi_ref(y_it)
    loss    = sum_i w_i delta_i^2 / (global_batch_size / dp_size)

``global_batch_size`` is OpenRLHF's count of non-empty sequences in the optimizer step (all micro-batches and
data-parallel ranks, divided by the accumulation steps); dividing by ``dp_size`` undoes DeepSpeed's gradient
averaging, so micro-batches and ranks add up to the gradient of one mean over the step. No OpenRLHF import here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from flowloss import TrajectoryBalanceLoss, masked_mean, masked_sum
from flowloss.adapters.common import global_normalizer
from flowloss.adapters.openrlhf.config import FlowRLConfig

__all__ = ["FlowRLPolicyLoss"]


@dataclass
class _MicroBatch:
    ref_log_probs: torch.Tensor
    log_z: torch.Tensor | Callable[[], torch.Tensor]
    rewards: torch.Tensor | None


class FlowRLPolicyLoss(nn.Module):
    """Drop-in for ``openrlhf.models.loss.PolicyLoss``: same call, same 5-tuple, FlowRL's objective.

    The PolicyLoss call carries neither ``log pi_ref`` nor ``log Z``; supply them for each micro-batch with
    `micro_batch` (``FlowRLActorPPOTrainer.training_step`` does)::

        with loss_fn.micro_batch(ref_log_probs=exp.base_action_log_probs, log_z=log_z):
            loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = loss_fn(
                log_probs, exp.action_log_probs, exp.advantages, action_mask=exp.action_mask,
                rollout_log_probs=exp.rollout_log_probs, **loss_batch_info)

    ``log_z`` may be a ``[B]`` tensor or a zero-argument callable evaluated inside the call (after the actor's
    forward has produced the hidden states it needs). Returns ``loss`` (0-dim float32), ``clip_ratio``
    (fraction of sequences whose weight was clipped), ``ppo_kl`` (token mean of ``log pi_old - log pi_theta``,
    as OpenRLHF), and ``vllm_kl`` / ``is_filter_ratio`` (token mean of ``log pi_rollout - log pi_old`` and the
    fraction of sequences whose TIS factor hit ``tis_cap``) when rollout log-probs are used, else ``None``.
    The detached diagnostics of the last call are in `last_stats`.
    """

    def __init__(self, config: FlowRLConfig | None = None) -> None:
        super().__init__()
        self.config = FlowRLConfig.from_any(config)
        self.tb_loss = TrajectoryBalanceLoss(self.config.loss)  # the options, validated once, held as one object
        self._batch: _MicroBatch | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def micro_batch(
        self,
        *,
        ref_log_probs: torch.Tensor,
        log_z: torch.Tensor | Callable[[], torch.Tensor],
        rewards: torch.Tensor | None = None,
    ) -> Iterator[FlowRLPolicyLoss]:
        """Bind ``ref_log_probs [B, A]``, ``log_z [B]`` (or a callable) and, for ``reward_source="rewards"``,
        ``rewards [B]`` to the calls made inside the ``with`` block."""
        if not isinstance(ref_log_probs, torch.Tensor):
            raise TypeError(
                "`ref_log_probs` must be a [B, A] tensor (OpenRLHF's Experience.base_action_log_probs), got "
                f"{type(ref_log_probs).__name__}; OpenRLHF keeps it only with --algo.kl.init_coef > 0 and "
                "--algo.kl.use_loss"
            )
        if self.config.reward_source == "rewards" and rewards is None:
            raise ValueError("`rewards` is required with reward_source='rewards' (Experience.rewards, [B])")
        self._batch = _MicroBatch(ref_log_probs, log_z, rewards)
        try:
            yield self
        finally:
            self._batch = None

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        del batch_num_tokens  # FlowRL's loss is a mean over sequences, never over tokens
        if self._batch is None:
            raise RuntimeError(
                "FlowRLPolicyLoss needs the micro-batch's reference log-probs and log Z: call it inside "
                "`with loss_fn.micro_batch(ref_log_probs=..., log_z=...)` (FlowRLActorPPOTrainer does this)"
            )
        cfg = self.config
        if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2:
            got = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
            raise ValueError(f"`log_probs` must be a [B, A] tensor of action log-probs, got {got}")
        mask = action_mask if action_mask is not None else torch.ones_like(log_probs, dtype=torch.bool)
        rewards: torch.Tensor
        if cfg.reward_source == "rewards" and self._batch.rewards is not None:  # micro_batch requires them
            rewards = self._batch.rewards
        elif isinstance(advantages, torch.Tensor) and advantages.shape == log_probs.shape:
            rewards = masked_mean(advantages, mask)
        elif isinstance(advantages, torch.Tensor) and advantages.shape == log_probs.shape[:1]:
            rewards = advantages
        else:
            got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
            raise ValueError(
                f"`advantages` must have shape {tuple(log_probs.shape)} or ({log_probs.shape[0]},), got {got}"
            )
        log_z = self._batch.log_z() if callable(self._batch.log_z) else self._batch.log_z
        rollout = rollout_log_probs if cfg.rollout_tis else None
        normalizer = None if global_batch_size is None else global_normalizer(global_batch_size, int(dp_size))
        loss, stats = self.tb_loss(
            log_probs,
            self._batch.ref_log_probs,
            rewards,
            log_z,
            mask,
            old_logprobs=old_log_probs,
            rollout_logprobs=rollout,
            normalizer=normalizer,
            return_stats=True,
        )
        self.last_stats = stats
        m = mask.bool()
        tokens = m.sum().clamp_min(1)
        clip_ratio = stats.get("clip_frac", torch.zeros((), device=log_probs.device))
        ppo_kl = masked_sum(old_log_probs.detach() - log_probs.detach(), m).sum() / tokens
        vllm_kl = is_filter_ratio = None
        if rollout is not None:
            vllm_kl = masked_sum(rollout.detach() - old_log_probs.detach(), m).sum() / tokens
            agg = masked_mean if cfg.loss.importance_weights == "geometric_clipped" else masked_sum
            capped = agg(old_log_probs.detach() - rollout.detach(), m) > math.log(cfg.loss.tis_cap)
            valid = m.any(dim=-1)
            is_filter_ratio = (capped & valid).sum() / valid.sum().clamp_min(1)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

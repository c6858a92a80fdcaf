"""`FlowRLActorPPOTrainer`: OpenRLHF's ``ActorPPOTrainer`` with FlowRL's loss, log Z and log-prob path.

``training_step`` binds what OpenRLHF's ``PolicyLoss`` call lacks - ``Experience.base_action_log_probs``
(``log pi_ref [B, A]``) and ``log Z(x) [B]`` - to `FlowRLPolicyLoss`, drops OpenRLHF's KL loss unless
``kl_loss``, and logs the loss's diagnostics as ``flowrl_*``. ``log Z(x_i)`` is the head applied to the
decoder's last hidden states of the prompt (positions before the response, attention mask on), mean-pooled;
the states come from a forward hook on the decoder during the training forward, so gradients flow from the
head into the LLM. With ``--ds.packing_samples`` the decoder runs on the packed ``[1, N, H]`` layout and the
states are scattered back to ``[B, S, H]`` first. The actor's log-probs take the path ``--flowrl.logprobs``
(`flowloss.adapters.openrlhf.logprobs`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

from flowloss import pool_prompt_hidden_states
from flowloss.adapters.common import HiddenStateCapture, find_log_z_head, log_z_head_detached
from flowloss.adapters.openrlhf.config import EMA_ERROR, ENTROPY_ERROR, RING_ATTENTION_ERROR, FlowRLConfig
from flowloss.adapters.openrlhf.logprobs import use_flowrl_logprobs
from flowloss.adapters.openrlhf.loss import FlowRLPolicyLoss

__all__ = ["FlowRLActorPPOTrainer", "enable_flowrl", "unpack_hidden_states"]

def unpack_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Packed ``[1, N, H]`` hidden states (OpenRLHF's ``--ds.packing_samples`` layout: the ``N`` positions where
    ``attention_mask [B, S]`` is set, row by row) -> ``[B, S, H]``, zeros at padding; differentiable."""
    batch, seqlen = attention_mask.shape
    flat = attention_mask.reshape(-1).bool()
    positions = flat.nonzero().squeeze(-1)  # one host sync, as OpenRLHF's own unpadding has
    if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != positions.numel():
        raise ValueError(
            f"packed decoder hidden states {tuple(hidden.shape)} do not match the {positions.numel()} attended "
            f"positions of the attention mask {tuple(attention_mask.shape)}"
        )
    out = hidden.new_zeros(batch * seqlen, hidden.shape[-1]).index_copy(0, positions, hidden[0])
    return out.view(batch, seqlen, hidden.shape[-1])


class FlowRLActorPPOTrainer(ActorPPOTrainer):
    """``ActorPPOTrainer`` with FlowRL's loss: same constructor plus ``flowrl=FlowRLConfig(...)``.

    The head must already be on ``actor.model`` and in ``actor_optim`` (`attach_log_z_head` before
    ``strategy.prepare``). To convert a trainer OpenRLHF built, use `enable_flowrl`.
    """

    flowrl: FlowRLConfig
    actor_loss_fn: FlowRLPolicyLoss

    def __init__(
        self, *args: Any, flowrl: FlowRLConfig | dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, FlowRLConfig.from_any(flowrl))

    def _log_z(self, experience: Any) -> torch.Tensor:
        hidden = self._flowrl_hidden.pop()
        attention = experience.attention_mask
        if getattr(self.actor, "packing_samples", False):
            hidden = unpack_hidden_states(hidden, attention)
        if hidden.dim() != 3 or hidden.shape[:2] != attention.shape:
            raise ValueError(
                f"decoder hidden states {tuple(hidden.shape)} do not match the sequences {tuple(attention.shape)}"
            )
        prompt_len = attention.shape[1] - experience.action_mask.shape[1]
        positions = torch.arange(attention.shape[1], device=attention.device)
        prompt_mask = attention.bool() & (positions < prompt_len)
        pooled = pool_prompt_hidden_states(
            hidden, prompt_mask, drop_last_token=self.flowrl.log_z_head.drop_last_prompt_token
        )
        return self._flowrl_head(pooled)

    def training_step(
        self, experience: Any, kl_ctl: float, step: int, loss_batch_info: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        ref = experience.base_action_log_probs
        if ref is None:
            raise ValueError(
                "FlowRL needs the reference log-probs but Experience.base_action_log_probs is None: run "
                "OpenRLHF with --algo.kl.init_coef > 0 (creates the reference model) and --algo.kl.use_loss "
                "(keeps its log-probs and keeps the KL out of the reward)"
            )
        rewards = experience.rewards if self.flowrl.reward_source == "rewards" else None
        self._flowrl_hidden.start()
        try:
            with self.actor_loss_fn.micro_batch(
                ref_log_probs=ref, log_z=lambda: self._log_z(experience), rewards=rewards
            ):
                status = super().training_step(
                    experience, kl_ctl if self.flowrl.kl_loss else 0.0, step, loss_batch_info
                )
        finally:
            self._flowrl_hidden.stop()
            self._flowrl_hidden.clear()
        for key, value in self.actor_loss_fn.last_stats.items():
            if key != "valid_sequences":
                status["metrics"][f"flowrl_{key}"] = value.detach().float()
                status["weights"][f"flowrl_{key}"] = "sample"
        return status

    def broadcast_to_vllm(self) -> None:
        with log_z_head_detached(self.actor.model):
            super().broadcast_to_vllm()


def _setup(trainer: ActorPPOTrainer, config: FlowRLConfig) -> None:
    args = getattr(trainer, "args", None)
    if getattr(getattr(trainer, "strategy", None), "ring_attn_group", None) is not None:
        raise ValueError(RING_ATTENTION_ERROR)
    if getattr(trainer, "ema_model", None) is not None:
        raise ValueError(EMA_ERROR)
    entropy_coef = getattr(getattr(args, "actor", None), "entropy_coef", None)
    if entropy_coef:
        raise ValueError(ENTROPY_ERROR.format(entropy_coef))
    trainer.flowrl = config
    trainer.actor_loss_fn = FlowRLPolicyLoss(config)
    trainer._flowrl_head = find_log_z_head(trainer.actor.model)
    optim = trainer.actor_optim
    # DeepSpeed's ZeRO optimizers hold flat copies of the parameters: only a plain optimizer can be checked.
    if isinstance(optim, torch.optim.Optimizer):
        owned = {id(p) for group in optim.param_groups for p in group["params"]}
        if not all(id(p) in owned for p in trainer._flowrl_head.parameters()):
            raise ValueError(
                "the log-Z head's parameters are not in `actor_optim`: attach the head before the optimizer "
                "is built (attach_log_z_head before strategy.prepare)"
            )
    previous = getattr(trainer, "_flowrl_hidden", None)
    if previous is not None:  # converted twice: one hook
        previous.remove()
    trainer._flowrl_hidden = HiddenStateCapture(trainer.actor.model)
    trainer.flowrl_logprobs = use_flowrl_logprobs(trainer.actor, config.logprobs)


def enable_flowrl(
    trainer: ActorPPOTrainer, config: FlowRLConfig | dict[str, Any] | None = None
) -> FlowRLActorPPOTrainer:
    """Turn an ``ActorPPOTrainer`` OpenRLHF already built into a `FlowRLActorPPOTrainer`, in place (its actor
    computes log-probs on ``config.logprobs`` from then on)."""
    if not isinstance(trainer, ActorPPOTrainer):
        raise TypeError(f"`trainer` must be an openrlhf ActorPPOTrainer, got {type(trainer).__name__}")
    trainer.__class__ = FlowRLActorPPOTrainer
    _setup(trainer, FlowRLConfig.from_any(config))
    return cast(FlowRLActorPPOTrainer, trainer)  # its class was swapped above

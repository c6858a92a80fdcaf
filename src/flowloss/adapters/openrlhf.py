"""FlowRL in OpenRLHF (``openrlhf>=0.11``): a ``PolicyLoss`` twin, a trainer subclass and a launcher.

OpenRLHF has no loss registry. ``ActorPPOTrainer.training_step`` runs the actor forward and calls
``self.actor_loss_fn(log_probs, old_log_probs, advantages, action_mask=, rollout_log_probs=, dp_size=,
batch_num_tokens=, global_batch_size=)`` which must return ``(loss, clip_ratio, ppo_kl, vllm_kl,
is_filter_ratio)``. This module translates that call into `flowloss.trajectory_balance_loss`::

    delta_i = log Z_phi(x_i) + mean_t log pi_theta(y_it) - beta * r_hat_i - mean_t log pi_ref(y_it)
    loss    = sum_i w_i delta_i^2 / (global_batch_size / dp_size)

with, per micro-batch of ``B`` sequences and ``A`` response positions:

* ``log pi_theta`` ``[B, A]``: the ``action_log_probs`` of the training forward (with gradient);
* ``log pi_old`` ``[B, A]``: ``Experience.action_log_probs`` (importance weights ``w``, detached);
* ``log pi_ref`` ``[B, A]``: ``Experience.base_action_log_probs`` (kept by OpenRLHF only with
  ``--algo.kl.init_coef > 0 --algo.kl.use_loss``);
* ``r_hat`` ``[B]``: the masked token mean of ``advantages`` ``[B, A]`` (with ``--algo.advantage.estimator
  group_norm`` and no KL in the reward this is the group z-scored reward, constant over a response, which is
  what the FlowRL recipe feeds in), or ``Experience.rewards`` with ``reward_source="rewards"``;
* ``log Z(x)`` ``[B]``: a `flowloss.LogZHead` registered as a submodule of the HF model ``actor.model``
  (so DeepSpeed optimizes and checkpoints it), fed the prompt's last-layer hidden states, mean-pooled over the
  prompt tokens (`flowloss.pool_prompt_hidden_states`) and captured by a forward hook on the decoder;
* the normalizer ``global_batch_size / dp_size``: OpenRLHF's count of non-empty sequences in the whole
  optimizer step (all micro-batches, all data-parallel ranks, divided by the accumulation steps), divided
  by ``dp_size`` to undo DeepSpeed's gradient averaging. Micro-batches and ranks then add up to the gradient
  of one mean over the step, exactly like OpenRLHF's own per-sample ``aggregate_loss``.

Public pieces: `FlowRLConfig`, `FlowRLPolicyLoss`, `FlowRLActorPPOTrainer`,
`enable_flowrl`, `attach_log_z_head`, `find_log_z_head`, `log_z_head_detached`,
`FlowRLPolicyModelActor` (the Ray actor) and `main` (``python -m flowloss.adapters.openrlhf``,
OpenRLHF's ``train_ppo_ray`` with FlowRL swapped in). See ``docs/adapters/openrlhf.md``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from flowloss import masked_mean, masked_sum, pool_prompt_hidden_states, trajectory_balance_loss
from flowloss.adapters.common import (
    AdapterConfig,
    Extra,
    HiddenStateCapture,
    attach_log_z_head,
    find_log_z_head,
    global_normalizer,
    log_z_head_detached,
)

try:
    import ray
    from openrlhf.models import Actor
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor
except ImportError as exc:  # pragma: no cover - exercised only without openrlhf
    raise ImportError(
        "flowloss.adapters.openrlhf needs OpenRLHF (from a clone: pip install -e '.[openrlhf]'): " + str(exc)
    ) from exc

RewardSource = Literal["advantages", "rewards"]

__all__ = [
    "FlowRLActorPPOTrainer",
    "FlowRLConfig",
    "FlowRLPolicyLoss",
    "FlowRLPolicyModelActor",
    "attach_log_z_head",
    "enable_flowrl",
    "find_log_z_head",
    "log_z_head_detached",
    "main",
]


class FlowRLConfig(AdapterConfig):
    """FlowRL options for OpenRLHF: ``loss`` (`flowloss.FlowRLOptions`), ``log_z_head``
    (`flowloss.adapters.common.LogZHeadOptions`) and OpenRLHF's own three.

    Flat names (``FlowRLConfig(beta=15.0)``, ``--flowrl.<name> <value>`` on the launcher): the loss's and the
    head's (see `flowloss.adapters.common`), and

    * ``rollout_tis`` (true): multiply ``w`` by ``min(pi_old / pi_rollout, tis_cap)`` when OpenRLHF passes
      vLLM's log-probs (it does with ``--algo.advantage.is_correction_level token|seq``);
    * ``reward_source`` (``"advantages"``): ``r_hat`` = masked mean of OpenRLHF's advantages (use the
      ``group_norm`` estimator), or ``"rewards"``: ``Experience.rewards`` as given (e.g. already scaled);
    * ``kl_loss`` (false): keep OpenRLHF's ``--algo.kl.use_loss`` term in the loss (FlowRL's residual already
      holds ``log pi_ref``; the authors train with the KL loss off).
    """

    EXTRAS: ClassVar[dict[str, Extra]] = {
        "rollout_tis": Extra(True, "truncated IS against vLLM's log-probs when OpenRLHF passes them (true)"),
        "reward_source": Extra("advantages", "r_hat: masked mean of the advantages (group_norm), or "
                               "Experience.rewards as given", ("advantages", "rewards")),
        "kl_loss": Extra(False, "keep OpenRLHF's --algo.kl.use_loss KL term in the loss (false)"),
    }
    RENAMED: ClassVar[dict[str, str]] = {"drop_last_prompt_token": "log_z_drop_last_prompt_token"}
    REMOVED: ClassVar[dict[str, str]] = {
        "head_name": "the head is always the HF model's `flowrl_log_z_head` submodule (one name in every adapter)"
    }
    rollout_tis: bool
    reward_source: RewardSource
    kl_loss: bool


# ----------------------------------------------------------------------------------------------------
# The loss: OpenRLHF's PolicyLoss call signature, flowloss's trajectory balance inside.


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
        if cfg.reward_source == "rewards":
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
        loss, stats = trajectory_balance_loss(
            log_probs,
            self._batch.ref_log_probs,
            rewards,
            log_z,
            mask,
            old_logprobs=old_log_probs,
            rollout_logprobs=rollout,
            normalizer=normalizer,
            return_stats=True,
            **cfg.loss.to_dict(),
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


# ----------------------------------------------------------------------------------------------------
# The log-Z head on the HF model, and the prompt's hidden states.


# ----------------------------------------------------------------------------------------------------
# The trainer.


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
        if hidden.dim() != 3 or hidden.shape[:2] != attention.shape:
            raise ValueError(
                f"decoder hidden states {tuple(hidden.shape)} do not match the sequences "
                f"{tuple(attention.shape)}; packed samples (--ds.packing_samples) and ring attention are not "
                "supported by the FlowRL adapter"
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


_ENTROPY_ERROR = (
    "--actor.entropy_coef {!r}: OpenRLHF would subtract an entropy bonus from the FlowRL loss, which changes the "
    "objective (FlowRL's diversity comes from the trajectory-balance target itself); leave --actor.entropy_coef "
    "unset or 0"
)


def _setup(trainer: ActorPPOTrainer, config: FlowRLConfig) -> None:
    args = getattr(trainer, "args", None)
    ds = getattr(args, "ds", None)
    ring = getattr(getattr(trainer, "strategy", None), "ring_attn_group", None)
    if getattr(ds, "packing_samples", False) or ring is not None:
        raise ValueError("the FlowRL adapter does not support --ds.packing_samples or ring attention yet")
    if getattr(trainer, "ema_model", None) is not None:
        raise ValueError("the FlowRL adapter does not support --train.enable_ema (the EMA copy has no head)")
    entropy_coef = getattr(getattr(args, "actor", None), "entropy_coef", None)
    if entropy_coef:
        raise ValueError(_ENTROPY_ERROR.format(entropy_coef))
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


def enable_flowrl(
    trainer: ActorPPOTrainer, config: FlowRLConfig | dict[str, Any] | None = None
) -> FlowRLActorPPOTrainer:
    """Turn an ``ActorPPOTrainer`` OpenRLHF already built into a `FlowRLActorPPOTrainer`, in place."""
    if not isinstance(trainer, ActorPPOTrainer):
        raise TypeError(f"`trainer` must be an openrlhf ActorPPOTrainer, got {type(trainer).__name__}")
    trainer.__class__ = FlowRLActorPPOTrainer
    _setup(trainer, FlowRLConfig.from_any(config))
    return trainer  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# The Ray actor and the launcher (GPU only: OpenRLHF's PolicyModelActor asks Ray for one GPU).


@contextlib.contextmanager
def _head_attached_on_prepare(strategy: Any, config: FlowRLConfig) -> Iterator[None]:
    """While active, ``strategy.prepare((actor, cfg))`` attaches the head to the policy before DeepSpeed."""
    original = strategy.prepare

    def prepare(*models: Any, **kwargs: Any) -> Any:
        for item in models:
            if isinstance(item, tuple) and item and isinstance(item[0], Actor):
                attach_log_z_head(item[0].model, config.log_z_head)
        return original(*models, **kwargs)

    with _instance_override(strategy, "prepare", prepare):
        yield


@contextlib.contextmanager
def _instance_override(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.<name> = value`` inside the block; restore the instance attribute (or its absence) after."""
    missing = object()
    saved = vars(obj).get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, saved)


@contextlib.contextmanager
def _hf_exports_without_head(strategy: Any) -> Iterator[None]:
    """While active, every ``strategy.save_model(model, ...)`` (HF export) runs with the head detached."""
    export = strategy.save_model

    def save_model(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with log_z_head_detached(model):
            return export(model, *args, **kwargs)

    with _instance_override(strategy, "save_model", save_model):
        yield


class FlowRLPolicyModelActorImpl(PolicyModelActor.__ray_metadata__.modified_class):  # type: ignore[misc]
    """OpenRLHF's policy worker with the head attached before DeepSpeed and the trainer swapped for FlowRL's.

    Reads its options from ``strategy.args.flowrl`` (set by `main`). The head is in the DeepSpeed
    checkpoints and left out of every HF export (``save_model`` and ``save_checkpoint``'s ``--ckpt.save_hf``).
    """

    def init_model_from_pretrained(self, strategy: Any, pretrain: str, max_steps: Any = None,
                                   vllm_engines: Any = None) -> None:
        config = FlowRLConfig.from_any(getattr(strategy.args, "flowrl", None))
        with _head_attached_on_prepare(strategy, config):
            super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        enable_flowrl(self.trainer, config)

    def save_model(self) -> None:
        with _hf_exports_without_head(self.strategy):
            super().save_model()

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """OpenRLHF's checkpoint: the DeepSpeed state keeps the head (``--ckpt.load_enable`` resumes it), the
        ``{tag}_hf`` export of ``--ckpt.save_hf`` (``strategy.save_model`` called directly) leaves it out."""
        with _hf_exports_without_head(self.strategy):
            super().save_checkpoint(*args, **kwargs)


FlowRLPolicyModelActor = ray.remote(num_gpus=1)(FlowRLPolicyModelActorImpl)

_FLAG_PREFIX = "--flowrl."


def _check_openrlhf_args(args: Any, config: FlowRLConfig) -> None:
    """OpenRLHF flags FlowRL needs or cannot honour (``args`` as ``hierarchize``d by OpenRLHF); ValueError."""
    kl, adv = args.algo.kl, args.algo.advantage
    if not (kl.init_coef > 0 and kl.use_loss):
        raise ValueError(
            "FlowRL needs the reference policy's log-probs: pass --algo.kl.init_coef 1e-3 (any value > 0 "
            "creates the reference model) and --algo.kl.use_loss (keeps its log-probs, keeps KL out of the "
            "reward; the KL loss itself is dropped unless --flowrl.kl_loss true)"
        )
    if config.reward_source == "advantages" and adv.estimator != "group_norm":
        raise ValueError(
            "FlowRL's r_hat is the group z-scored reward: pass --algo.advantage.estimator group_norm "
            f"(got {adv.estimator!r}), or --flowrl.reward_source rewards"
        )
    if args.actor.entropy_coef:
        raise ValueError(_ENTROPY_ERROR.format(args.actor.entropy_coef))
    if args.ds.packing_samples or args.ds.ring_attn_size > 1 or args.train.enable_ema:
        raise ValueError("the FlowRL adapter does not support --ds.packing_samples, ring attention or "
                         "--train.enable_ema yet")


_KL_ADVICE = "Recommend setting"  # OpenRLHF's advice on --algo.kl.estimator, about a KL loss FlowRL drops
_KL_NOTE = ("[FlowRL] OpenRLHF's KL loss is dropped: FlowRL's residual already holds log pi_ref "
            "(--algo.kl.estimator only changes the logged KL; --flowrl.kl_loss true keeps the KL loss)")


@contextlib.contextmanager
def _flowrl_flags_on_openrlhf_parser(state: dict[str, Any]) -> Iterator[None]:
    """While active, the first ``ArgumentParser.parse_args`` (OpenRLHF's launcher's) also takes FlowRL's
    ``--flowrl.*`` flags (so ``--help`` lists them and a bad value exits 2 naming the flag and the allowed
    values), then checks the OpenRLHF flags FlowRL needs - before the launcher starts Ray."""
    import argparse

    from openrlhf.utils.config import hierarchize

    original = argparse.ArgumentParser.parse_args
    dest = "flowrl."

    def parse_args(parser: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        argparse.ArgumentParser.parse_args = original  # only the launcher's own parser
        FlowRLConfig.add_arguments(parser, _FLAG_PREFIX, dest_prefix=dest)
        argv = list(sys.argv[1:] if args is None else args)
        FlowRLConfig.refuse_unknown_flags(argv, _FLAG_PREFIX, parser)
        parsed = original(parser, argv, namespace)
        config = FlowRLConfig.from_parsed(parsed, parser, dest_prefix=dest, prefix=_FLAG_PREFIX)
        try:
            _check_openrlhf_args(hierarchize(parsed), config)
        except ValueError as exc:
            parser.error(str(exc))
        state["config"] = config
        return parsed

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    """``python -m flowloss.adapters.openrlhf [--flowrl.<option> value ...] <train_ppo_ray args>``.

    Runs OpenRLHF's own launcher (``openrlhf.cli.train_ppo_ray``) with `FlowRLPolicyModelActor` in place of
    ``PolicyModelActor``, the ``--flowrl.*`` options added to its parser (``--help`` lists them; a bad value
    exits with status 2 and a message naming the flag), the OpenRLHF flags FlowRL needs checked before Ray
    starts, and the options on ``strategy.args.flowrl`` for the workers.
    """
    import runpy

    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    import openrlhf.utils as orl_utils

    state: dict[str, Any] = {}
    original_get_strategy = orl_utils.get_strategy
    original_actor = ppo_actor.PolicyModelActor

    def get_strategy(args: Any) -> Any:
        args.flowrl = state["config"]
        return original_get_strategy(args)

    def launcher_print(*values: Any, **kwargs: Any) -> None:
        advice = values and isinstance(values[0], str) and values[0].startswith(_KL_ADVICE) and "KL" in values[0]
        if advice and not state["config"].kl_loss:
            values = (_KL_NOTE,)
        print(*values, **kwargs)

    saved_argv = sys.argv
    ppo_actor.PolicyModelActor = FlowRLPolicyModelActor
    orl_utils.get_strategy = get_strategy
    sys.argv = ["openrlhf.cli.train_ppo_ray", *(saved_argv[1:] if argv is None else argv)]
    try:
        with _flowrl_flags_on_openrlhf_parser(state):
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True,
                             init_globals={"print": launcher_print})
    finally:
        sys.argv = saved_argv
        ppo_actor.PolicyModelActor = original_actor
        orl_utils.get_strategy = original_get_strategy


if __name__ == "__main__":  # `python -m`: use the importable module's classes (Ray pickles them by name)
    from flowloss.adapters.openrlhf import main as _main

    _main()

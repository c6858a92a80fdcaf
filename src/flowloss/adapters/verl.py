"""FlowRL for verl (>= 0.9, engine-based workers): a loss function, a registered policy loss, a log-Z head.

verl's actor worker computes its loss with ``loss_fn(model_output, data, dp_group)`` (by default
``partial(verl.workers.utils.losses.ppo_loss, config=actor_config)``). This module translates that call into
`flowloss.trajectory_balance_loss`; the math lives in flowloss. Per micro-batch, with ``B`` sequences
and ``T`` the longest response::

    log_probs [B, T]       <- model_output["log_probs"] (nested, sliced to the response like ppo_loss does)
    ref_log_prob [B, T]    <- data["ref_log_prob"]  (needs a reference policy: use_kl_loss=True)
    old_log_probs [B, T]   <- data["old_log_probs"] (importance weights w_i, "sequence_clipped" by default)
    r_hat [B]              <- masked mean of data["advantages"] over the response (GRPO: the group z-score,
                              constant along the response, which is what FlowRL uses as its reward)
    log Z [B]              <- model_output["log_z"] (the head, see FlowRLFSDPEngine) or the VarGrad estimate
    loss = sum_i w_i delta_i^2 / (global_batch_size / dp_size)

verl's FSDP/Megatron engines back-propagate every micro-batch loss as is and data-parallel gradients are
averaged over ``dp_size`` ranks, so dividing the local sum by ``global_batch_size / dp_size`` (the number of
sequences in the whole mini-batch, over all ranks, from ``data["global_batch_size"]`` and ``data["dp_size"]``)
makes the accumulated gradient that of the mean over the whole mini-batch, as verl's own ``agg_loss`` does.

What verl's policy-loss registry can serve: a registered function receives ``old_log_prob, log_prob,
advantages, response_mask, loss_agg_mode, config, rollout_is_weights`` only - no reference log-probs, no
log Z, no group ids. `register_flowrl_policy_loss` registers ``"flowrl_old_ref"``: the
trajectory-balance loss with the *old* policy standing in for ``pi_ref`` and a detached micro-batch VarGrad
constant for ``log Z``.
It is not FlowRL's target; it is what the registry can express (see docs/adapters/verl.md).

verl 0.9 runs the V1 trainer (``trainer.use_v1=True``) by default: `register_flowrl` registers the trainer mode
``"flowrl"`` (`register_flowrl_trainer`: verl's ``sync`` trainer that installs the loss in its actor workers),
the engine with the head and the policy loss; call it from a module named in ``VERL_USE_EXTERNAL_MODULES`` so
that ``import verl`` runs it in ``main_ppo``'s TaskRunner and in every worker.

Importing this module imports verl (and torch); ``import flowloss`` never does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from flowloss import LogZHead, masked_mean, pool_prompt_hidden_states, trajectory_balance_loss, vargrad_log_z
from flowloss.adapters.common import (
    AdapterConfig,
    Extra,
    HiddenStateCapture,
    LogZHeadOptions,
    without_log_z_head,
)
from flowloss.adapters.common import attach_log_z_head as _attach_head

__all__ = [
    "REGISTERED_POLICY_LOSS",
    "FlowRLConfig",
    "FlowRLFSDPEngine",  # noqa: F822 (built on first access by the module __getattr__)
    "attach_log_z_head",
    "flowrl_loss",
    "install_flowrl_loss",
    "make_flowrl_loss_fn",
    "packed_prompt_log_z",
    "register_flowrl",
    "register_flowrl_engine",
    "register_flowrl_policy_loss",
    "register_flowrl_trainer",
    "sequence_rewards",
    "set_flowrl_loss_fn",
]

# Name of the policy loss registered in verl's registry by `register_flowrl_policy_loss`.
REGISTERED_POLICY_LOSS = "flowrl_old_ref"

LogZSource = Literal["head", "vargrad"]


class FlowRLConfig(AdapterConfig):
    """FlowRL options for verl: ``loss`` (`flowloss.FlowRLOptions`), ``log_z_head``
    (`flowloss.adapters.common.LogZHeadOptions`) and verl's own two.

    Flat names (a Hydra ``config.flowrl`` node, ``FlowRLConfig(beta=15.0)``, ``FlowRLConfig.from_any(node)``):
    the loss's (``beta``, ``importance_weights``, ``eps_low``, ``eps_high``, ``max_weight``, ``tis_cap``,
    ``token_clip_mask``, ``length_normalization``, ...), the head's (``log_z_num_layers``, ``log_z_dropout``,
    ``log_z_init``, ``log_z_drop_last_prompt_token``, ``log_z_dtype``), and

    * ``log_z``: ``"head"`` (the authors' MLP head on pooled prompt hidden states; needs `FlowRLFSDPEngine`)
      or ``"vargrad"`` (parameter-free, TBA arXiv 2503.18929; needs group ids ``data["uid"]``);
    * ``rollout_tis``: multiply ``w`` by ``min(pi_old / pi_rollout, tis_cap)`` from
      ``data["rollout_log_probs"]`` (off by default; the authors' dev variant).
    """

    EXTRAS: ClassVar[dict[str, Extra]] = {
        "log_z": Extra("head", "log Z from the head (FlowRLFSDPEngine) or the VarGrad estimate over data['uid']",
                       ("head", "vargrad")),
        "rollout_tis": Extra(False, "truncated IS against data['rollout_log_probs'] (false)"),
    }
    RENAMED: ClassVar[dict[str, str]] = {
        "use_rollout_log_probs": "rollout_tis",
        "drop_last_prompt_token": "log_z_drop_last_prompt_token",
    }
    log_z: LogZSource
    rollout_tis: bool


# ----------------------------------------------------------------------------------------------------
# The worker's loss function
# ----------------------------------------------------------------------------------------------------


def sequence_rewards(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]``: verl's token-level advantages reduced to one reward per sequence (masked mean).

    verl's GRPO estimator writes the group z-score ``(s - mean_g) / (std_g + 1e-6)`` on every response token,
    so the masked mean returns it exactly; an all-masked row gives 0.
    """
    return masked_mean(advantages.detach(), response_mask)


def _has(data: Any, key: str) -> bool:
    """``key in data`` for a TensorDict (which refuses the ``in`` operator) or a dict."""
    return key in data.keys()  # noqa: SIM118


def _group_ids(data: Any, batch: int, device: torch.device) -> torch.Tensor:
    """``data["uid"]`` (a tensor, or a list / array / NonTensorStack of hashables) -> ``[B]`` int64 ids."""
    if not _has(data, "uid"):
        raise ValueError(
            "FlowRL `log_z='vargrad'` needs the prompt group of each sequence in the micro-batch as "
            "data['uid'] (keep 'uid' in the fields sent to update_actor), or use `log_z='head'` with "
            "FlowRLFSDPEngine"
        )
    uid = data["uid"]
    if isinstance(uid, torch.Tensor) and not uid.is_nested:
        values: Sequence[Hashable] = uid.reshape(-1).tolist()
    else:
        raw = uid.tolist() if hasattr(uid, "tolist") else list(uid)
        values = [v.item() if isinstance(v, torch.Tensor) else v for v in raw]
    if len(values) != batch:
        raise ValueError(f"data['uid'] must hold one group id per sequence ({batch}), got {len(values)}")
    index: dict[Hashable, int] = {}
    ids = [index.setdefault(v, len(index)) for v in values]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _global_normalizer(data: Any) -> float | None:
    """``global_batch_size / dp_size``: this rank's share of the mini-batch's sequences (None: local mean)."""
    dp_size = int(data["dp_size"]) if _has(data, "dp_size") and data["dp_size"] is not None else 1
    gbs = data["global_batch_size"] if _has(data, "global_batch_size") else None
    if gbs is None:
        if dp_size > 1:
            raise ValueError(f"data['global_batch_size'] is required when data['dp_size'] = {dp_size} > 1")
        return None
    gbs = float(gbs)
    if not gbs > 0:
        raise ValueError(f"data['global_batch_size'] must be > 0, got {gbs}")
    return gbs / dp_size


def flowrl_loss(
    config: Any,
    model_output: dict[str, torch.Tensor],
    data: Any,
    dp_group: Any = None,
    *,
    flowrl: FlowRLConfig | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl worker loss ``loss_fn(model_output, data, dp_group)`` computing FlowRL's trajectory-balance loss.

    Bind ``config`` (verl's ``ActorConfig``) and ``flowrl`` with `make_flowrl_loss_fn`. Reads
    ``model_output["log_probs"]`` (and ``model_output["log_z"]`` ``[B]`` for ``log_z="head"``) and the
    micro-batch TensorDict fields ``prompts, responses, response_mask, old_log_probs, ref_log_prob,
    advantages``; returns ``(loss, metrics)`` like verl's ``ppo_loss``;
    ``loss = sum_i w_i delta_i^2 / (global_batch_size / dp_size)``
    (see the module docstring); the KL loss of ``ppo_loss`` is added only when ``use_kl_loss`` with a non-zero
    ``kl_loss_coef`` (FlowRL's runs keep it off: the reference enters through ``delta``).
    """
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    flowrl = flowrl if flowrl is not None else FlowRLConfig()
    if not _has(data, "ref_log_prob"):
        raise ValueError(
            "FlowRL needs the reference policy's log-probs (data['ref_log_prob']): set "
            "actor_rollout_ref.actor.use_kl_loss=True (kl_loss_coef=0.0 keeps the KL term off)"
        )
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    normalizer = _global_normalizer(data)
    wanted = ["response_mask", "old_log_probs", "advantages", "ref_log_prob"]
    if flowrl.rollout_tis:
        if not _has(data, "rollout_log_probs"):
            raise ValueError("`rollout_tis=True` needs data['rollout_log_probs']")
        wanted.append("rollout_log_probs")
    group_ids = _group_ids(data, log_prob.shape[0], log_prob.device) if flowrl.log_z == "vargrad" else None
    padded = data.select(*wanted).to_padded_tensor()
    mask = padded["response_mask"].to(torch.bool)
    if mask.shape != log_prob.shape:
        raise ValueError(
            f"response_mask {tuple(mask.shape)} does not match the sliced log_probs {tuple(log_prob.shape)}"
        )
    ref = padded["ref_log_prob"]
    old = padded["old_log_probs"]
    rewards = sequence_rewards(padded["advantages"], mask)
    rollout = padded["rollout_log_probs"] if flowrl.rollout_tis else None

    if flowrl.log_z == "head":
        if "log_z" not in model_output:
            raise ValueError(
                "FlowRL `log_z='head'` needs model_output['log_z']: use FlowRLFSDPEngine (or an engine that "
                "emits the head's output), or set `log_z='vargrad'`"
            )
        log_z = model_output["log_z"]
    else:
        assert group_ids is not None
        log_z = vargrad_log_z(
            log_prob, ref, rewards, mask, group_ids,
            beta=flowrl.loss.beta, length_normalization=flowrl.loss.length_normalization,
        )

    loss, stats = trajectory_balance_loss(
        log_prob,
        ref,
        rewards,
        log_z,
        mask,
        old_logprobs=old,
        rollout_logprobs=rollout,
        normalizer=normalizer,
        return_stats=True,
        **flowrl.loss.to_dict(),
    )
    global_info = {
        "dp_size": data["dp_size"] if _has(data, "dp_size") else 1,
        "batch_num_tokens": data["batch_num_tokens"] if _has(data, "batch_num_tokens") else None,
        "global_batch_size": data["global_batch_size"] if _has(data, "global_batch_size") else None,
        # As verl's ppo_loss: the divisor of "seq-mean-token-sum-norm" (None: the padded horizon T).
        "loss_scale_factor": getattr(config, "loss_scale_factor", None),
    }
    aggregation = AggregationType.SUM if normalizer is not None else AggregationType.MEAN
    metrics: dict[str, Any] = {"actor/pg_loss": Metric(value=loss.detach(), aggregation=aggregation)}
    for key, value in stats.items():
        if key != "loss":
            metrics[f"flowrl/{key}"] = Metric(value=value.detach().float(), aggregation=AggregationType.MEAN)

    if getattr(config, "use_kl_loss", False) and float(getattr(config, "kl_loss_coef", 0.0)) != 0.0:
        kld = kl_penalty(logprob=log_prob, ref_logprob=ref, kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **global_info)
        loss = loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss.detach(), aggregation=aggregation)
    return loss, metrics


def make_flowrl_loss_fn(actor_config: Any, flowrl: FlowRLConfig | dict[str, Any] | None = None) -> Callable:
    """``partial(flowrl_loss, config=actor_config, flowrl=...)``: what the worker's ``set_loss_fn`` takes."""
    flowrl = FlowRLConfig.from_any(flowrl)
    return partial(flowrl_loss, config=actor_config, flowrl=flowrl)


def set_flowrl_loss_fn(worker: Any, flowrl: FlowRLConfig | dict[str, Any] | None = None) -> Callable:
    """Replace the ``ppo_loss`` of an ``ActorRolloutRefWorker`` (in the worker process, after ``init_model``).

    Uses the actor config the worker built its own loss with (``worker.loss_fn.keywords["config"]``).
    """
    current = getattr(worker, "loss_fn", None)
    config = getattr(current, "keywords", {}).get("config") if current is not None else None
    if config is None:
        raise ValueError("`worker` has no loss_fn bound to an actor config: call it after init_model()")
    loss_fn = make_flowrl_loss_fn(config, flowrl)
    worker.loss_fn = loss_fn
    worker.actor.set_loss_fn(loss_fn)
    return loss_fn


# ----------------------------------------------------------------------------------------------------
# The registered policy loss (what verl's registry can reach)
# ----------------------------------------------------------------------------------------------------


def _old_ref_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    flowrl: FlowRLConfig,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Trajectory balance with ``pi_old`` as the reference and a micro-batch VarGrad ``log Z`` (detached).

    ``delta_i = log Z_hat + l_i - beta r_hat_i - l_old_i`` with
    ``log Z_hat = mean_j (beta r_hat_j - (l_j - l_old_j))`` over the micro-batch (one group: the registry sees
    no group ids). ``loss_agg_mode`` is ignored (FlowRL is a sequence mean); aggregation over ranks uses
    ``config.global_batch_info`` like verl's losses.
    """
    mask = response_mask.to(torch.bool)
    rewards = sequence_rewards(advantages, mask)
    batch = log_prob.shape[0]
    log_z = vargrad_log_z(
        log_prob, old_log_prob, rewards, mask, torch.zeros(batch, dtype=torch.long, device=log_prob.device),
        beta=flowrl.loss.beta, length_normalization=flowrl.loss.length_normalization,
    )
    info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None else {}
    dp_size = int(info.get("dp_size") or 1)
    gbs = info.get("global_batch_size")
    if gbs is None and dp_size > 1:
        raise ValueError(f"global_batch_info['global_batch_size'] is needed when dp_size = {dp_size} > 1")
    normalizer = None if gbs is None else float(gbs) / dp_size
    loss, stats = trajectory_balance_loss(
        log_prob, old_log_prob.detach(), rewards, log_z, mask,
        old_logprobs=old_log_prob, normalizer=normalizer, return_stats=True,
        **flowrl.loss.to_dict(),
    )
    metrics = {f"flowrl/{k}": float(v) for k, v in stats.items() if k != "loss"}
    return loss, metrics


def register_flowrl_policy_loss(
    flowrl: FlowRLConfig | dict[str, Any] | None = None, *, name: str = REGISTERED_POLICY_LOSS
) -> Callable:
    """Register the old-policy-as-reference TB loss in verl's registry (``policy_loss.loss_mode=<name>``).

    Call it in every worker process before the loss is looked up (e.g. from a module named in verl's
    ``external_lib`` option, or at the top of the trainer entry point when workers share the process).
    """
    from verl.trainer.ppo.core_algos import register_policy_loss

    fn = partial(_old_ref_policy_loss, flowrl=FlowRLConfig.from_any(flowrl))
    register_policy_loss(name)(fn)
    return fn


# ----------------------------------------------------------------------------------------------------
# The log-Z head: attached to the model before FSDP wrapping, run inside the model's forward
# ----------------------------------------------------------------------------------------------------


class _HeadContext:
    """The current micro-batch's prompt layout, set by the engine, and the hook that computes log Z from it."""

    def __init__(self, model: nn.Module, head: LogZHead, options: LogZHeadOptions) -> None:
        self.prompt_lens: torch.Tensor | None = None  # [B]
        self.seq_lens: torch.Tensor | None = None  # [B]
        self.capture = HiddenStateCapture(model, transform=self._log_z)
        self._head, self._drop_last = head, options.drop_last_prompt_token

    def _log_z(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.prompt_lens is not None and self.seq_lens is not None
        return packed_prompt_log_z(self._head, hidden, self.prompt_lens, self.seq_lens,
                                   drop_last_prompt_token=self._drop_last)

    def set_layout(self, prompt_lens: torch.Tensor, seq_lens: torch.Tensor) -> None:
        self.prompt_lens, self.seq_lens = prompt_lens, seq_lens
        self.capture.start()

    def take_log_z(self) -> torch.Tensor | None:
        """The ``[B]`` log Z of the forward that just ran (None if none ran); the layout is used up."""
        log_z = self.capture.pop() if self.capture.captured else None
        self.capture.stop()
        self.prompt_lens = self.seq_lens = None
        return log_z


def packed_prompt_log_z(
    head: LogZHead,
    hidden_states: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    drop_last_prompt_token: bool = False,
) -> torch.Tensor:
    """``log Z`` from packed (padding-free) hidden states: ``[1, N, H]`` or ``[N, H]`` -> ``[B]``.

    Sequence ``i`` occupies ``seq_lens[i]`` consecutive rows (prompt first, ``prompt_lens[i]`` tokens), as in
    verl's remove-padding layout; rows past ``sum(seq_lens)`` (verl's static pad suffix) are ignored. The
    prompt rows are gathered into ``[B, P, H]`` with a mask and pooled by
    `pool_prompt_hidden_states`; the head maps ``[B, H] -> [B]``.
    """
    h = hidden_states.squeeze(0) if hidden_states.dim() == 3 else hidden_states
    prompt_lens = prompt_lens.to(device=h.device, dtype=torch.long)
    seq_lens = seq_lens.to(device=h.device, dtype=torch.long)
    bad_prompt = bool((prompt_lens < 1).any())
    if prompt_lens.shape != seq_lens.shape or int(seq_lens.sum()) > h.shape[0] or bad_prompt:
        raise ValueError(
            f"packed layout mismatch: seq_lens {seq_lens.tolist()} sum to {int(seq_lens.sum())} rows, hidden "
            f"states have {h.shape[0]} (shape {tuple(hidden_states.shape)}); prompt_lens {prompt_lens.tolist()} "
            "(>= 1)"
        )
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    width = max(int(prompt_lens.max()) if prompt_lens.numel() else 0, 1)
    offsets = torch.arange(width, device=h.device)
    prompt_mask = offsets.unsqueeze(0) < prompt_lens.unsqueeze(1)  # [B, P]
    rows = (starts.unsqueeze(1) + offsets.unsqueeze(0)).clamp_max(h.shape[0] - 1)  # [B, P]
    gathered = h[rows]  # [B, P, H]
    pooled = pool_prompt_hidden_states(gathered, prompt_mask, drop_last_token=drop_last_prompt_token)
    return head(pooled)


def attach_log_z_head(
    model: nn.Module, flowrl: FlowRLConfig | dict[str, Any] | None = None
) -> tuple[LogZHead, _HeadContext]:
    """Add a `LogZHead` to a Hugging Face causal LM as ``model.flowrl_log_z_head``; return it and its context.

    Do it before FSDP wrapping so the head is sharded, optimized (it shares the policy's optimizer, as in the
    authors' runs) and saved with the model (`flowloss.adapters.common.attach_log_z_head`). A forward hook on
    the decoder computes ``log Z`` from its last hidden state *inside* the model's forward (so FSDP has the
    head's parameters gathered), for the prompt layout given to ``ctx.set_layout(prompt_lens, seq_lens)``;
    ``ctx.take_log_z()`` returns it. Gradients flow from the head into the LLM (no detach), as in the
    reference code.
    """
    options = FlowRLConfig.from_any(flowrl).log_z_head
    head = _attach_head(model, options)
    return head, _HeadContext(model, head, options)


def _prompt_and_sequence_lengths(micro_batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence prompt and total lengths of a verl micro-batch (nested or left/right-padded layout)."""
    prompts, responses = micro_batch["prompts"], micro_batch["responses"]
    if prompts.is_nested:
        prompt_lens = prompts.offsets().diff()
        response_lens = responses.offsets().diff()
    else:
        attention_mask = micro_batch["attention_mask"]
        prompt_lens = attention_mask[:, : prompts.shape[1]].sum(dim=1)
        response_lens = attention_mask[:, prompts.shape[1] :].sum(dim=1)
    return prompt_lens, prompt_lens + response_lens


def _engine_base() -> type:
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    return FSDPEngineWithLMHead


class _FlowRLEngineMixin:
    """Adds the log-Z head to verl's FSDP language-model engine and emits ``model_output["log_z"]``.

    * ``_build_module``: the Hugging Face model from verl, plus the head (`attach_log_z_head`), before
      FSDP wrapping - so the optimizer and the checkpoint manager see it;
    * ``prepare_model_inputs``: records the micro-batch's prompt layout for the hook;
    * ``prepare_model_outputs``: adds ``log_z [B]`` to verl's outputs (log-probs, entropy);
    * ``get_per_tensor_param`` and ``get_per_tensor_param_shard``: leave the head out of the weight sync to
      the rollout engine (vLLM/SGLang), full or delta (``get_per_tensor_param_delta_shard`` and
      ``prime_delta_snapshots`` read the shard export).
    """

    flowrl_config: FlowRLConfig = FlowRLConfig()

    def _build_module(self):  # type: ignore[no-untyped-def]
        module = super()._build_module()  # type: ignore[misc]
        self._flowrl_head, self._flowrl_ctx = attach_log_z_head(module, self.flowrl_config)
        return module

    def prepare_model_inputs(self, micro_batch):  # type: ignore[no-untyped-def]
        ctx = getattr(self, "_flowrl_ctx", None)
        if ctx is not None:
            use_remove_padding = _non_tensor(micro_batch, "use_remove_padding", True)
            if not use_remove_padding:
                raise ValueError("FlowRLFSDPEngine needs use_remove_padding=True (the packed layout)")
            if getattr(self, "use_ulysses_sp", False):
                raise ValueError(
                    "FlowRLFSDPEngine does not support Ulysses sequence parallelism (each rank would pool "
                    "only its slice of the prompt); set ulysses_sequence_parallel_size=1"
                )
            ctx.set_layout(*_prompt_and_sequence_lengths(micro_batch))
        return super().prepare_model_inputs(micro_batch)  # type: ignore[misc]

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):  # type: ignore[no-untyped-def]
        model_output = super().prepare_model_outputs(  # type: ignore[misc]
            output, output_args, micro_batch, logits_processor_func
        )
        ctx = getattr(self, "_flowrl_ctx", None)
        if ctx is not None:
            # One layout per forward: any other forward of the module (generation, a probe) runs no head.
            log_z = ctx.take_log_z()
            if log_z is not None:
                model_output["log_z"] = log_z
        return model_output

    def get_per_tensor_param(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        params, peft_config = super().get_per_tensor_param(*args, **kwargs)  # type: ignore[misc]
        return without_log_z_head(params), peft_config

    def get_per_tensor_param_shard(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # The delta checkpoint engine's export: verl's get_per_tensor_param_delta_shard and
        # prime_delta_snapshots both read their shards from this method, so filtering here covers them.
        params, peft_config = super().get_per_tensor_param_shard(*args, **kwargs)  # type: ignore[misc]
        return without_log_z_head(params), peft_config


def _non_tensor(data: Any, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def __getattr__(name: str) -> Any:
    # FlowRLFSDPEngine subclasses a verl class: build it on first use so importing this module stays cheap.
    if name == "FlowRLFSDPEngine":
        cls = type("FlowRLFSDPEngine", (_FlowRLEngineMixin, _engine_base()), {"__module__": __name__})
        cls.__doc__ = _FlowRLEngineMixin.__doc__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_flowrl_engine(
    flowrl: FlowRLConfig | dict[str, Any] | None = None,
    *,
    backend: Sequence[str] = ("fsdp", "fsdp2"),
    device: Sequence[str] = ("cuda", "npu"),
) -> type:
    """Make `FlowRLFSDPEngine` verl's ``language_model`` engine for ``backend``/``device``.

    verl builds the actor's (and the reference's) engine through ``EngineRegistry``; after this call both get
    the head (the reference's copy is unused). Call it in each worker process before ``init_model``.
    """
    from verl.workers.engine.base import EngineRegistry

    flowrl = FlowRLConfig.from_any(flowrl)
    base = __getattr__("FlowRLFSDPEngine")
    cls = type("FlowRLFSDPEngine", (base,), {"flowrl_config": flowrl, "__module__": __name__})
    # EngineRegistry.register refuses to replace an existing entry, so overwrite verl's FSDP entries directly.
    engines = EngineRegistry._engines.setdefault("language_model", {})
    for current_backend in backend:
        for current_device in device:
            engines.setdefault(current_backend, {})[current_device] = cls
    return cls


# ----------------------------------------------------------------------------------------------------
# verl's V1 trainer (``trainer.use_v1=True``, the default of 0.9): a registered trainer mode that installs the loss
# ----------------------------------------------------------------------------------------------------


def install_flowrl_loss(trainer: Any, flowrl: FlowRLConfig | dict[str, Any] | None = None) -> Callable:
    """From a V1 trainer whose workers exist: make the actor workers compute FlowRL's loss.

    Builds the loss from the actor config verl builds its own ``ppo_loss`` from
    (``omega_conf_to_dataclass(config.actor_rollout_ref.actor)``) and sends it to every actor worker with the
    worker group's ``set_loss_fn``.
    """
    from verl.utils.config import omega_conf_to_dataclass

    actor_config = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    loss_fn = make_flowrl_loss_fn(actor_config, flowrl)
    trainer.actor_rollout_wg.set_loss_fn(loss_fn)
    return loss_fn


class _FlowRLTrainerMixin:
    """A V1 ``PPOTrainer`` whose actor workers compute FlowRL's loss (installed once ``_setup`` built them)."""

    flowrl_config: FlowRLConfig = FlowRLConfig()

    def _setup(self) -> None:
        super()._setup()  # type: ignore[misc]
        install_flowrl_loss(self, self.flowrl_config)


def register_flowrl_trainer(
    flowrl: FlowRLConfig | dict[str, Any] | None = None, *, name: str = "flowrl", base: str = "sync"
) -> type:
    """Register a V1 trainer mode ``name`` (``trainer.v1.trainer_mode=flowrl``): verl's ``base`` mode (``"sync"``,
    ``"colocate_async"``, ...) with FlowRL's loss installed in the actor workers. Returns the class.

    verl's ``main_ppo`` runs ``get_trainer_cls(config.trainer.v1.trainer_mode)`` in its TaskRunner process: call
    this there, e.g. from a module named in ``VERL_USE_EXTERNAL_MODULES`` (imported by ``import verl`` in every
    process), see `register_flowrl`.
    """
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    flowrl = FlowRLConfig.from_any(flowrl)
    existing = TRAINER_REGISTRY.get(name)
    if existing is not None and not issubclass(existing, _FlowRLTrainerMixin):
        raise ValueError(f"trainer mode {name!r} is verl's {existing.__name__}: register FlowRL under another name")
    base_cls = get_trainer_cls(base)
    cls = type(f"FlowRL{base_cls.__name__}", (_FlowRLTrainerMixin, base_cls),
               {"flowrl_config": flowrl, "__module__": __name__})
    TRAINER_REGISTRY[name] = cls  # (re-)registration of FlowRL's own mode: register_trainer refuses to replace
    return cls


def register_flowrl(flowrl: FlowRLConfig | dict[str, Any] | None = None) -> FlowRLConfig:
    """Everything ``main_ppo`` needs, in the calling process: the V1 trainer mode ``"flowrl"``
    (`register_flowrl_trainer`), the engine with the log-Z head (`register_flowrl_engine`, for
    ``log_z="head"``) and the ``"flowrl_old_ref"`` policy loss (`register_flowrl_policy_loss`).

    Call it at import time of a module on the workers' ``PYTHONPATH`` and run ``main_ppo`` with
    ``VERL_USE_EXTERNAL_MODULES=<that module>``: ``import verl`` imports it in the driver, the TaskRunner and
    every worker, so all of them register the same options::

        # flowrl_setup.py
        from flowloss.adapters.verl import register_flowrl
        register_flowrl({"beta": 15.0})
    """
    flowrl = FlowRLConfig.from_any(flowrl)
    register_flowrl_trainer(flowrl)
    if flowrl.log_z == "head":
        register_flowrl_engine(flowrl)
    register_flowrl_policy_loss(flowrl)
    return flowrl

"""The loss call: verl's actor-worker loss ``loss_fn(model_output, data, dp_group)`` as FlowRL's.

verl's actor worker computes its loss with ``loss_fn(model_output, data, dp_group)`` (by default
``partial(verl.workers.utils.losses.ppo_loss, config=actor_config)``). `flowrl_loss` translates that call into
`flowloss.trajectory_balance_loss`; the math lives in flowloss. Per micro-batch, with ``B`` sequences and ``T``
the longest response::

    log_probs [B, T]       <- model_output["log_probs"] (nested, sliced to the response like ppo_loss does)
    ref_log_prob [B, T]    <- data["ref_log_prob"]  (needs a reference policy: use_kl_loss=True)
    old_log_probs [B, T]   <- data["old_log_probs"] (importance weights w_i, "sequence_clipped" by default)
    r_hat [B]              <- masked mean of data["advantages"] over the response (GRPO: the group z-score,
                              constant along the response, which is what FlowRL uses as its reward)
    log Z [B]              <- model_output["log_z"] (the head, see FlowRLFSDPEngine) or the VarGrad estimate
    c [B]                  <- masked mean of data["rollout_is_weights"] when verl's rollout correction wrote them
                              (rollout_is=sequence: the sequence weight, on every token), else 1
    loss = sum_i c_i w_i delta_i^2 / (global_batch_size / dp_size)

verl's FSDP/Megatron engines back-propagate every micro-batch loss as is and data-parallel gradients are
averaged over ``dp_size`` ranks, so dividing the local sum by ``global_batch_size / dp_size`` (the number of
sequences in the whole mini-batch, over all ranks) makes the accumulated gradient that of the mean over the
whole mini-batch, as verl's own ``agg_loss`` does.

The registered policy loss (`old_ref_policy_loss`, ``policy_loss.loss_mode=flowrl_old_ref``) is what verl's
registry can serve: its functions receive ``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
config, rollout_is_weights`` only, so it uses the *old* policy as the reference and a detached micro-batch VarGrad
constant as ``log Z``. Metrics are named ``actor/flowrl/<stat>``: what verl logs (it prefixes the actor's
metrics with ``actor/`` unless they already start with it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any

import torch

from flowloss import TrajectoryBalanceLoss, count_valid_sequences, masked_mean, vargrad_log_z
from flowloss.adapters.verl.config import FlowRLConfig, check_verl_settings

__all__ = [
    "METRIC_PREFIX",
    "flowrl_loss",
    "make_flowrl_loss_fn",
    "old_ref_policy_loss",
    "sequence_rewards",
    "set_flowrl_loss_fn",
]

# The loss's diagnostics are logged as actor/flowrl/<stat> (verl's actor metrics all start with actor/).
METRIC_PREFIX = "actor/flowrl/"


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


def _weighted_tb_loss(
    log_prob: torch.Tensor,
    ref: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    flowrl: FlowRLConfig,
    old: torch.Tensor | None,
    rollout: torch.Tensor | None,
    normalizer: float | None,
    sequence_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``trajectory_balance_loss``, with each sequence's term multiplied by ``sequence_weights [B]`` (detached)
    when given: ``sum_i c_i w_i delta_i^2 / N``, ``N`` the normalizer (or the micro-batch's valid count)."""
    loss_fn = TrajectoryBalanceLoss(flowrl.loss)  # holds the validated options object as is
    if sequence_weights is None:
        return loss_fn(log_prob, ref, rewards, log_z, mask, old_logprobs=old, rollout_logprobs=rollout,
                       normalizer=normalizer, return_stats=True)
    n = normalizer if normalizer is not None else count_valid_sequences(mask).clamp_min(1).to(torch.float32)
    terms, stats = loss_fn(log_prob, ref, rewards, log_z, mask, old_logprobs=old, rollout_logprobs=rollout,
                           normalizer=n, return_stats=True, reduction="none")
    c = sequence_weights.detach().to(terms.dtype)
    valid = mask.any(dim=1).to(c.dtype)
    stats["rollout_is_weight_mean"] = (c * valid).sum() / valid.sum().clamp_min(1)
    return (terms * c).sum(), stats


def _rollout_is_factor(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``rollout_is_weights [B, T]`` as one factor per sequence: their mean over the response (exactly
    the sequence weight for ``rollout_is=sequence``, which writes it on every token)."""
    return masked_mean(weights.detach().to(torch.float32), mask)


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
    advantages`` (and ``rollout_is_weights`` when verl's rollout correction wrote them); returns
    ``(loss, metrics)`` like verl's ``ppo_loss``; ``loss = sum_i c_i w_i delta_i^2 / (global_batch_size /
    dp_size)`` (see the module docstring); the KL loss of ``ppo_loss`` is added only when ``use_kl_loss`` with a
    non-zero ``kl_loss_coef`` (FlowRL's runs keep it off: the reference enters through ``delta``).
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
    use_is_weights = _has(data, "rollout_is_weights")
    if use_is_weights:
        if flowrl.rollout_tis:
            raise ValueError(
                "data['rollout_is_weights'] (verl's algorithm.rollout_correction.rollout_is) and FlowRL's "
                "`rollout_tis=True` both correct for the rollout engine: keep one"
            )
        wanted.append("rollout_is_weights")
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
    factor = _rollout_is_factor(padded["rollout_is_weights"], mask) if use_is_weights else None

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

    loss, stats = _weighted_tb_loss(log_prob, ref, rewards, log_z, mask, flowrl=flowrl, old=old, rollout=rollout,
                                    normalizer=normalizer, sequence_weights=factor)
    global_info: dict[str, Any] = {  # verl's agg_loss keywords
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
            metrics[METRIC_PREFIX + key] = Metric(value=value.detach().float(), aggregation=AggregationType.MEAN)

    if getattr(config, "use_kl_loss", False) and float(getattr(config, "kl_loss_coef", 0.0)) != 0.0:
        kld = kl_penalty(logprob=log_prob, ref_logprob=ref, kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **global_info)
        loss = loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss.detach(), aggregation=aggregation)
    return loss, metrics


def make_flowrl_loss_fn(actor_config: Any, flowrl: FlowRLConfig | dict[str, Any] | None = None) -> Callable:
    """``partial(flowrl_loss, config=actor_config, flowrl=...)``: what the worker's ``set_loss_fn`` takes.

    Refuses, in one ``ValueError``, the actor settings FlowRL's loss would ignore (``entropy_coeff``, clip
    ratios other than FlowRL's, dual clip, a ``policy_loss.loss_mode``): see `verl_conflicts`.
    """
    flowrl = FlowRLConfig.from_any(flowrl)
    check_verl_settings(flowrl, actor=actor_config)
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


def old_ref_policy_loss(
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
    no group ids). ``loss = sum_i c_i w_i delta_i^2 / N`` where ``c_i`` is the mean of ``rollout_is_weights``
    over sequence ``i``'s response (verl's rollout correction; exact for ``rollout_is=sequence``, which writes
    the sequence weight on every token; 1 without them). ``loss_agg_mode`` is ignored (FlowRL is a sequence
    mean); aggregation over ranks uses ``config.global_batch_info`` like verl's losses.
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
    factor = _rollout_is_factor(rollout_is_weights, mask) if rollout_is_weights is not None else None
    loss, stats = _weighted_tb_loss(log_prob, old_log_prob.detach(), rewards, log_z, mask, flowrl=flowrl,
                                    old=old_log_prob, rollout=None, normalizer=normalizer, sequence_weights=factor)
    metrics = {METRIC_PREFIX + k: float(v) for k, v in stats.items() if k != "loss"}
    return loss, metrics

"""The FlowRL objective (trajectory balance) and its reverse-KL twin.

Notation (arXiv 2509.15207): prompt ``x_i``, response ``y_i`` of ``|y_i|`` tokens, response mask ``m [B, T]``,
token log-probs ``log pi_theta(y_it)`` and ``log pi_ref(y_it)``, normalized reward ``r_hat_i``, log-partition
``log Z_phi(x_i)``. With length normalization (the default) ``l_i = (1/|y_i|) sum_t m_it log pi_theta(y_it)``,
without it ``l_i = log pi_theta(y_i|x_i)``; ``l_ref_i`` likewise.

Trajectory balance residual and loss::

    delta_i = log Z_phi(x_i) + l_i - beta * r_hat_i - l_ref_i
    loss    = (1/N) sum_i w_i * g(delta_i),   g(d) = d^2 by default,  N = number of valid sequences

Proposition 1: without length normalization and with samples ``y ~ pi_theta`` held fixed,
``E[grad (1/2) delta^2] = grad KL(pi_theta || p*)``, ``p* = pi_ref exp(beta r) / Z``, for any constant ``log Z``.
`reverse_kl_surrogate` is the score-function form of the same gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    describe,
    require_finite_number,
    require_float,
    require_ndim,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from flowloss.importance import (
    DEFAULT_EPS_HIGH,
    DEFAULT_EPS_LOW,
    DEFAULT_MAX_WEIGHT,
    DEFAULT_TIS_CAP,
    IMPORTANCE_MODES,
    ImportanceMode,
    check_importance_options,
    importance_weights_with_stats,
    ratio_clip_token_mask,
)
from flowloss.penalties import Penalty, apply_penalty, check_penalty
from flowloss.reductions import SequenceReduction, reduce_sequences

# FlowRL's reward temperature: `beta = 15` in the authors' code and the verl recipe ("as per paper").
DEFAULT_BETA = 15.0


@dataclass
class _Prepared:
    """Validated inputs reduced to sequence level, in the accumulation dtype."""

    seq_logprobs: torch.Tensor  # [B], carries the gradient of `logprobs`
    seq_ref_logprobs: torch.Tensor  # [B], detached
    rewards: torch.Tensor  # [B], detached
    weights: torch.Tensor  # [B], detached
    valid: torch.Tensor  # [B] bool: sequences with at least one (kept) token
    stats: dict[str, torch.Tensor]


def _mean_over(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    values = values.detach().to(torch.float64 if values.dtype == torch.float64 else torch.float32)
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)


def _prepare(
    *,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    extra: list[tuple[str, torch.Tensor]],
    beta: float,
    old_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    importance_weights: ImportanceMode | None,
    eps_low: float,
    eps_high: float,
    max_weight: float,
    tis_cap: float,
    token_clip_mask: bool,
    length_normalization: bool,
) -> _Prepared:
    require_finite_number("beta", beta)
    for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("rewards", rewards)):
        require_tensor(name, t)
        require_float(name, t)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    batch = logprobs.shape[0]
    if rewards.shape != (batch,):
        raise ValueError(f"`rewards` must have shape ({batch},) (one per sequence), got {describe(rewards)}")
    m = as_bool_mask("mask", mask, "logprobs", logprobs)
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            require_tensor(name, t)
            require_float(name, t)
            require_same_shape(name, t, "logprobs", logprobs)
    require_same_device(
        [
            ("logprobs", logprobs),
            ("ref_logprobs", ref_logprobs),
            ("rewards", rewards),
            ("mask", m),
            ("old_logprobs", old_logprobs),
            ("rollout_logprobs", rollout_logprobs),
            *extra,
        ]
    )
    if importance_weights is None:
        importance_weights = "sequence_clipped" if old_logprobs is not None else "none"
    if importance_weights not in IMPORTANCE_MODES:
        raise ValueError(f"`importance_weights` must be one of {IMPORTANCE_MODES}, got {importance_weights!r}")
    # Options are checked even when unused (on-policy), so a bad config fails on the first call.
    check_importance_options(importance_weights, eps_low, eps_high, max_weight, tis_cap)
    if importance_weights != "none" and old_logprobs is None:
        raise ValueError(f"`importance_weights={importance_weights!r}` needs `old_logprobs` (got None)")
    if rollout_logprobs is not None and old_logprobs is None:
        raise ValueError("`rollout_logprobs` (truncated IS) needs `old_logprobs` (got None)")
    if token_clip_mask and old_logprobs is None:
        raise ValueError("`token_clip_mask=True` needs `old_logprobs` (got None)")

    dtype = accumulation_dtype(logprobs, ref_logprobs, rewards, *(t for _, t in extra))
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # One host sync for every finiteness check; find the culprit only when something is wrong.
    lp_valid = torch.where(m, logprobs.detach().to(dtype), zero)
    ref_valid = torch.where(m, ref_logprobs.detach().to(dtype), zero)
    checks = [
        ("logprobs (at unmasked positions)", lp_valid),
        ("ref_logprobs (at unmasked positions)", ref_valid),
    ]
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            checks.append((f"{name} (at unmasked positions)", torch.where(m, t.detach().to(dtype), zero)))
    checks += [("rewards", rewards.detach())] + [(n, t.detach()) for n, t in extra]
    if not bool(torch.stack([torch.isfinite(t).all() for _, t in checks]).all()):
        for name, t in checks:
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"`{name}` must be finite, found {bad} non-finite value(s) in {describe(t)}")

    stats: dict[str, torch.Tensor] = {}
    kept = m
    if token_clip_mask:
        assert old_logprobs is not None
        kept = ratio_clip_token_mask(logprobs, old_logprobs, rewards, m, eps_low=eps_low, eps_high=eps_high)
        stats["token_clip_frac"] = (m & ~kept).sum() / m.sum().clamp_min(1)
    if old_logprobs is None:
        iw = None
        weights = torch.ones(batch, dtype=dtype, device=logprobs.device)
    else:
        iw = importance_weights_with_stats(
            logprobs,
            old_logprobs,
            kept,
            mode=importance_weights,
            eps_low=eps_low,
            eps_high=eps_high,
            max_weight=max_weight,
            rollout_logprobs=rollout_logprobs,
            tis_cap=tis_cap,
        )
        weights = iw.weights.to(dtype)

    lengths = kept.sum(dim=-1).to(dtype)
    seq_lp = torch.where(kept, logprobs.to(dtype), zero).sum(dim=-1)
    seq_ref = torch.where(kept, ref_valid, zero).sum(dim=-1)
    if length_normalization:
        seq_lp = seq_lp / lengths.clamp_min(1.0)
        seq_ref = seq_ref / lengths.clamp_min(1.0)
    valid = lengths > 0

    stats["valid_sequences"] = valid.sum()
    stats["logprobs_mean"] = _mean_over(seq_lp, valid)
    stats["ref_logprobs_mean"] = _mean_over(seq_ref, valid)
    stats["reward_mean"] = _mean_over(rewards, valid)
    stats["response_length_mean"] = _mean_over(lengths, valid)
    if iw is not None:
        log_cap = math.log(torch.finfo(iw.log_weights_unclipped.dtype).max) - 1.0
        stats["log_weight_unclipped_mean"] = _mean_over(iw.log_weights_unclipped, valid)
        stats["weight_unclipped_mean"] = _mean_over(iw.log_weights_unclipped.clamp_max(log_cap).exp(), valid)
        stats["weight_mean"] = _mean_over(weights, valid)
        stats["clip_frac_low"] = _mean_over(iw.clipped_low.to(dtype), valid)
        stats["clip_frac_high"] = _mean_over(iw.clipped_high.to(dtype), valid)
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    return _Prepared(seq_lp, seq_ref, rewards.detach().to(dtype), weights, valid, stats)


def _as_sequence_vector(name: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    require_tensor(name, t)
    require_float(name, t)
    if t.shape == (batch, 1):
        return t.squeeze(-1)
    if t.shape != (batch,):
        raise ValueError(f"`{name}` must have shape ({batch},) or ({batch}, 1), got {describe(t)}")
    return t


def trajectory_balance_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    old_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    importance_weights: ImportanceMode | None = None,
    eps_low: float = DEFAULT_EPS_LOW,
    eps_high: float = DEFAULT_EPS_HIGH,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    tis_cap: float = DEFAULT_TIS_CAP,
    token_clip_mask: bool = False,
    length_normalization: bool = True,
    penalty: Penalty = "squared",
    linex_alpha: float = 1.0,
    huber_delta: float = 1.0,
    reduction: SequenceReduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FlowRL's trajectory-balance loss ``mean_i w_i * g(delta_i)``.

    ``delta_i = log Z(x_i) + l_i - beta * r_hat_i - l_ref_i`` with ``l`` the length-normalized (token-mean)
    log-likelihood by default, ``g(d) = d^2``, ``w_i`` detached importance weights (1 when ``old_logprobs`` is
    None). Gradients flow into ``logprobs`` and ``log_z``; ``ref_logprobs``, ``rewards`` and ``w`` are constants.

    Args:
        logprobs: ``[B, T]`` token log-probs ``log pi_theta(y_t | x, y_<t)`` (with gradient).
        ref_logprobs: ``[B, T]`` token log-probs of the reference policy.
        rewards: ``[B]`` rewards ``r_hat`` as used in ``delta`` (normalize first, e.g. with
            [`group_normalize_rewards`][flowloss.group_normalize_rewards]; FlowRL uses the group z-score).
        log_z: ``[B]`` or ``[B, 1]`` log-partition estimates ``log Z(x_i)`` (e.g. from [`LogZHead`][flowloss.LogZHead]).
        mask: ``[B, T]`` response mask, bool or 0/1. All-masked rows contribute 0 and are not counted.
        beta: reward temperature ``beta`` (15, the authors' value).
        old_logprobs: ``[B, T]`` log-probs of the sampling policy; enables importance weights.
        rollout_logprobs: ``[B, T]`` inference-engine log-probs; multiplies ``w`` by a truncated IS factor.
        importance_weights: weight mode (see
            [`clipped_importance_weights`][flowloss.clipped_importance_weights]); default
            ``"sequence_clipped"`` (the paper) when ``old_logprobs`` is given, else ``"none"``.
        eps_low: clip range low side, ``w >= 1 - eps_low`` (0.2, the authors' value).
        eps_high: clip range high side, ``w <= 1 + eps_high`` (0.28, the authors' value).
        max_weight: cap of ``"sequence_capped"`` (10, verl ``recipe/flowrl``).
        tis_cap: truncation of the TIS factor ``min(pi_old / pi_rollout, C)`` (2, verl's default).
        linex_alpha: ``a`` of the ``"linex"`` penalty (1.0).
        huber_delta: ``k`` of the ``"huber"`` penalty (1.0).
        token_clip_mask: drop tokens whose ratio left ``[1-eps_low, 1+eps_high]`` in the direction of
            ``sign(r_hat)`` from every mean and from ``w`` (verl PR #3924).
        length_normalization: token-mean (True, the paper) or token-sum (False, Proposition 1) log-likelihoods.
        penalty: ``"squared"`` (default), ``"shifted_cosh"``, ``"linex"`` or ``"huber"`` (see ``flowloss.penalties``).
        reduction: ``"mean"`` over valid sequences (default), ``"sum"`` or ``"none"`` (``[B]``, 0 for invalid rows).
        normalizer: divide the sum by this instead of the local valid count; pass the number of valid
            sequences in the whole optimizer step to make micro-batches/ranks add up to the full-batch gradient.
        return_stats: also return a dict of detached diagnostics (mean log-probs, log Z, residual, weights before
            and after clipping, clip fractions).

    Returns:
        The loss (0-dim, or ``[B]`` for ``reduction="none"``) in float32 (float64 for float64 inputs), and the
        stats dict when ``return_stats``.
    """
    require_tensor("logprobs", logprobs)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    log_z_vec = _as_sequence_vector("log_z", log_z, logprobs.shape[0])
    check_penalty(penalty, linex_alpha, huber_delta)
    prep = _prepare(
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        rewards=rewards,
        mask=mask,
        extra=[("log_z", log_z_vec)],
        beta=beta,
        old_logprobs=old_logprobs,
        rollout_logprobs=rollout_logprobs,
        importance_weights=importance_weights,
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        tis_cap=tis_cap,
        token_clip_mask=token_clip_mask,
        length_normalization=length_normalization,
    )
    dtype = prep.seq_logprobs.dtype
    delta = log_z_vec.to(dtype) + prep.seq_logprobs - beta * prep.rewards - prep.seq_ref_logprobs
    per_sequence = prep.weights * apply_penalty(delta, penalty, linex_alpha=linex_alpha, huber_delta=huber_delta)
    loss = reduce_sequences(per_sequence, prep.valid, reduction=reduction, normalizer=normalizer)
    if not return_stats:
        return loss
    stats = prep.stats
    stats["log_z_mean"] = _mean_over(log_z_vec, prep.valid)
    stats["residual_mean"] = _mean_over(delta, prep.valid)
    stats["residual_abs_mean"] = _mean_over(delta.abs(), prep.valid)
    stats["loss"] = loss.detach() if reduction != "none" else _mean_over(per_sequence, prep.valid)
    return loss, stats


def reverse_kl_surrogate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    baseline: torch.Tensor | float | None = None,
    old_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    importance_weights: ImportanceMode | None = None,
    eps_low: float = DEFAULT_EPS_LOW,
    eps_high: float = DEFAULT_EPS_HIGH,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    tis_cap: float = DEFAULT_TIS_CAP,
    length_normalization: bool = False,
    reduction: SequenceReduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score-function surrogate whose gradient estimates ``grad KL(pi_theta || pi_ref exp(beta r) / Z)``.

    ``loss = (1/N) sum_i w_i * sg(l_i - l_ref_i - beta * r_i - b_i) * l_i`` with ``sg`` stop-gradient, so
    ``grad loss = (1/N) sum_i w_i (l_i - l_ref_i - beta r_i - b_i) grad l_i``. On-policy (``w = 1``, ``y ~ pi_theta``)
    its expectation is exactly ``grad KL`` for any constant baseline ``b`` (``E[grad log pi] = 0``); with
    ``b = -log Z`` it equals half the gradient of the TB loss sample by sample (Proposition 1). Its *value*
    is not the KL; ``return_stats`` reports the KL estimate ``mean_i (l_i - l_ref_i - beta r_i)`` (up to
    ``log Z``) as ``"kl_estimate"``.

    Args mirror `trajectory_balance_loss`; ``baseline`` is a float or a ``[B]``/``[B, 1]`` tensor
    (detached), and ``length_normalization`` defaults to False here, the exact KL.
    """
    require_tensor("logprobs", logprobs)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    extra: list[tuple[str, torch.Tensor]] = []
    if isinstance(baseline, torch.Tensor):
        extra.append(("baseline", _as_sequence_vector("baseline", baseline, logprobs.shape[0]).detach()))
    elif baseline is not None:
        require_finite_number("baseline", baseline)
    prep = _prepare(
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        rewards=rewards,
        mask=mask,
        extra=extra,
        beta=beta,
        old_logprobs=old_logprobs,
        rollout_logprobs=rollout_logprobs,
        importance_weights=importance_weights,
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        tis_cap=tis_cap,
        token_clip_mask=False,
        length_normalization=length_normalization,
    )
    dtype = prep.seq_logprobs.dtype
    log_ratio = prep.seq_logprobs.detach() - prep.seq_ref_logprobs - beta * prep.rewards
    b = extra[0][1].to(dtype) if extra else (float(baseline) if baseline is not None else 0.0)
    per_sequence = prep.weights * (log_ratio - b) * prep.seq_logprobs
    loss = reduce_sequences(per_sequence, prep.valid, reduction=reduction, normalizer=normalizer)
    if not return_stats:
        return loss
    stats = prep.stats
    stats["kl_estimate"] = _mean_over(prep.weights * log_ratio, prep.valid)
    stats["loss"] = loss.detach() if reduction != "none" else _mean_over(per_sequence, prep.valid)
    return loss, stats

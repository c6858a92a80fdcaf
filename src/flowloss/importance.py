"""Detached importance weights ``w_i`` for rollouts sampled from an older policy.

With token log-ratios ``rho_it = log pi_theta(y_it) - log pi_old(y_it)`` (masked), each mode computes ``log w_i``
in log space and exponentiates once, so log-ratios of +-1000 never overflow:

| mode | ``w_i`` | reproduces |
|---|---|---|
| ``"sequence_clipped"`` | ``clip(exp(sum_t rho_it), 1 - eps_low, 1 + eps_high)`` | the paper; PR #3924 (0.8, 1.28) |
| ``"sequence_capped"`` | ``min(exp(sum_t rho_it), max_weight)`` | verl ``recipe/flowrl`` "pure" (PR #4397, 10) |
| ``"sequence"`` | ``exp(sum_t rho_it)`` (unclipped) | the original release (decbc57) |
| ``"geometric_clipped"`` | ``clip(exp(mean_t rho_it), 1 - eps_low, 1 + eps_high)`` | the authors' dev variant |
| ``"none"`` | ``1`` | on-policy training |

``"sequence"`` is exact (``pi/pi_old``) and keeps Proposition 1 true off-policy; it is the only mode whose
weight can be huge. So that the *loss* stays finite (not just ``w``), its ``log w`` is capped at
``UNCLIPPED_LOG_WEIGHT_LIMIT = 20`` (``w <= 4.9e8``), a bound only policies that have already diverged reach.

Truncated importance sampling (TIS) against the inference engine: with ``rollout_logprobs`` given, ``w_i`` is
multiplied by ``min(exp(agg_t (log pi_old - log pi_rollout)), tis_cap)``, ``agg`` being the mode's aggregation
(``sum`` for the sequence modes, ``mean`` for the geometric one). A rollout log-prob of ``-inf``
(``pi_rollout = 0``) gives the factor exactly ``tis_cap``, the truncation of an infinite ratio; ``+inf`` gives NaN.

An all-masked row has ``sum = mean = 0``, hence ``w = 1`` (clipped into range); losses leave it out anyway.
No function here synchronises with the device; a non-finite log-prob at an unmasked position (including
``+-inf``, which a clip would otherwise turn into a finite weight) gives a NaN weight (strict mode raises
instead, see `flowloss.strict`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from flowloss._deprecation import warn_deprecated
from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    check_finite_where,
    describe,
    require_choice,
    require_float_tensor,
    require_ndim,
    require_same_device,
    require_same_shape,
)
from flowloss.options import IMPORTANCE_MODES, TB_DEFAULTS, ImportanceMode, check_importance_bounds
from flowloss.strict import is_strict

# Cap of log w in the "unclipped" sequence mode: keeps w * g(delta) finite in float32.
UNCLIPPED_LOG_WEIGHT_LIMIT = 20.0
# Defaults are the losses' (one default per option, in flowloss.options).
_D = TB_DEFAULTS
_WITH_OLD = TB_DEFAULTS.resolved_importance_weights(has_old_logprobs=True)  # the paper's weight


class ImportanceWeights(NamedTuple):
    """Weights ``[B]`` (detached) and the diagnostics the FlowRL authors log."""

    weights: torch.Tensor
    log_weights_unclipped: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def check_importance_options(mode: str, eps_low: float, eps_high: float, max_weight: float, tis_cap: float) -> None:
    """Refuse an unknown ``mode`` or an out-of-range clip/cap option, naming it."""
    require_choice("importance_weights", mode, IMPORTANCE_MODES)
    check_importance_bounds(eps_low, eps_high, max_weight, tis_cap)


def masked_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]``: ``sum_t`` over ``mask``; masked entries are selected away (never multiplied by 0)."""
    return torch.where(mask, values, 0.0).sum(dim=-1)


def log_weights(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    *,
    mode: str,
    eps_low: float,
    eps_high: float,
    max_weight: float,
    rollout_log_ratio: torch.Tensor | None,
    tis_cap: float,
) -> ImportanceWeights:
    """Weights from detached token log-ratios ``log pi - log pi_old`` ``[B, T]`` (already in the accumulation
    dtype) over ``mask`` with ``lengths = sum_t mask`` ``[B]``; ``rollout_log_ratio = log pi_old - log
    pi_rollout`` enables TIS. The shared core of the losses and `clipped_importance_weights`."""
    geometric = mode == "geometric_clipped"
    if mode == "none":
        log_w = torch.zeros_like(lengths)
    else:
        log_w = masked_token_sum(log_ratio, mask)
        if geometric:
            log_w = log_w / lengths.clamp_min(1.0)
    if mode in ("sequence_clipped", "geometric_clipped"):
        lo, hi = math.log1p(-eps_low), math.log1p(eps_high)
        low, high = log_w < lo, log_w > hi
        clipped = log_w.clamp(lo, hi)
    else:
        cap = math.log(max_weight) if mode == "sequence_capped" else UNCLIPPED_LOG_WEIGHT_LIMIT
        low = torch.zeros_like(log_w, dtype=torch.bool)
        high = log_w > cap if mode != "none" else low
        clipped = log_w.clamp_max(cap) if mode != "none" else log_w
    if mode != "none":
        clipped = _nan_unless_finite(log_w, clipped)
    if rollout_log_ratio is not None:
        log_tis = masked_token_sum(rollout_log_ratio, mask)
        if geometric:
            log_tis = log_tis / lengths.clamp_min(1.0)
        # pi_rollout = 0 (log-prob -inf) makes pi_old / pi_rollout infinite: truncated to exactly C, as TIS
        # means. A log-prob of +inf (probability above 1) cannot be truncated into anything: NaN.
        truncated = log_tis.clamp_max(math.log(tis_cap))
        clipped = clipped + torch.where(log_tis > float("-inf"), truncated, float("nan"))
    return ImportanceWeights(torch.exp(clipped), log_w, low, high)


def _nan_unless_finite(raw: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """``clipped`` where the unclipped log-weight ``raw`` is finite, NaN elsewhere.

    A clip or cap would turn an infinite log-ratio (an old log-prob of ``-inf`` or ``+inf`` at a kept token: a
    token its sampler could not have drawn) into a finite weight: a silently finite result from a bad input.
    """
    return torch.where(torch.isfinite(raw), clipped, float("nan"))


def importance_weights_with_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    importance_weights: ImportanceMode = _WITH_OLD,
    eps_low: float = _D.eps_low,
    eps_high: float = _D.eps_high,
    max_weight: float = _D.max_weight,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = _D.tis_cap,
    strict: bool | None = None,
) -> ImportanceWeights:
    """`clipped_importance_weights` plus the unclipped log-weights and the clip indicators ``[B]``."""
    check_importance_options(importance_weights, eps_low, eps_high, max_weight, tis_cap)
    require_float_tensor("logprobs", logprobs)
    require_float_tensor("old_logprobs", old_logprobs)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    strict = is_strict(strict)
    m = as_bool_mask("mask", mask, "logprobs", logprobs, strict=strict)
    if rollout_logprobs is not None:
        require_float_tensor("rollout_logprobs", rollout_logprobs)
        require_same_shape("rollout_logprobs", rollout_logprobs, "logprobs", logprobs)
    require_same_device(
        [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("mask", m), ("rollout_logprobs", rollout_logprobs)]
    )
    if strict:
        check_finite_where(
            m, [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)]
        )
    dtype = accumulation_dtype(logprobs, old_logprobs, rollout_logprobs)
    old = old_logprobs.detach().to(dtype)
    rollout = None if rollout_logprobs is None else old - rollout_logprobs.detach().to(dtype)
    return log_weights(
        logprobs.detach().to(dtype) - old,
        m,
        m.sum(dim=-1).to(dtype),
        mode=importance_weights,
        eps_low=float(eps_low),
        eps_high=float(eps_high),
        max_weight=float(max_weight),
        rollout_log_ratio=rollout,
        tis_cap=float(tis_cap),
    )


def _renamed_mode(mode: str | None, importance_weights: str) -> str:
    if mode is None:
        return importance_weights
    warn_deprecated("`mode=`", "pass `importance_weights=` (the name the losses and FlowRLOptions use)", stacklevel=4)
    return mode


def clipped_importance_weights(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    importance_weights: ImportanceMode = _WITH_OLD,
    eps_low: float = _D.eps_low,
    eps_high: float = _D.eps_high,
    max_weight: float = _D.max_weight,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = _D.tis_cap,
    strict: bool | None = None,
    mode: ImportanceMode | None = None,
) -> torch.Tensor:
    """Detached per-sequence importance weights ``w [B]`` for FlowRL's loss.

    The modes, their formulas and the code each reproduces are tabulated in ``docs/math.md`` (importance
    weights); all are computed in log space, so log-ratios of +-1000 never overflow.

    Args:
        logprobs: ``[B, T]`` token log-probs under the current policy ``pi_theta`` (gradient is not used).
        old_logprobs: ``[B, T]`` token log-probs under the policy that sampled the rollouts, ``pi_old``.
        mask: ``[B, T]`` response mask (bool, or numbers read as ``mask != 0``).
        importance_weights: which weight (default ``"sequence_clipped"``, the paper's
            ``clip(pi/pi_old, 1-eps, 1+eps)``).
        eps_low: lower clip ``1 - eps_low`` of the clipped modes (authors' 0.2).
        eps_high: upper clip ``1 + eps_high`` of the clipped modes (authors' 0.28).
        max_weight: cap of ``"sequence_capped"`` (10, verl ``recipe/flowrl``).
        rollout_logprobs: ``[B, T]`` log-probs from the inference engine; enables the TIS factor.
        tis_cap: truncation ``C`` of the TIS factor ``min(pi_old / pi_rollout, C)`` (verl's default 2).
        strict: check values (finite at unmasked positions, 0/1 mask); default: the global setting.
        mode: deprecated name of ``importance_weights`` (since 0.2.0; removed in 0.3.0).

    Returns:
        ``[B]`` weights in float32 (float64 for float64 inputs), without gradient.
    """
    return importance_weights_with_stats(
        logprobs,
        old_logprobs,
        mask,
        importance_weights=_renamed_mode(mode, importance_weights),  # type: ignore[arg-type]
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        rollout_logprobs=rollout_logprobs,
        tis_cap=tis_cap,
        strict=strict,
    ).weights


def clip_drop_mask(
    log_ratio: torch.Tensor, advantages: torch.Tensor, *, eps_low: float, eps_high: float
) -> torch.Tensor:
    """``[B, T]`` bool: tokens whose ratio left the trust region in the direction ``sign(A_i)`` pushes.

    ``log_ratio [B, T]`` detached, ``advantages [B]``: drop where ``A_i > 0 and rho_it > log(1 + eps_high)``
    or ``A_i < 0 and rho_it < log(1 - eps_low)`` (strict inequalities: a ratio exactly on the bound is kept).
    A non-finite ``rho`` (NaN, or an infinite log-prob) is never dropped: it must reach the loss, not vanish.
    """
    adv = advantages[:, None]
    outside = ((adv > 0) & (log_ratio > math.log1p(eps_high))) | ((adv < 0) & (log_ratio < math.log1p(-eps_low)))
    return outside & torch.isfinite(log_ratio)


def ratio_clip_token_mask(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = _D.eps_low,
    eps_high: float = _D.eps_high,
    strict: bool | None = None,
) -> torch.Tensor:
    """CISPO-style token mask of verl PR #3924: drop tokens whose ratio left the trust region in the
    direction the advantage pushes.

    Keeps token ``t`` of row ``i`` unless ``A_i > 0 and r_it > 1 + eps_high`` or ``A_i < 0 and r_it < 1 - eps_low``,
    with ``r_it = pi_theta / pi_old`` compared in log space (a ratio exactly on a bound is kept).
    ``advantages [B]`` (FlowRL passes ``r_hat``). Returns a bool ``[B, T]`` mask (a subset of ``mask``). A token
    whose ratio is not finite (a NaN or infinite log-prob) is kept, so that the bad value reaches the loss.
    """
    eps_low, eps_high, _, _ = check_importance_bounds(eps_low, eps_high, _D.max_weight, _D.tis_cap)
    require_float_tensor("logprobs", logprobs)
    require_float_tensor("old_logprobs", old_logprobs)
    require_float_tensor("advantages", advantages)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"`advantages` must have shape ({logprobs.shape[0]},), got {describe(advantages)}")
    m = as_bool_mask("mask", mask, "logprobs", logprobs, strict=is_strict(strict))
    require_same_device(
        [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", m)]
    )
    dtype = accumulation_dtype(logprobs, old_logprobs)
    log_ratio = logprobs.detach().to(dtype) - old_logprobs.detach().to(dtype)
    drop = clip_drop_mask(log_ratio, advantages.detach().to(dtype), eps_low=eps_low, eps_high=eps_high)
    return m & ~drop

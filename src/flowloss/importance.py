"""Detached importance weights ``w_i`` for rollouts sampled from an older policy.

With token log-ratios ``rho_it = log pi_theta(y_it) - log pi_old(y_it)`` (masked), each mode computes ``log w_i``
in log space and exponentiates once, so log-ratios of +-1000 never overflow:

============================  =====================================================  ==============================
mode                          ``w_i``                                                reproduces
============================  =====================================================  ==============================
``"sequence_clipped"``        ``clip(exp(sum_t rho_it), 1 - eps_low, 1 + eps_high)`` the paper (Eq. for ``w``);
                                                                                     PR #3924 with ``[0.8, 1.28]``
``"sequence_capped"``         ``min(exp(sum_t rho_it), max_weight)``                 verl ``recipe/flowrl`` "pure"
                                                                                     (PR #4397, ``max_weight=10``)
``"sequence"``                ``exp(sum_t rho_it)`` (unclipped)                      the original release (decbc57)
``"geometric_clipped"``       ``clip(exp(mean_t rho_it), 1 - eps_low, 1 + eps_high)`` the authors' dev variant
``"none"``                    ``1``                                                  on-policy training
============================  =====================================================  ==============================

``"sequence"`` is exact (``pi/pi_old``) and keeps Proposition 1 true off-policy; it is the only mode whose
weight can be huge. So that the *loss* stays finite (not just ``w``), its ``log w`` is capped at
``UNCLIPPED_LOG_WEIGHT_LIMIT = 20`` (``w <= 4.9e8``), a bound only policies that have already diverged reach.

Truncated importance sampling (TIS) against the inference engine: with ``rollout_logprobs`` given, ``w_i`` is
multiplied by ``min(exp(agg_t (log pi_old - log pi_rollout)), tis_cap)``, ``agg`` being the mode's aggregation
(``sum`` for the sequence modes, ``mean`` for the geometric one).

An all-masked row has ``sum = mean = 0``, hence ``w = 1`` (clipped into range); losses leave it out anyway.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    describe,
    require_choice,
    require_float,
    require_ndim,
    require_same_device,
    require_same_shape,
    require_tensor,
)

ImportanceMode = Literal["sequence_clipped", "sequence_capped", "sequence", "geometric_clipped", "none"]
IMPORTANCE_MODES: tuple[str, ...] = (
    "sequence_clipped",
    "sequence_capped",
    "sequence",
    "geometric_clipped",
    "none",
)

# Authors' clip ratios (verl recipe/flowrl: clip_ratio_low=0.2, clip_ratio_high=0.28).
DEFAULT_EPS_LOW = 0.2
DEFAULT_EPS_HIGH = 0.28
# verl recipe/flowrl "pure" implementation: `torch.clamp(imp_w, max=10)`.
DEFAULT_MAX_WEIGHT = 10.0
# verl's default truncated-IS cap (`tis_imp_ratio_cap`).
DEFAULT_TIS_CAP = 2.0
# Cap of log w in the "unclipped" sequence mode: keeps w * g(delta) finite in float32.
UNCLIPPED_LOG_WEIGHT_LIMIT = 20.0


class ImportanceWeights(NamedTuple):
    """Weights ``[B]`` (detached) and the diagnostics the FlowRL authors log."""

    weights: torch.Tensor
    log_weights_unclipped: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def check_importance_options(mode: str, eps_low: float, eps_high: float, max_weight: float, tis_cap: float) -> None:
    """Refuse an unknown ``mode`` or an out-of-range clip/cap option, naming it."""
    require_choice("mode", mode, IMPORTANCE_MODES)
    for name, value, lo, hi in (("eps_low", eps_low, 0.0, 1.0), ("eps_high", eps_high, 0.0, math.inf)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value < hi):
            raise ValueError(f"`{name}` must be a number in [{lo}, {hi}), got {value!r}")
    for name, value in (("max_weight", max_weight), ("tis_cap", tis_cap)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")


def _require_finite_where(mask: torch.Tensor, tensors: list[tuple[str, torch.Tensor | None]]) -> None:
    """Refuse non-finite values at unmasked positions (one host sync; the culprit is searched only on failure)."""
    present = [(n, t) for n, t in tensors if t is not None]
    finite = [torch.isfinite(t.detach()) | ~mask for _, t in present]
    if bool(torch.stack([f.all() for f in finite]).all()):
        return
    for (name, t), ok in zip(present, finite):
        if not bool(ok.all()):
            raise ValueError(
                f"`{name}` must be finite at unmasked positions, found {int((~ok).sum())} non-finite value(s) "
                f"in {describe(t)}"
            )


def _masked_log_ratio(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, mean: bool):
    zero = torch.zeros((), dtype=dtype, device=a.device)
    diff = torch.where(mask, a.detach().to(dtype) - b.detach().to(dtype), zero)
    total = diff.sum(dim=-1)
    if mean:
        return total / mask.sum(dim=-1).to(dtype).clamp_min(1.0)
    return total


def importance_weights_with_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: ImportanceMode = "sequence_clipped",
    eps_low: float = DEFAULT_EPS_LOW,
    eps_high: float = DEFAULT_EPS_HIGH,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = DEFAULT_TIS_CAP,
) -> ImportanceWeights:
    """`clipped_importance_weights` plus the unclipped log-weights and the clip indicators ``[B]``."""
    check_importance_options(mode, eps_low, eps_high, max_weight, tis_cap)
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs)):
        require_tensor(name, t)
        require_float(name, t)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    m = as_bool_mask("mask", mask, "logprobs", logprobs)
    if rollout_logprobs is not None:
        require_tensor("rollout_logprobs", rollout_logprobs)
        require_float("rollout_logprobs", rollout_logprobs)
        require_same_shape("rollout_logprobs", rollout_logprobs, "logprobs", logprobs)
    require_same_device(
        [
            ("logprobs", logprobs),
            ("old_logprobs", old_logprobs),
            ("mask", m),
            ("rollout_logprobs", rollout_logprobs),
        ]
    )
    dtype = accumulation_dtype(logprobs, old_logprobs, rollout_logprobs)
    batch = logprobs.shape[0]
    _require_finite_where(
        m, [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)]
    )
    geometric = mode == "geometric_clipped"
    if mode == "none":
        log_w = torch.zeros(batch, dtype=dtype, device=logprobs.device)
    else:
        log_w = _masked_log_ratio(logprobs, old_logprobs, m, dtype, mean=geometric)
    low = torch.zeros(batch, dtype=torch.bool, device=logprobs.device)
    high = torch.zeros_like(low)
    if mode in ("sequence_clipped", "geometric_clipped"):
        lo, hi = math.log1p(-eps_low), math.log1p(eps_high)
        low, high = log_w < lo, log_w > hi
        clipped = log_w.clamp(lo, hi)
    elif mode == "sequence_capped":
        cap = math.log(max_weight)
        high = log_w > cap
        clipped = log_w.clamp_max(cap)
    else:
        high = log_w > UNCLIPPED_LOG_WEIGHT_LIMIT
        clipped = log_w.clamp_max(UNCLIPPED_LOG_WEIGHT_LIMIT)
    if rollout_logprobs is not None:
        log_tis = _masked_log_ratio(old_logprobs, rollout_logprobs, m, dtype, mean=geometric)
        clipped = clipped + log_tis.clamp_max(math.log(tis_cap))
    return ImportanceWeights(torch.exp(clipped), log_w, low, high)


def clipped_importance_weights(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: ImportanceMode = "sequence_clipped",
    eps_low: float = DEFAULT_EPS_LOW,
    eps_high: float = DEFAULT_EPS_HIGH,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = DEFAULT_TIS_CAP,
) -> torch.Tensor:
    """Detached per-sequence importance weights ``w [B]`` for FlowRL's loss (see the module docstring table).

    Args:
        logprobs: ``[B, T]`` token log-probs under the current policy ``pi_theta`` (gradient is not used).
        old_logprobs: ``[B, T]`` token log-probs under the policy that sampled the rollouts, ``pi_old``.
        mask: ``[B, T]`` response mask (bool or 0/1).
        mode: which weight (default ``"sequence_clipped"``, the paper's ``clip(pi/pi_old, 1-eps, 1+eps)``).
        eps_low: lower clip ``1 - eps_low`` of the clipped modes (authors' 0.2).
        eps_high: upper clip ``1 + eps_high`` of the clipped modes (authors' 0.28).
        max_weight: cap of ``"sequence_capped"`` (10, verl ``recipe/flowrl``).
        rollout_logprobs: ``[B, T]`` log-probs from the inference engine; enables the TIS factor.
        tis_cap: truncation ``C`` of the TIS factor ``min(pi_old / pi_rollout, C)`` (verl's default 2).

    Returns:
        ``[B]`` weights in float32 (float64 for float64 inputs), finite, without gradient.
    """
    return importance_weights_with_stats(
        logprobs,
        old_logprobs,
        mask,
        mode=mode,
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        rollout_logprobs=rollout_logprobs,
        tis_cap=tis_cap,
    ).weights


def ratio_clip_token_mask(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = DEFAULT_EPS_LOW,
    eps_high: float = DEFAULT_EPS_HIGH,
) -> torch.Tensor:
    """CISPO-style token mask of verl PR #3924: drop tokens whose ratio left the trust region in the
    direction the advantage pushes.

    Keeps token ``t`` of row ``i`` unless ``A_i > 0 and r_it > 1 + eps_high`` or ``A_i < 0 and r_it < 1 - eps_low``,
    with ``r_it = pi_theta / pi_old`` compared in log space. ``advantages [B]`` (FlowRL passes ``r_hat``).
    Returns a bool ``[B, T]`` mask (a subset of ``mask``).
    """
    check_importance_options("none", eps_low, eps_high, DEFAULT_MAX_WEIGHT, DEFAULT_TIS_CAP)
    require_tensor("advantages", advantages)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"`advantages` must have shape ({logprobs.shape[0]},), got {describe(advantages)}")
    m = as_bool_mask("mask", mask, "logprobs", logprobs)
    dtype = accumulation_dtype(logprobs, old_logprobs)
    log_ratio = logprobs.detach().to(dtype) - old_logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype)[:, None]
    drop = ((adv > 0) & (log_ratio > math.log1p(eps_high))) | ((adv < 0) & (log_ratio < math.log1p(-eps_low)))
    return m & ~drop

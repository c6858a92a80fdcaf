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
[`reverse_kl_surrogate`][flowloss.reverse_kl_surrogate] is the score-function form of the same gradient.

Hot path: no function here synchronises with the device (no ``.item()``/``bool(tensor)``), so a training step
can run ahead of the GPU, be captured in a CUDA graph and be compiled with ``torch.compile(fullgraph=True)``;
value checks run in strict mode only (see `flowloss.strict`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, overload

import torch

from flowloss._tensors import as_dtype, constant
from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    as_flag,
    as_number,
    check_finite_values,
    check_finite_where,
    describe,
    require_choice,
    require_float_tensor,
    require_ndim,
    require_same_device,
    require_same_shape,
)
from flowloss.importance import clip_drop_mask, log_weights, masked_token_sum
from flowloss.ops.dispatch import LOSS_IMPLS, choose
from flowloss.options import (
    REVERSE_KL_DEFAULTS,
    TB_DEFAULTS,
    FlowRLOptions,
    ImportanceMode,
    Penalty,
    ReverseKLOptions,
    SequenceReduction,
)
from flowloss.penalties import apply_penalty
from flowloss.reductions import apply_reduction, check_normalizer
from flowloss.strict import is_strict

Stats = dict[str, torch.Tensor]
LossImpl = Literal["auto", "triton", "pytorch"]
# Signature defaults are read from the options types (each default is written once, in flowloss.options).
_TB = TB_DEFAULTS
_RKL = REVERSE_KL_DEFAULTS
# The reverse-KL surrogate has no fused kernel (a few element-wise passes): "triton" is not among its impls.
REVERSE_KL_IMPLS: tuple[str, ...] = tuple(i for i in LOSS_IMPLS if i != "triton")


class _SequenceTerms(NamedTuple):
    """The per-sequence quantities both losses are built from (accumulation dtype, ``[B]`` each)."""

    seq_logprobs: torch.Tensor  # l_i, with the gradient of `logprobs` (TB: l_i - l_ref_i, see `difference`)
    seq_ref_logprobs: torch.Tensor | None  # l_ref_i, detached (None when folded into seq_logprobs)
    rewards: torch.Tensor  # r_hat_i, detached
    weights: torch.Tensor | None  # w_i, detached (None: all 1)
    contributes: torch.Tensor  # bool: rows with at least one kept token (their term enters the sum)
    counted: torch.Tensor  # bool: rows with at least one token in `mask` (the default count N)
    lengths: torch.Tensor  # |y_i| after the token clip mask
    kept: torch.Tensor  # [B, T] bool: tokens that enter the means
    iw: Any  # ImportanceWeights or None (diagnostics)


def _check_inputs(
    logprobs: object,
    ref_logprobs: object,
    rewards: object,
    mask: object,
    old_logprobs: object,
    rollout_logprobs: object,
    extra: list[tuple[str, torch.Tensor]],
    strict: bool,
) -> torch.Tensor:
    """Metadata checks of the shared inputs; returns the bool mask. Value checks only when ``strict``."""
    for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("rewards", rewards)):
        require_float_tensor(name, t)
    assert isinstance(logprobs, torch.Tensor) and isinstance(ref_logprobs, torch.Tensor)
    assert isinstance(rewards, torch.Tensor)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    batch = logprobs.shape[0]
    if rewards.shape != (batch,):
        raise ValueError(f"`rewards` must have shape ({batch},) (one per sequence), got {describe(rewards)}")
    m = as_bool_mask("mask", mask, "logprobs", logprobs, strict=strict)
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            require_float_tensor(name, t)
            require_same_shape(name, t, "logprobs", logprobs)  # type: ignore[arg-type]
    require_same_device(
        [
            ("logprobs", logprobs),
            ("ref_logprobs", ref_logprobs),
            ("rewards", rewards),
            ("mask", m),
            ("old_logprobs", old_logprobs),  # type: ignore[list-item]
            ("rollout_logprobs", rollout_logprobs),  # type: ignore[list-item]
            *extra,
        ]
    )
    if rollout_logprobs is not None and old_logprobs is None:
        raise ValueError("`rollout_logprobs` (truncated IS) needs `old_logprobs` (got None)")
    if strict:
        check_finite_where(
            m,
            [
                ("logprobs", logprobs),
                ("ref_logprobs", ref_logprobs),
                ("old_logprobs", old_logprobs),  # type: ignore[list-item]
                ("rollout_logprobs", rollout_logprobs),  # type: ignore[list-item]
            ],
        )
        check_finite_values([("rewards", rewards.detach())] + [(n, t.detach()) for n, t in extra])
    return m


def _sequence_terms(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    m: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    *,
    opts: FlowRLOptions | ReverseKLOptions,
    mode: str,
    token_clip_mask: bool,
    dtype: torch.dtype,
    difference: bool,
) -> _SequenceTerms:
    """Masked sums over tokens, lengths, weights: the few element-wise passes both losses need.

    ``opts``: the validated options (``mode``, the weight mode in effect, resolved from them;
    ``token_clip_mask``: whether the CISPO token mask applies, a TB option).

    ``difference=True`` folds the reference into one reduction, ``seq_logprobs = l_i - l_ref_i`` (what the
    TB residual needs; one pass fewer), and leaves ``seq_ref_logprobs`` None.
    """
    eps_low, eps_high = opts.eps_low, opts.eps_high
    r = constant(rewards, dtype)
    kept = m
    log_ratio = None
    if old_logprobs is not None:
        old = constant(old_logprobs, dtype)
        log_ratio = constant(logprobs, dtype) - old
        if token_clip_mask:
            kept = m & ~clip_drop_mask(log_ratio, r, eps_low=eps_low, eps_high=eps_high)
    lengths = kept.sum(dim=-1).to(dtype)
    lp = as_dtype(logprobs, dtype)
    ref = constant(ref_logprobs, dtype)
    if difference:
        seq_lp, seq_ref = masked_token_sum(lp - ref, kept), None
    else:
        seq_lp, seq_ref = masked_token_sum(lp, kept), masked_token_sum(ref, kept)
    if opts.length_normalization:
        denominator = lengths.clamp_min(1.0)
        seq_lp = seq_lp / denominator
        seq_ref = None if seq_ref is None else seq_ref / denominator
    iw = None
    if log_ratio is not None:
        rollout = None
        if rollout_logprobs is not None:
            rollout = old - constant(rollout_logprobs, dtype)
        iw = log_weights(
            log_ratio,
            kept,
            lengths,
            mode=mode,
            eps_low=eps_low,
            eps_high=eps_high,
            max_weight=opts.max_weight,
            rollout_log_ratio=rollout,
            tis_cap=opts.tis_cap,
        )
    return _SequenceTerms(
        seq_logprobs=seq_lp,
        seq_ref_logprobs=seq_ref,
        rewards=r,
        weights=None if iw is None else iw.weights,
        contributes=lengths > 0,
        counted=m.any(dim=-1),
        lengths=lengths,
        kept=kept,
        iw=iw,
    )


def _mean_over(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows, values.detach(), 0.0).sum() / rows.sum().clamp_min(1)


def _base_stats(
    terms: _SequenceTerms,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    m: torch.Tensor,
    length_normalization: bool,
) -> dict[str, torch.Tensor]:
    """Detached diagnostics shared by both losses (computed only for ``return_stats``)."""
    dtype, rows = terms.rewards.dtype, terms.contributes
    seq_lp = masked_token_sum(logprobs.detach().to(dtype), terms.kept)
    seq_ref = masked_token_sum(ref_logprobs.detach().to(dtype), terms.kept)
    if length_normalization:
        seq_lp, seq_ref = seq_lp / terms.lengths.clamp_min(1.0), seq_ref / terms.lengths.clamp_min(1.0)
    stats = {
        "valid_sequences": terms.counted.sum(),
        "logprobs_mean": _mean_over(seq_lp, rows),
        "ref_logprobs_mean": _mean_over(seq_ref, rows),
        "reward_mean": _mean_over(terms.rewards, rows),
        "response_length_mean": _mean_over(terms.lengths, rows),
    }
    if terms.kept is not m:
        stats["token_clip_frac"] = (m & ~terms.kept).sum() / m.sum().clamp_min(1)
    iw = terms.iw
    if iw is not None:
        stats.update(_weight_stats(iw.log_weights_unclipped, iw.weights, iw.clipped_low, iw.clipped_high, rows))
    return stats


def _weight_stats(log_w_unclipped, weights, clipped_low, clipped_high, rows) -> dict[str, torch.Tensor]:
    """The authors' importance-weight diagnostics, means over ``rows`` (both loss paths report these)."""
    dtype = weights.dtype
    log_cap = math.log(torch.finfo(dtype).max) - 1.0  # exp() of the unclipped log-weight stays finite
    low, high = _mean_over(clipped_low.to(dtype), rows), _mean_over(clipped_high.to(dtype), rows)
    return {
        "log_weight_unclipped_mean": _mean_over(log_w_unclipped, rows),
        "weight_unclipped_mean": _mean_over(log_w_unclipped.clamp_max(log_cap).exp(), rows),
        "weight_mean": _mean_over(weights, rows),
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
    }


def _residual_stats(log_z, delta, per_sequence, loss, reduction, rows) -> dict[str, torch.Tensor]:
    """log Z, the residual and the loss as diagnostics (both TB loss paths report these)."""
    return {
        "log_z_mean": _mean_over(as_dtype(log_z, delta.dtype), rows),
        "residual_mean": _mean_over(delta, rows),
        "residual_abs_mean": _mean_over(delta.abs(), rows),
        "loss": loss.detach() if reduction != "none" else _mean_over(per_sequence, rows),
    }


def _as_sequence_vector(name: str, t: object, batch: int) -> torch.Tensor:
    require_float_tensor(name, t)
    assert isinstance(t, torch.Tensor)
    if t.shape == (batch, 1):
        return t.squeeze(-1)
    if t.shape != (batch,):
        raise ValueError(f"`{name}` must have shape ({batch},) or ({batch}, 1), got {describe(t)}")
    return t


@overload
def trajectory_balance_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = ...,
    old_logprobs: torch.Tensor | None = ...,
    rollout_logprobs: torch.Tensor | None = ...,
    importance_weights: ImportanceMode | None = ...,
    eps_low: float = ...,
    eps_high: float = ...,
    max_weight: float = ...,
    tis_cap: float = ...,
    token_clip_mask: bool = ...,
    length_normalization: bool = ...,
    penalty: Penalty = ...,
    linex_alpha: float = ...,
    huber_delta: float = ...,
    reduction: SequenceReduction = ...,
    normalizer: float | torch.Tensor | None = ...,
    return_stats: Literal[False] = ...,
    strict: bool | None = ...,
    impl: LossImpl = ...,
) -> torch.Tensor: ...


@overload
def trajectory_balance_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = ...,
    old_logprobs: torch.Tensor | None = ...,
    rollout_logprobs: torch.Tensor | None = ...,
    importance_weights: ImportanceMode | None = ...,
    eps_low: float = ...,
    eps_high: float = ...,
    max_weight: float = ...,
    tis_cap: float = ...,
    token_clip_mask: bool = ...,
    length_normalization: bool = ...,
    penalty: Penalty = ...,
    linex_alpha: float = ...,
    huber_delta: float = ...,
    reduction: SequenceReduction = ...,
    normalizer: float | torch.Tensor | None = ...,
    return_stats: Literal[True],
    strict: bool | None = ...,
    impl: LossImpl = ...,
) -> tuple[torch.Tensor, Stats]: ...


def trajectory_balance_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = _TB.beta,
    old_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    importance_weights: ImportanceMode | None = _TB.importance_weights,
    eps_low: float = _TB.eps_low,
    eps_high: float = _TB.eps_high,
    max_weight: float = _TB.max_weight,
    tis_cap: float = _TB.tis_cap,
    token_clip_mask: bool = _TB.token_clip_mask,
    length_normalization: bool = _TB.length_normalization,
    penalty: Penalty = _TB.penalty,
    linex_alpha: float = _TB.linex_alpha,
    huber_delta: float = _TB.huber_delta,
    reduction: SequenceReduction = _TB.reduction,
    normalizer: float | torch.Tensor | None = None,
    return_stats: bool = False,
    strict: bool | None = None,
    impl: LossImpl = "auto",
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """FlowRL's trajectory-balance loss ``mean_i w_i * g(delta_i)``.

    ``delta_i = log Z(x_i) + l_i - beta * r_hat_i - l_ref_i`` with ``l`` the length-normalized (token-mean)
    log-likelihood by default, ``g(d) = d^2``, ``w_i`` detached importance weights (1 when ``old_logprobs`` is
    None). Gradients flow into ``logprobs`` and ``log_z``; ``ref_logprobs``, ``rewards`` and ``w`` are constants.
    The keyword options are the fields of [`FlowRLOptions`][flowloss.FlowRLOptions] (their defaults are its
    defaults): pass one as ``**options.to_dict()``, or hold a
    [`TrajectoryBalanceLoss`][flowloss.TrajectoryBalanceLoss] built from it.

    Args:
        logprobs: ``[B, T]`` token log-probs ``log pi_theta(y_t | x, y_<t)`` (with gradient).
        ref_logprobs: ``[B, T]`` token log-probs of the reference policy.
        rewards: ``[B]`` rewards ``r_hat`` as used in ``delta`` (normalize first, e.g. with
            [`group_normalize_rewards`][flowloss.group_normalize_rewards]; FlowRL uses the group z-score).
        log_z: ``[B]`` or ``[B, 1]`` log-partition estimates ``log Z(x_i)`` (e.g. from
            [`LogZHead`][flowloss.LogZHead]).
        mask: ``[B, T]`` response mask, bool (numbers are read as ``mask != 0``). All-masked rows contribute 0
            with a zero gradient (whatever their reward and log Z hold) and are not counted.
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
        token_clip_mask: drop tokens whose ratio left ``[1-eps_low, 1+eps_high]`` in the direction of
            ``sign(r_hat)`` from every mean and from ``w`` (verl PR #3924). A row whose tokens are all dropped
            contributes 0 but still counts in ``N``, so micro-batches add up to the full batch.
        length_normalization: token-mean (True, the paper) or token-sum (False, Proposition 1) log-likelihoods.
        penalty: ``"squared"`` (default), ``"shifted_cosh"``, ``"linex"`` or ``"huber"`` (all ``d^2 + O(d^3)``).
        linex_alpha: ``a`` of the ``"linex"`` penalty (1.0).
        huber_delta: ``k`` of the ``"huber"`` penalty (1.0).
        reduction: ``"mean"`` over valid sequences (default), ``"sum"`` or ``"none"`` (``[B]``, 0 for invalid
            rows).
        normalizer: divide the sum (or, for ``"none"``, each term) by this instead of the local valid count;
            pass the number of valid sequences in the whole optimizer step to make micro-batches/ranks add up
            to the full-batch gradient. A number, or a 1-element tensor (never read on the host: a tensor that
            is not finite and > 0 makes the loss NaN; strict mode raises instead).
        return_stats: also return a dict of detached diagnostics (mean log-probs, log Z, residual, weights before
            and after clipping, clip fractions).
        strict: value checks (finite inputs at unmasked positions, finite rewards/log Z, 0/1 mask, positive
            normalizer tensor) that read device memory; default: the global setting (`flowloss.strict`).
        impl: ``"auto"`` (default: the PyTorch ops, until the fused kernel has run on a GPU, see
            ``docs/hardware.md``), ``"triton"`` (the fused Triton kernels: one launch forward, one backward;
            CUDA fp16/bf16/fp32 inputs, or CPU under ``TRITON_INTERPRET=1``) or ``"pytorch"``. Both give the
            same loss, stats and gradients up to float32 rounding.

    Returns:
        The loss (0-dim, or ``[B]`` for ``reduction="none"``) in float32 (float64 for float64 inputs), and the
        stats dict when ``return_stats``. Outside strict mode a non-finite input at an unmasked position (a
        log-prob, an old or rollout log-prob, or the reward or log Z of a row with a kept token) gives a
        non-finite loss, never a silently finite one.
    """
    options = FlowRLOptions(
        beta=beta,
        importance_weights=importance_weights,
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        tis_cap=tis_cap,
        token_clip_mask=token_clip_mask,
        length_normalization=length_normalization,
        penalty=penalty,
        linex_alpha=linex_alpha,
        huber_delta=huber_delta,
        reduction=reduction,
    )
    return _trajectory_balance(
        options, logprobs, ref_logprobs, rewards, log_z, mask, old_logprobs=old_logprobs,
        rollout_logprobs=rollout_logprobs, normalizer=normalizer, return_stats=return_stats, strict=strict, impl=impl,
    )


def _trajectory_balance(
    options: FlowRLOptions,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    normalizer: float | torch.Tensor | None,
    return_stats: bool,
    strict: bool | None,
    impl: str,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """The one core of `trajectory_balance_loss` and `TrajectoryBalanceLoss`: the loss for validated ``options``."""
    opts = options
    return_stats = as_flag("return_stats", return_stats)
    strict = is_strict(strict)
    require_float_tensor("logprobs", logprobs)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    log_z_vec = _as_sequence_vector("log_z", log_z, logprobs.shape[0])
    m = _check_inputs(
        logprobs, ref_logprobs, rewards, mask, old_logprobs, rollout_logprobs, [("log_z", log_z_vec)], strict
    )
    mode = opts.resolved_importance_weights(old_logprobs is not None)
    if mode != "none" and old_logprobs is None:
        raise ValueError(f"`importance_weights={mode!r}` needs `old_logprobs` (got None)")
    if opts.token_clip_mask and old_logprobs is None:
        raise ValueError("`token_clip_mask=True` needs `old_logprobs` (got None)")
    norm = check_normalizer(normalizer, strict=strict)
    chosen = choose(
        "tb_loss",
        impl,
        [("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("rewards", rewards), ("log_z", log_z_vec),
         ("mask", m), ("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)],
    )
    if chosen == "triton":
        return _fused_trajectory_balance(
            logprobs, ref_logprobs, rewards, log_z_vec, m, old_logprobs, rollout_logprobs, opts, mode, norm,
            return_stats,
        )
    dtype = accumulation_dtype(logprobs, ref_logprobs, rewards, log_z_vec)
    terms = _sequence_terms(
        logprobs,
        ref_logprobs,
        rewards,
        m,
        old_logprobs,
        rollout_logprobs,
        opts=opts,
        mode=mode,
        token_clip_mask=opts.token_clip_mask,
        dtype=dtype,
        difference=not return_stats,
    )
    diff = terms.seq_logprobs if terms.seq_ref_logprobs is None else terms.seq_logprobs - terms.seq_ref_logprobs
    delta = as_dtype(log_z_vec, dtype) + diff - opts.beta * terms.rewards
    # Rows without a kept token take no part: their residual is 0 before the penalty, so a NaN reward or log Z
    # there cannot reach a gradient (0 * NaN) while the loss stays finite.
    delta = torch.where(terms.contributes, delta, 0.0)
    per_sequence = apply_penalty(delta, opts.penalty, linex_alpha=opts.linex_alpha, huber_delta=opts.huber_delta)
    if terms.weights is not None:
        per_sequence = terms.weights * per_sequence
    loss = apply_reduction(per_sequence, terms.contributes, terms.counted, opts.reduction, norm)
    if not return_stats:
        return loss
    stats = _base_stats(terms, logprobs, ref_logprobs, m, opts.length_normalization)
    rows = terms.contributes
    stats.update(_residual_stats(log_z_vec, delta, per_sequence, loss, opts.reduction, rows))
    return loss, stats


def _fused_trajectory_balance(logprobs, ref_logprobs, rewards, log_z, m, old, rollout, opts, mode, norm,
                              return_stats):
    """The loss (and its stats) from the fused op; the same math and the same stats as the PyTorch path."""
    from flowloss.ops.fused_tb import fused_tb_sequence_terms, reduce_per_sequence

    t = fused_tb_sequence_terms(logprobs, ref_logprobs, rewards, log_z, m, old, rollout, options=opts, mode=mode)
    loss = reduce_per_sequence(t.per_sequence, t.counted, opts.reduction, norm)
    if not return_stats:
        return loss
    rows = t.lengths > 0
    stats = {
        "valid_sequences": (t.counted > 0).sum(),
        "logprobs_mean": _mean_over(t.seq_logprobs, rows),
        "ref_logprobs_mean": _mean_over(t.seq_ref_logprobs, rows),
        "reward_mean": _mean_over(constant(rewards, torch.float32), rows),
        "response_length_mean": _mean_over(t.lengths, rows),
    }
    if opts.token_clip_mask:
        stats["token_clip_frac"] = (t.mask_lengths - t.lengths).sum() / t.mask_lengths.sum().clamp_min(1)
    if old is not None:
        stats.update(_weight_stats(t.log_weights_unclipped, t.weights, t.clipped_low, t.clipped_high, rows))
    stats.update(_residual_stats(log_z, t.delta, t.per_sequence, loss, opts.reduction, rows))
    return loss, stats


@overload
def reverse_kl_surrogate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = ...,
    baseline: torch.Tensor | float | None = ...,
    old_logprobs: torch.Tensor | None = ...,
    rollout_logprobs: torch.Tensor | None = ...,
    importance_weights: ImportanceMode | None = ...,
    eps_low: float = ...,
    eps_high: float = ...,
    max_weight: float = ...,
    tis_cap: float = ...,
    length_normalization: bool = ...,
    reduction: SequenceReduction = ...,
    normalizer: float | torch.Tensor | None = ...,
    return_stats: Literal[False] = ...,
    strict: bool | None = ...,
    impl: Literal["auto", "pytorch"] = ...,
) -> torch.Tensor: ...


@overload
def reverse_kl_surrogate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = ...,
    baseline: torch.Tensor | float | None = ...,
    old_logprobs: torch.Tensor | None = ...,
    rollout_logprobs: torch.Tensor | None = ...,
    importance_weights: ImportanceMode | None = ...,
    eps_low: float = ...,
    eps_high: float = ...,
    max_weight: float = ...,
    tis_cap: float = ...,
    length_normalization: bool = ...,
    reduction: SequenceReduction = ...,
    normalizer: float | torch.Tensor | None = ...,
    return_stats: Literal[True],
    strict: bool | None = ...,
    impl: Literal["auto", "pytorch"] = ...,
) -> tuple[torch.Tensor, Stats]: ...


def reverse_kl_surrogate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = _RKL.beta,
    baseline: torch.Tensor | float | None = None,
    old_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    importance_weights: ImportanceMode | None = _RKL.importance_weights,
    eps_low: float = _RKL.eps_low,
    eps_high: float = _RKL.eps_high,
    max_weight: float = _RKL.max_weight,
    tis_cap: float = _RKL.tis_cap,
    length_normalization: bool = _RKL.length_normalization,
    reduction: SequenceReduction = _RKL.reduction,
    normalizer: float | torch.Tensor | None = None,
    return_stats: bool = False,
    strict: bool | None = None,
    impl: Literal["auto", "pytorch"] = "auto",
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """Score-function surrogate whose gradient estimates ``grad KL(pi_theta || pi_ref exp(beta r) / Z)``.

    ``loss = (1/N) sum_i w_i * sg(l_i - l_ref_i - beta * r_i - b_i) * l_i`` with ``sg`` stop-gradient, so
    ``grad loss = (1/N) sum_i w_i (l_i - l_ref_i - beta r_i - b_i) grad l_i``. On-policy (``w = 1``, ``y ~ pi_theta``)
    its expectation is exactly ``grad KL`` for any constant baseline ``b`` (``E[grad log pi] = 0``); with
    ``b = -log Z`` it equals half the gradient of the TB loss sample by sample (Proposition 1). Its *value*
    is not the KL; ``return_stats`` reports the KL estimate ``mean_i (l_i - l_ref_i - beta r_i)`` (up to
    ``log Z``) as ``"kl_estimate"``.

    Args mirror [`trajectory_balance_loss`][flowloss.trajectory_balance_loss]; the keyword options are the fields
    of [`ReverseKLOptions`][flowloss.ReverseKLOptions] (``length_normalization`` defaults to False here, the
    exact KL); ``baseline`` is a float or a ``[B]``/``[B, 1]`` tensor (detached); ``impl`` is ``"auto"`` or
    ``"pytorch"`` (the surrogate has no fused kernel: its cost is a few element-wise passes).
    """
    options = ReverseKLOptions(
        beta=beta,
        importance_weights=importance_weights,
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        tis_cap=tis_cap,
        length_normalization=length_normalization,
        reduction=reduction,
    )
    return _reverse_kl(
        options, logprobs, ref_logprobs, rewards, mask, baseline=baseline, old_logprobs=old_logprobs,
        rollout_logprobs=rollout_logprobs, normalizer=normalizer, return_stats=return_stats, strict=strict, impl=impl,
    )


def _reverse_kl(
    options: ReverseKLOptions,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    baseline: torch.Tensor | float | None,
    old_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    normalizer: float | torch.Tensor | None,
    return_stats: bool,
    strict: bool | None,
    impl: str,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """The one core of `reverse_kl_surrogate` and `ReverseKLSurrogate`: the surrogate for validated ``options``."""
    opts = options
    if impl == "triton":
        raise ValueError("`impl='triton'`: reverse_kl_surrogate has no Triton kernel; use impl='auto' or 'pytorch'")
    require_choice("impl", impl, REVERSE_KL_IMPLS)
    return_stats = as_flag("return_stats", return_stats)
    strict = is_strict(strict)
    require_float_tensor("logprobs", logprobs)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    extra: list[tuple[str, torch.Tensor]] = []
    baseline_value = 0.0
    if isinstance(baseline, torch.Tensor):
        extra.append(("baseline", _as_sequence_vector("baseline", baseline, logprobs.shape[0]).detach()))
    elif baseline is not None:
        baseline_value = as_number("baseline", baseline)
    m = _check_inputs(logprobs, ref_logprobs, rewards, mask, old_logprobs, rollout_logprobs, extra, strict)
    mode = opts.resolved_importance_weights(old_logprobs is not None)
    if mode != "none" and old_logprobs is None:
        raise ValueError(f"`importance_weights={mode!r}` needs `old_logprobs` (got None)")
    norm = check_normalizer(normalizer, strict=strict)
    dtype = accumulation_dtype(logprobs, ref_logprobs, rewards, *(t for _, t in extra))
    terms = _sequence_terms(
        logprobs,
        ref_logprobs,
        rewards,
        m,
        old_logprobs,
        rollout_logprobs,
        opts=opts,
        mode=mode,
        token_clip_mask=False,
        dtype=dtype,
        difference=False,
    )
    assert terms.seq_ref_logprobs is not None
    log_ratio = terms.seq_logprobs.detach() - terms.seq_ref_logprobs - opts.beta * terms.rewards
    b = extra[0][1].to(dtype) if extra else baseline_value
    per_sequence = (log_ratio - b) * terms.seq_logprobs
    if terms.weights is not None:
        per_sequence = terms.weights * per_sequence
    loss = apply_reduction(per_sequence, terms.contributes, terms.counted, opts.reduction, norm)
    if not return_stats:
        return loss
    stats = _base_stats(terms, logprobs, ref_logprobs, m, opts.length_normalization)
    weighted = log_ratio if terms.weights is None else terms.weights * log_ratio
    stats["kl_estimate"] = _mean_over(weighted, terms.contributes)
    stats["loss"] = loss.detach() if opts.reduction != "none" else _mean_over(per_sequence, terms.contributes)
    return loss, stats


"""Masked reductions over tokens and over sequences.

Token level, ``values [B, T]`` with a response mask ``m [B, T]`` -> one number per sequence:

* [`masked_sum`][flowloss.masked_sum]: ``s_i = sum_t m_it v_it`` (the log-likelihood ``log pi(y_i|x_i)``);
* [`masked_mean`][flowloss.masked_mean]: ``s_i = (1/|y_i|) sum_t m_it v_it``, ``|y_i| = sum_t m_it``
  (FlowRL's length normalization).

An all-masked row (``|y_i| = 0``) is *legal*: its sum and its mean are defined as 0 (finite, with zero gradient),
and sequence-level reductions leave it out of their counts (see
[`count_valid_sequences`][flowloss.count_valid_sequences]). Masked entries may hold anything, even ``-inf`` or NaN
padding: they are selected away, never multiplied by 0. A non-bool mask is read as ``mask != 0``.

Sequence level: [`reduce_sequences`][flowloss.reduce_sequences] turns per-sequence losses ``l_i`` into the batch
loss ``sum_i l_i / N`` where ``N`` defaults to the number of valid sequences in *this* batch. Pass ``normalizer=``
the global count to make micro-batches and data-parallel ranks add up to the full-batch gradient.

``sequence_logprobs`` and ``length_normalize`` are deprecated aliases (since 0.2.0, removed in 0.3.0) kept for 0.1
code (one name per reduction).
"""

from __future__ import annotations

from typing import Literal

import torch

from flowloss._deprecation import warn_deprecated
from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    as_number,
    describe,
    require_choice,
    require_float_tensor,
    require_ndim,
    require_tensor,
)
from flowloss.options import REDUCTIONS, TB_DEFAULTS, SequenceReduction
from flowloss.strict import is_strict

TokenReduction = Literal["mean", "sum", "none"]


def _checked(values: torch.Tensor, mask: torch.Tensor, name: str, strict: bool | None) -> torch.Tensor:
    require_float_tensor(name, values)
    require_ndim(name, values, (2,), "a [B, T] token-level tensor")
    m = as_bool_mask("mask", mask, name, values, strict=is_strict(strict))
    if m.device != values.device:
        raise ValueError(f"`mask` is on {m.device} but `{name}` is on {values.device}; move them to one device")
    return m


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(mask, values.to(dtype), values.new_zeros((), dtype=dtype)).sum(dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, *, strict: bool | None = None) -> torch.Tensor:
    """``[B, T] -> [B]``: ``sum_t m_it v_it`` in float32 (float64 for float64 input); 0 for an all-masked row.

    ``strict`` (default: the global setting, see `flowloss.strict`) also refuses a mask with values other
    than 0/1.
    """
    m = _checked(values, mask, "values", strict)
    return _masked_sum(values, m, accumulation_dtype(values))


def masked_mean(values: torch.Tensor, mask: torch.Tensor, *, strict: bool | None = None) -> torch.Tensor:
    """``[B, T] -> [B]``: ``(1/|y_i|) sum_t m_it v_it``; 0 (finite, zero gradient) for an all-masked row.

    With token log-probs this is FlowRL's length-normalized log-likelihood ``(1/|y|) log pi(y|x)``.
    """
    m = _checked(values, mask, "values", strict)
    dtype = accumulation_dtype(values)
    return _masked_sum(values, m, dtype) / m.sum(dim=-1).to(dtype).clamp_min(1.0)


def length_normalize(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Deprecated alias of [`masked_mean`][flowloss.masked_mean] (FlowRL's length-normalized log-likelihood)."""
    warn_deprecated("`length_normalize`", "use `masked_mean`")
    return masked_mean(logprobs, mask)


def sequence_logprobs(
    logprobs: torch.Tensor, mask: torch.Tensor, *, reduction: TokenReduction = "mean"
) -> torch.Tensor:
    """Deprecated: ``reduction="mean"`` is [`masked_mean`][flowloss.masked_mean], ``"sum"`` is
    [`masked_sum`][flowloss.masked_sum], ``"none"`` is ``torch.where(mask, logprobs, 0)``."""
    warn_deprecated("`sequence_logprobs`", "use `masked_mean` (reduction='mean') or `masked_sum` ('sum')")
    require_choice("reduction", reduction, ("mean", "sum", "none"))
    m = _checked(logprobs, mask, "logprobs", None)
    dtype = accumulation_dtype(logprobs)
    if reduction == "none":
        return torch.where(m, logprobs.to(dtype), logprobs.new_zeros((), dtype=dtype))
    total = _masked_sum(logprobs, m, dtype)
    return total if reduction == "sum" else total / m.sum(dim=-1).to(dtype).clamp_min(1.0)


def token_counts(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]`` int64: ``|y_i| = sum_t m_it``."""
    require_tensor("mask", mask)
    require_ndim("mask", mask, (2,), "a [B, T] response mask")
    return as_bool_mask("mask", mask, "mask", mask).sum(dim=-1)


def count_valid_sequences(mask: torch.Tensor) -> torch.Tensor:
    """Number of sequences with at least one response token (a 0-dim int64 tensor, on ``mask``'s device).

    This is the default ``normalizer`` of the sequence-mean losses. For gradient accumulation or data
    parallelism, sum it over all micro-batches/ranks of an optimizer step (e.g. ``all_reduce``) and pass the
    total as ``normalizer=``.
    """
    return (token_counts(mask) > 0).sum()


def check_normalizer(normalizer: float | torch.Tensor | None, *, strict: bool) -> float | torch.Tensor | None:
    """A positive finite number, or a 1-element tensor (its value is checked only in strict mode)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"`normalizer` must be a scalar, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.dtype.is_complex:
            raise TypeError(f"`normalizer` must be a real number or scalar tensor, got {describe(normalizer)}")
        if strict:
            value = float(normalizer.detach().reshape(()).to(torch.float64))
            if not 0.0 < value < float("inf"):
                raise ValueError(f"`normalizer` must be finite and > 0, got {value}")
        return normalizer
    try:
        return as_number("normalizer", normalizer, low=0.0, low_inclusive=False)
    except (TypeError, ValueError):
        raise ValueError(
            f"`normalizer` must be a finite positive number or scalar tensor, got {normalizer!r}"
        ) from None


def normalizer_value(normalizer: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """The divisor for ``normalizer`` (checked by `check_normalizer`), on ``like``'s device and dtype.

    A tensor's value is never read on the host: one that is not finite and > 0 becomes NaN, so a bad count
    (negative, zero, inf, NaN) shows up as a NaN loss instead of a finite wrong one (a sign-flipped or zero
    gradient). Strict mode refuses such a tensor before this point.
    """
    if not isinstance(normalizer, torch.Tensor):
        return normalizer
    n = normalizer.detach().to(device=like.device, dtype=like.dtype).reshape(())
    return torch.where((n > 0) & (n < float("inf")), n, float("nan"))


def apply_reduction(
    per_sequence: torch.Tensor,
    valid: torch.Tensor,
    counted: torch.Tensor,
    reduction: str,
    normalizer: float | torch.Tensor | None,
) -> torch.Tensor:
    """The math of [`reduce_sequences`][flowloss.reduce_sequences] on checked inputs.

    ``valid [B]``: rows whose term is kept (others are 0); ``counted [B]``: rows in the default count ``N``.
    """
    kept = torch.where(valid, per_sequence, 0.0)
    if normalizer is not None:
        normalizer = normalizer_value(normalizer, kept)
        if reduction == "none":
            return kept / normalizer
        return kept.sum() / normalizer
    if reduction == "none":
        return kept
    total = kept.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().to(total.dtype).clamp_min(1.0)


def reduce_sequences(
    per_sequence: torch.Tensor,
    valid: torch.Tensor,
    *,
    reduction: SequenceReduction = TB_DEFAULTS.reduction,
    normalizer: float | torch.Tensor | None = None,
    strict: bool | None = None,
) -> torch.Tensor:
    """Reduce per-sequence losses ``l [B]`` over the valid sequences ``valid [B]`` (bool).

    * ``"mean"``: ``sum_i valid_i l_i / N``, ``N = normalizer`` if given else ``sum_i valid_i`` (at least 1);
    * ``"sum"``:  ``sum_i valid_i l_i`` (divided by ``normalizer`` when given);
    * ``"none"``: ``valid_i * l_i`` (divided by ``normalizer`` when given), invalid entries 0.

    With ``normalizer`` equal to the number of valid sequences in the whole optimizer step, the gradients of
    the micro-batch losses add up to the gradient of the full-batch loss. A tensor ``normalizer`` is used
    as is (no host synchronisation): one that is not finite and > 0 gives NaN; strict mode raises instead.
    """
    require_choice("reduction", reduction, REDUCTIONS)
    require_float_tensor("per_sequence", per_sequence)
    require_ndim("per_sequence", per_sequence, (1,), "a [B] tensor of per-sequence losses")
    strict = is_strict(strict)
    valid = as_bool_mask("valid", valid, "per_sequence", per_sequence, strict=strict)
    if valid.device != per_sequence.device:
        raise ValueError(f"`valid` is on {valid.device} but `per_sequence` is on {per_sequence.device}")
    normalizer = check_normalizer(normalizer, strict=strict)
    return apply_reduction(per_sequence, valid, valid, reduction, normalizer)

"""Masked reductions over tokens and over sequences.

Token level: ``values [B, T]`` with a response mask ``m [B, T]`` (bool or 0/1) reduce to one number per sequence:

* ``"sum"``:  ``s_i = sum_t m_it * v_it``                      (the log-likelihood ``log pi(y_i|x_i)``)
* ``"mean"``: ``s_i = (1/|y_i|) sum_t m_it * v_it``, ``|y_i| = sum_t m_it``  (FlowRL's length normalization)
* ``"none"``: ``v_it * m_it`` unchanged in shape.

An all-masked row (``|y_i| = 0``) is *legal*: its sum and its mean are defined as 0 (finite, with zero gradient),
and sequence-level reductions leave it out of their counts (see `count_valid_sequences`). Masked entries
may hold anything, even ``-inf`` or NaN padding: they are selected away, never multiplied by 0.

Sequence level: `reduce_sequences` turns per-sequence losses ``l_i`` into the batch loss
``sum_i l_i / N`` where ``N`` defaults to the number of valid sequences in *this* batch. Pass ``normalizer=``
the global count to make micro-batches and data-parallel ranks add up to the full-batch gradient.
"""

from __future__ import annotations

from typing import Literal

import torch

from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    require_choice,
    require_float,
    require_ndim,
    require_tensor,
)

TokenReduction = Literal["mean", "sum", "none"]
SequenceReduction = Literal["mean", "sum", "none"]


def _checked(values: torch.Tensor, mask: torch.Tensor, name: str = "values") -> torch.Tensor:
    require_tensor(name, values)
    require_float(name, values)
    require_ndim(name, values, (2,), "a [B, T] token-level tensor")
    m = as_bool_mask("mask", mask, name, values)
    if m.device != values.device:
        raise ValueError(f"`mask` is on {m.device} but `{name}` is on {values.device}; move them to one device")
    return m


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zeros = torch.zeros((), dtype=dtype, device=values.device)
    return torch.where(mask, values.to(dtype), zeros).sum(dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]``: ``sum_t m_it v_it`` in float32 (float64 for float64 input); 0 for an all-masked row."""
    m = _checked(values, mask)
    return _masked_sum(values, m, accumulation_dtype(values))


def token_counts(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]`` int64: ``|y_i| = sum_t m_it``."""
    require_tensor("mask", mask)
    require_ndim("mask", mask, (2,), "a [B, T] response mask")
    return as_bool_mask("mask", mask, "mask", mask).sum(dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]``: ``(1/|y_i|) sum_t m_it v_it``; 0 (finite, zero gradient) for an all-masked row."""
    m = _checked(values, mask)
    dtype = accumulation_dtype(values)
    total = _masked_sum(values, m, dtype)
    count = m.sum(dim=-1).to(dtype)
    return total / count.clamp_min(1.0)


def length_normalize(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FlowRL's length-normalized log-likelihood ``(1/|y|) log pi(y|x) = mean_t log pi(y_t|x, y_<t)``.

    ``logprobs [B, T]`` token log-probs, ``mask [B, T]`` response mask -> ``[B]``. Same as `masked_mean`.
    """
    return masked_mean(logprobs, mask)


def sequence_logprobs(
    logprobs: torch.Tensor, mask: torch.Tensor, *, reduction: TokenReduction = "mean"
) -> torch.Tensor:
    """Token log-probs ``[B, T]`` to per-sequence values with ``reduction`` in ``"mean" | "sum" | "none"``.

    ``"mean"`` is FlowRL's length normalization, ``"sum"`` is ``log pi(y|x)``, ``"none"`` returns the masked
    ``[B, T]`` tensor (masked entries set to 0) in the accumulation dtype.
    """
    require_choice("reduction", reduction, ("mean", "sum", "none"))
    m = _checked(logprobs, mask, "logprobs")
    dtype = accumulation_dtype(logprobs)
    if reduction == "none":
        return torch.where(m, logprobs.to(dtype), torch.zeros((), dtype=dtype, device=logprobs.device))
    total = _masked_sum(logprobs, m, dtype)
    if reduction == "sum":
        return total
    return total / m.sum(dim=-1).to(dtype).clamp_min(1.0)


def count_valid_sequences(mask: torch.Tensor) -> torch.Tensor:
    """Number of sequences with at least one response token (a 0-dim int64 tensor).

    This is the default ``normalizer`` of the sequence-mean losses. For gradient accumulation or data
    parallelism, sum it over all micro-batches/ranks of an optimizer step (e.g. ``all_reduce``) and pass the
    total as ``normalizer=``.
    """
    return (token_counts(mask) > 0).sum()


def reduce_sequences(
    per_sequence: torch.Tensor,
    valid: torch.Tensor,
    *,
    reduction: SequenceReduction = "mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-sequence losses ``l [B]`` over the valid sequences ``valid [B]`` (bool).

    * ``"mean"``: ``sum_i valid_i l_i / N``, ``N = normalizer`` if given else ``sum_i valid_i`` (at least 1);
    * ``"sum"``:  ``sum_i valid_i l_i`` (``normalizer`` divides it too when given);
    * ``"none"``: ``valid_i * l_i`` (invalid entries are 0).

    With ``normalizer`` equal to the number of valid sequences in the whole optimizer step, the gradients of
    the micro-batch losses add up to the gradient of the full-batch loss.
    """
    require_choice("reduction", reduction, ("mean", "sum", "none"))
    require_tensor("per_sequence", per_sequence)
    require_float("per_sequence", per_sequence)
    require_ndim("per_sequence", per_sequence, (1,), "a [B] tensor of per-sequence losses")
    valid = as_bool_mask("valid", valid, "per_sequence", per_sequence)
    if valid.device != per_sequence.device:
        raise ValueError(f"`valid` is on {valid.device} but `per_sequence` is on {per_sequence.device}")
    zeros = torch.zeros((), dtype=per_sequence.dtype, device=per_sequence.device)
    kept = torch.where(valid, per_sequence, zeros)
    if reduction == "none":
        return kept
    total = kept.sum()
    if normalizer is None:
        if reduction == "sum":
            return total
        return total / valid.sum().to(total.dtype).clamp_min(1.0)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"`normalizer` must be a scalar, got shape {tuple(normalizer.shape)}")
        norm = normalizer.detach().to(device=total.device, dtype=total.dtype).reshape(())
        if not bool((norm > 0) & torch.isfinite(norm)):
            raise ValueError(f"`normalizer` must be finite and > 0, got {norm.item()}")
        return total / norm
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not 0 < normalizer < float("inf"):
        raise ValueError(f"`normalizer` must be a finite positive number or scalar tensor, got {normalizer!r}")
    return total / float(normalizer)

"""Per-token log-probs ``log pi(y_t | x, y_<t)`` (and entropies) from logits, without an fp32 ``[N, V]`` copy.

For row ``n`` with logits ``z_n [V]``, label ``y_n`` and temperature ``T``::

    s_n       = float32(z_n) / T                       (float64 stays float64 on the chunked path)
    lse_n     = log sum_v exp(s_nv)
    logp_n    = s_n[y_n] - lse_n                          -> returned, float32, shaped like ``labels``
    H_n       = -sum_v p_nv log p_nv,  p_nv = exp(s_nv - lse_n)   -> returned when ``return_entropy``

and the gradients ``d logp_n / d z_nv = (1[v = y_n] - p_nv) / T``,
``d H_n / d z_nv = -p_nv (log p_nv + H_n) / T``.

``log_softmax(logits.float(), -1).gather(...)`` materializes an fp32 ``[N, V]`` tensor (1.2 GB at N=2048,
V=151936), keeps it for backward and builds two more ``[N, V]`` tensors in backward. Here the forward keeps
O(N) state and the backward writes one ``dlogits`` buffer (or the logits themselves, in place).

This module validates and resolves the labels (on the device, without synchronising), then calls the operator
``flowloss::token_logprobs`` (`flowloss.ops.library`), which runs the fused Triton kernels
(`flowloss.ops.triton_logprobs`, the default for CUDA logits on a GPU with a checked launch configuration:
`flowloss.ops.dispatch`) or the chunked PyTorch path (`flowloss.ops.chunked`, the CPU default);
``impl="reference"`` is the float64 oracle (slow, for tests).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from flowloss._validation import (
    as_bool_mask,
    as_flag,
    as_index,
    as_temperature,
    describe,
    require_choice,
    require_float_tensor,
    require_same_device,
    require_tensor,
)
from flowloss.ops._rows import flat_view
from flowloss.ops.chunked import default_chunk_rows
from flowloss.ops.dispatch import IMPLS, resolve_impl
from flowloss.ops.library import token_logprobs_op
from flowloss.strict import is_strict


def _optional_positive_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}")
    return value


def resolve_labels(
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    ignore_index: int,
    vocab: int,
    strict: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(effective [N] int64, bad [N] bool)`` without a host synchronisation.

    A row is kept when its label is not ``ignore_index`` and ``mask`` (if any) is set; a kept row whose label is
    outside ``[0, vocab)`` is *bad*: it is skipped by the kernels (never read out of bounds) and the caller
    returns NaN for it. Effective labels are the kept, in-vocabulary labels and ``-1`` elsewhere. Strict mode
    raises for bad rows instead, naming the first one.
    """
    kept = labels != ignore_index
    if mask is not None:
        kept = kept & mask
    in_vocab = (labels >= 0) & (labels < vocab)
    bad = kept & ~in_vocab
    if strict and bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[where])
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(
            f"`labels` must be in [0, V={vocab}) or equal to ignore_index={ignore_index} (or be masked out); "
            f"got {value} at position {where} (labels[{flat}] = {value}, {int(bad.sum())} bad label(s)) of "
            f"labels {describe(labels)}"
        )
    effective = torch.where(kept & in_vocab, labels, labels.new_full((), -1)).reshape(-1).to(torch.int64)
    return effective, bad.reshape(-1)


def _check_layout(logits: torch.Tensor, labels: torch.Tensor, flat_labels: bool) -> None:
    if flat_labels:  # the kernels' own layout: flat labels [N] with [N, V] or a non-flattenable [B, T, V]
        if logits.dim() not in (2, 3):
            raise ValueError(
                f"`logits` must be [N, V], or [B, T, V] (when it cannot be viewed as [B*T, V]), got {describe(logits)}"
            )
        if labels.dim() != 1:
            raise ValueError(f"`labels` must be 1-D [N], got {describe(labels)}")
        rows = logits.shape[:-1].numel()
        if labels.shape[0] != rows:
            raise ValueError(
                f"`labels` must have one entry per row of `logits` ({rows}), got {describe(labels)} with "
                f"logits {describe(logits)}"
            )
        return
    ok = logits.dim() in (2, 3) and logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape
    if not ok:
        raise ValueError(
            "`logits` must be [B, T, V] with `labels` [B, T], or [N, V] with `labels` [N]; got "
            f"logits {describe(logits)} and labels {describe(labels)}"
        )


def _rows_overlap(logits: torch.Tensor) -> bool:
    v = logits.shape[-1]
    overlap = logits.shape[-2] > 1 and logits.stride(-2) < v
    if logits.dim() == 3:
        overlap = overlap or (logits.shape[0] > 1 and logits.stride(0) < logits.shape[1] * v)
    return overlap


def run_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    return_entropy: bool,
    ignore_index: int,
    mask: torch.Tensor | None,
    impl: str,
    chunk_size: int | None,
    inplace_backward: bool,
    vocab_size: int | None,
    block_v: int | None,
    strict: bool | None,
    flat_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, resolve labels, run the op: ``(logp, entropy)`` shaped like ``labels`` (entropy empty if not
    asked). The one validation path of every logits entry point."""
    require_float_tensor("logits", logits)
    require_tensor("labels", labels)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`labels` must be an int32 or int64 tensor of token ids, got {describe(labels)}")
    _check_layout(logits, labels, flat_labels)
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"`logits` must have at least one vocabulary column (V >= 1), got {describe(logits)}")
    temperature = as_temperature(temperature)
    return_entropy = as_flag("return_entropy", return_entropy)
    inplace_backward = as_flag("inplace_backward", inplace_backward)
    ignore_index = as_index("ignore_index", ignore_index)
    require_choice("impl", impl, IMPLS)
    chunk_size = _optional_positive_int("chunk_size", chunk_size)
    vocab_size = _optional_positive_int("vocab_size", vocab_size)
    if vocab_size is not None and vocab_size > vocab:
        raise ValueError(f"`vocab_size` must be in [1, {vocab}] (logits.shape[-1]), got {vocab_size}")
    vocab = vocab_size if vocab_size is not None else vocab
    if block_v is None:
        block_v = 0  # the kernels' default
    elif isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"`block_v` must be a power of two >= 16, got {block_v!r}")
    strict = is_strict(strict)
    bool_mask = None
    if mask is not None:
        bool_mask = as_bool_mask("mask", mask, "labels", labels, strict=strict)
    require_same_device([("logits", logits), ("labels", labels), ("mask", bool_mask)])
    if inplace_backward and _rows_overlap(logits):
        raise ValueError(
            f"`inplace_backward=True` needs rows that do not overlap in memory, got {describe(logits)} with "
            f"strides {logits.stride()}"
        )
    chosen = resolve_impl(impl, logits, name="logits")
    effective, bad = resolve_labels(labels, bool_mask, ignore_index=ignore_index, vocab=vocab, strict=strict)

    if chosen == "reference":
        logp, entropy = _run_reference(logits, effective, temperature, vocab)
    else:
        x = flat_view(logits)
        x = logits if x is None else x  # a non-viewable [B, T, V] slice goes as is, never copied
        if chosen == "triton" and x.stride(-1) != 1:
            x = x.contiguous()
        rows = chunk_size if chunk_size is not None else default_chunk_rows(vocab)
        logp, entropy, _ = token_logprobs_op(
            x, effective, temperature, return_entropy, chosen, rows, vocab, block_v, inplace_backward
        )
    # A kept label outside the vocabulary: NaN, never a silently finite value (no host synchronisation).
    logp = torch.where(bad, logp.new_full((), float("nan")), logp)
    shape = labels.shape
    if return_entropy:
        entropy = torch.where(bad, entropy.new_full((), float("nan")), entropy).reshape(shape)
    return logp.reshape(shape), entropy


def _run_reference(logits, effective, temperature, vocab):
    from flowloss import reference
    from flowloss.ops._block_math import compute_dtype_for

    flat = logits.reshape(-1, logits.shape[-1])[:, :vocab]
    logp, entropy = reference.token_logprobs(flat, effective, temperature=temperature, ignore_index=-1)
    out = compute_dtype_for(logits.dtype)
    return logp.to(out), entropy.to(out)


@overload
def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: Literal[False] = ...,
    ignore_index: int = ...,
    mask: torch.Tensor | None = ...,
    impl: str = ...,
    chunk_size: int | None = ...,
    inplace_backward: bool = ...,
    vocab_size: int | None = ...,
    strict: bool | None = ...,
) -> torch.Tensor: ...


@overload
def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: Literal[True],
    ignore_index: int = ...,
    mask: torch.Tensor | None = ...,
    impl: str = ...,
    chunk_size: int | None = ...,
    inplace_backward: bool = ...,
    vocab_size: int | None = ...,
    strict: bool | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: bool = ...,
    ignore_index: int = ...,
    mask: torch.Tensor | None = ...,
    impl: str = ...,
    chunk_size: int | None = ...,
    inplace_backward: bool = ...,
    vocab_size: int | None = ...,
    strict: bool | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    inplace_backward: bool = False,
    vocab_size: int | None = None,
    strict: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs ``log softmax(logits / T)[labels]`` (and entropies), differentiable, memory-lean.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, fp16/bf16/fp32/fp64. Never copied or upcast as a whole
            (``logits[:, :-1]`` of a ``[B, T+1, V]`` tensor is read in place).
        labels: ``[B, T]`` or ``[N]`` int32/int64 token ids in ``[0, V)`` (or ``ignore_index``).
        temperature: sampling temperature ``T`` (finite, > 0); the logits are divided by it after the
            fp32 upcast. Use the rollout temperature (1.0 for FlowRL's math runs, 0.6 for code).
        return_entropy: also return ``H = -sum_v p_v log p_v`` per token (differentiable).
        ignore_index: label marking positions to skip (default -100, as in ``F.cross_entropy``).
        mask: optional ``[B, T]``/``[N]`` bool tensor (numbers read as ``mask != 0``); 0 positions are skipped.
        impl: ``"auto"`` (Triton for CUDA logits on a GPU with a checked launch configuration, else chunked,
            with a one-time `FallbackWarning` when only the GPU stood in the way), ``"triton"``, ``"chunked"``
            (the PyTorch row-block path) or ``"reference"`` (float64 oracle, slow).
        chunk_size: rows per block on the chunked path; default ~4 MiB of fp32 per block.
        inplace_backward: write ``dlogits`` into ``logits``' own storage in backward (saves one ``[.., V]``
            buffer). Only when nothing else reads the logits afterwards: autograd's version counter raises if
            another op saved them for its backward.
        vocab_size: columns ``>= vocab_size`` (a padded vocabulary) are treated as ``-inf``: never in the
            softmax, zero gradient. Default: all ``V`` columns.
        strict: also refuse, with the position, a kept label outside ``[0, V)`` and a mask with values other
            than 0/1 (reads device memory); default: the global setting (`flowloss.strict`).

    Returns:
        ``logprobs`` shaped like ``labels``: float32 (float64 for float64 logits on the chunked and reference
        paths), 0 with zero gradient at skipped positions; ``(logprobs, entropy)`` when ``return_entropy``.
        A kept row whose label is outside ``[0, V)`` gives NaN (its logits are never read). A kept row whose
        logits are all ``-inf`` has no distribution: log-prob ``-inf``, entropy 0, gradient ``g / T`` on the
        label. With ``V = 1`` the only token is certain: log-prob 0 and entropy 0 (exactly on the chunked path;
        on the Triton path up to the rounding of the GPU's fast ``exp2``/``log2``, at most ``2**-21``), and a
        zero gradient up to the same rounding.
        Second derivatives (``create_graph=True``) are exact, computed on the full ``[N, V]`` logits.
    """
    logp, entropy = run_token_logprobs(
        logits,
        labels,
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        mask=mask,
        impl=impl,
        chunk_size=chunk_size,
        inplace_backward=inplace_backward,
        vocab_size=vocab_size,
        block_v=None,
        strict=strict,
    )
    return (logp, entropy) if return_entropy else logp


def triton_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    inplace_backward: bool = False,
    vocab_size: int | None = None,
    block_v: int | None = None,
    strict: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[`token_logprobs`][flowloss.token_logprobs] with ``impl="triton"`` and the kernels' tuning knob
    ``block_v`` (vocabulary columns per block, a power of two >= 16; None: the kernels' 4096): flat ``labels [N]``
    (with ``[N, V]`` or a non-flattenable ``[B, T, V]``), and always a ``(logprobs, entropy or None)`` pair. One
    validation path: the public function's."""
    logp, entropy = run_token_logprobs(
        logits,
        labels,
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        mask=mask,
        impl="triton",
        chunk_size=None,
        inplace_backward=inplace_backward,
        vocab_size=vocab_size,
        block_v=block_v,
        strict=strict,
        flat_labels=True,
    )
    return logp, (entropy if return_entropy else None)

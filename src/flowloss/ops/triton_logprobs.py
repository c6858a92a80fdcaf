"""Fused Triton per-token log-probs (and entropy) with a recompute backward: the autograd layer.

For logits ``x [N, V]``, labels ``y [N]``, temperature ``T``, ``z = x / T`` (fp32) and ``p = softmax(z)``::

    logprobs[n] = z[n, y_n] - logsumexp(z[n])                       [N] fp32
    entropy[n]  = -sum_v p[n, v] log p[n, v]                        [N] fp32 (when return_entropy)
    d logits    = (g (onehot(y) - p) - g_H p (log p + H)) / T       [N, V], logits' dtype

Memory: the forward allocates O(N) (log-probs, fp32 log-sum-exp, entropy) and saves only those and the
logits (already alive); the backward allocates only ``dlogits`` (one ``[N, V]`` buffer in the logits' dtype),
or nothing with ``inplace_backward=True``, which writes the gradient over the logits. No ``[N, V]`` fp32
log-softmax is ever materialized. Kernels: ``flowloss.kernels.logprob_forward`` / ``logprob_backward``.

Importing this module needs triton (``ImportError`` otherwise); running it needs CUDA tensors, or CPU tensors
with ``TRITON_INTERPRET=1`` set before triton is imported (the tests).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from flowloss._validation import as_bool_mask, describe, require_ndim, require_same_device, require_tensor
from flowloss.kernels.logprob_backward import logprob_backward
from flowloss.kernels.logprob_forward import DEFAULT_BLOCK_V, logprob_forward

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int32, torch.int64)


def _sequences(logits: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """``[N, V]`` -> one ``(rows, slice)``; ``[B, T, V]`` -> one ``(logits[b], rows of b)`` per sequence.

    A ``[B, T, V]`` input is one that cannot be viewed as ``[B*T, V]`` (``logits[:, :-1]`` of a
    ``[B, T+1, V]`` tensor): each sequence is a ``[T, V]`` view with a plain row stride, so launching the kernels
    once per sequence reads the logits in place instead of copying them (B launches of a few microseconds).
    """
    if logits.dim() == 2:
        return [(logits, slice(0, logits.shape[0]))]
    seq = logits.shape[1]
    return [(logits[b], slice(b * seq, (b + 1) * seq)) for b in range(logits.shape[0])]


class TritonTokenLogprobs(torch.autograd.Function):
    """``(logits [N, V] or [B, T, V], labels [N]) -> logprobs [N]`` or ``(logprobs [N], entropy [N])``, fp32.

    ``labels`` here are already effective (flat, ``N = B*T``): negative or ``ignore_index`` = skipped row.
    Validation happens in `triton_token_logprobs`; this class only launches.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, vocab_size, with_entropy, inplace, block_v):
        parts = [
            logprob_forward(
                rows,
                labels[span],
                temperature=temperature,
                ignore_index=ignore_index,
                vocab_size=vocab_size,
                with_entropy=with_entropy,
                block_v=block_v,
            )
            for rows, span in _sequences(logits)
        ]
        if len(parts) == 1:
            logprobs, lse2, entropy = parts[0]
        else:
            logprobs = torch.cat([p[0] for p in parts])
            lse2 = torch.cat([p[1] for p in parts])
            entropy = torch.cat([p[2] for p in parts]) if with_entropy else None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, labels, lse2, entropy if with_entropy else None)
        ctx.options = (temperature, ignore_index, vocab_size, inplace, block_v)
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, labels, lse2, entropy = ctx.saved_tensors
        temperature, ignore_index, vocab_size, inplace, block_v = ctx.options
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if grad_logprobs is not None:
            grad_logprobs = grad_logprobs.float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        # One [.., V] buffer in the logits' dtype, or the logits themselves (in place).
        dlogits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for (rows, span), (out_rows, _) in zip(_sequences(logits), _sequences(dlogits)):
            logprob_backward(
                rows,
                labels[span],
                lse2[span],
                grad_logprobs[span] if grad_logprobs is not None else None,
                entropy=entropy[span] if entropy is not None else None,
                grad_entropy=grad_entropy[span] if grad_entropy is not None else None,
                temperature=temperature,
                ignore_index=ignore_index,
                vocab_size=vocab_size,
                inplace=inplace,
                out=None if inplace else out_rows,
                block_v=block_v,
            )
        if inplace:
            # The logits now hold their gradient: any other autograd node that saved them must fail loudly
            # ("modified by an inplace operation") rather than silently use the gradient as logits.
            torch.autograd.graph.increment_version(logits)
            dlogits = dlogits.detach()  # same storage, a tensor of its own (never the saved input object)
        return dlogits, None, None, None, None, None, None, None


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a Python number, got {type(value).__name__} ({value!r})")
    return float(value)


def _validate(logits, labels, mask, temperature, ignore_index, vocab_size, inplace_backward, block_v):
    require_tensor("logits", logits)
    require_tensor("labels", labels)
    require_ndim("logits", logits, (2, 3), "[N, V], or [B, T, V] (when it cannot be viewed as [B*T, V])")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"`logits` must be float32, bfloat16 or float16 for the Triton kernels, got {describe(logits)}; "
            "use flowloss.token_logprobs(..., impl='chunked') for float64"
        )
    n_cols = logits.shape[-1]
    n_rows = logits.numel() // max(n_cols, 1) if n_cols else logits.shape[:-1].numel()
    if n_cols < 1:
        raise ValueError(f"`logits` must have at least one vocabulary column, got {describe(logits)}")
    require_ndim("labels", labels, (1,), "1-D [N]")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"`labels` must be int32 or int64, got {describe(labels)}")
    if labels.shape[0] != n_rows:
        raise ValueError(
            f"`labels` must have one entry per row of `logits` ({n_rows}), got {describe(labels)} "
            f"with logits {describe(logits)}"
        )
    if mask is not None:
        mask = as_bool_mask("mask", mask, "labels", labels)
    require_same_device([("logits", logits), ("labels", labels), ("mask", mask)])
    if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"`logits` must be a CUDA tensor for the Triton kernels (or set TRITON_INTERPRET=1 before "
            f"importing triton to run them on CPU), got {describe(logits)}; use impl='chunked' on CPU"
        )
    temperature = _check_number("temperature", temperature)
    if not (0.0 < temperature < float("inf")):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"`ignore_index` must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if vocab_size is None:
        vocab_size = n_cols
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"`vocab_size` must be an int or None, got {type(vocab_size).__name__}")
    elif not 1 <= vocab_size <= n_cols:
        raise ValueError(f"`vocab_size` must be in [1, {n_cols}] (logits.shape[-1]), got {vocab_size}")
    if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"`block_v` must be a power of two >= 16, got {block_v!r}")
    rows_overlap = logits.shape[-2] > 1 and logits.stride(-2) < n_cols
    if logits.dim() == 3:
        rows_overlap = rows_overlap or (logits.shape[0] > 1 and logits.stride(0) < logits.shape[1] * n_cols)
    if inplace_backward and rows_overlap:
        raise ValueError(
            f"`inplace_backward=True` needs rows that do not overlap in memory, got {describe(logits)} with "
            f"strides {logits.stride()}"
        )
    return mask, temperature, vocab_size


def _effective_labels(labels, mask, ignore_index, vocab_size) -> torch.Tensor:
    """Refuse out-of-range labels on kept rows; mark masked rows -1 (the kernels skip negative labels)."""
    kept = labels != ignore_index
    if mask is not None:
        kept = kept & mask
    bad = kept & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):  # one host sync: a wrong label must not read out of bounds
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"`labels` must lie in [0, {vocab_size}) (vocabulary size) or equal ignore_index={ignore_index} "
            f"on kept rows; labels[{first}] = {int(labels[first])} ({int(bad.sum())} bad label(s))"
        )
    if mask is not None:
        labels = labels.masked_fill(~mask, -1)
    return labels.contiguous()


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
    block_v: int = DEFAULT_BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``log softmax(logits / T)[label]`` (and entropy) with the fused Triton kernels.

    Args:
        logits: ``[N, V]`` float32/bfloat16/float16, CUDA (or CPU under ``TRITON_INTERPRET=1``), or
            ``[B, T, V]`` when it cannot be viewed as ``[B*T, V]`` (``logits[:, :-1]``): the kernels then run once
            per sequence on the slice in place. Any row stride is used as is; a last dimension with
            stride != 1 is copied to a contiguous tensor first.
        labels: ``[N]`` (``N = B*T``) int32/int64 token ids in ``[0, vocab_size)``, or ``ignore_index``.
        temperature: ``T > 0``; the logits are upcast to fp32, then divided by ``T``; the gradient carries
            the ``1/T`` factor. Default 1.0 (the FlowRL math runs sample at temperature 1.0).
        return_entropy: also return ``H = -sum_v p_v log p_v`` of ``softmax(logits / T)`` (differentiable),
            computed in the same pass.
        ignore_index: label value of rows to skip (default -100, the PyTorch/HF convention).
        mask: optional ``[N]`` bool (or 0/1); ``False`` rows are skipped like ``ignore_index`` rows.
        inplace_backward: write ``dlogits`` over ``logits`` in the backward (no second ``[N, V]`` buffer).
            The logits are destroyed; another autograd node that saved them then raises an error.
        vocab_size: columns ``>= vocab_size`` (padded vocabulary) are treated as ``-inf``: never in the
            softmax, zero gradient. Default: all ``V`` columns.
        block_v: vocabulary columns per kernel block (tuning knob; power of two; default 4096).

    Returns:
        ``(logprobs [N], entropy [N] or None)``, fp32. Skipped rows give 0 and 0, a zero gradient, and their
        logits are never read. A label whose logit is ``-inf`` gives ``-inf``; a kept row whose logits are all
        ``-inf`` gives ``-inf`` and entropy 0.

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes, devices, labels out of range (one
        host synchronisation checks them), or a non-positive / non-finite temperature.
    """
    mask, temperature, vocab_size = _validate(
        logits, labels, mask, temperature, ignore_index, vocab_size, inplace_backward, block_v
    )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = _effective_labels(labels, mask, ignore_index, vocab_size)
    with_entropy, inplace = bool(return_entropy), bool(inplace_backward)
    out = TritonTokenLogprobs.apply(
        logits, labels, temperature, ignore_index, vocab_size, with_entropy, inplace, block_v
    )
    if return_entropy:
        return out[0], out[1]
    return out, None


__all__ = ["TritonTokenLogprobs", "triton_token_logprobs"]

"""Backward Triton kernel: gradient of the per-row log-prob (and entropy) with respect to the logits.

With ``z = x / T``, ``p = softmax(z)`` recomputed from the forward's fp32 base-2 ``lse2`` (no ``[N, V]``
buffer is kept from the forward), upstream gradients ``g [N]`` (of the log-prob), ``g_H [N]`` (of entropy)::

    d logprob / d z_v = onehot(y)_v - p_v
    d entropy / d z_v = -p_v (log p_v + H)
    dlogits_v         = (g (onehot(y)_v - p_v) - g_H p_v (log p_v + H)) / T          [N, V], logits' dtype

One read of the logits and one write of ``dlogits`` per kept row; skipped rows (negative label or
``ignore_index``) are not read and get a zero gradient; columns ``>= vocab_size`` (padded vocabulary) get 0.
``-inf`` logits have ``p = 0`` and a zero gradient (``p log p -> 0``). ``dlogits`` may alias ``logits``
(in-place backward): each element is read before it is written, by the same program, so no second ``[N, V]``
buffer is needed. A row whose ``lse2`` is ``-inf`` (all logits ``-inf``) gets ``g`` on its label, 0 elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .logprob_forward import DEFAULT_BLOCK_V, DEFAULT_NUM_WARPS, LN2_C, LOG2E

# Same tiling as the forward (see logprob_forward.py): 8 KiB (bf16) read + 8 KiB written per block and
# program, one exp2 per element, no reduction at all (every element's gradient is known once lse and H are).


@triton.jit
def _logprob_backward_kernel(
    logits_ptr,  # [N, V] read
    dlogits_ptr,  # [N, V] written (may be logits_ptr)
    labels_ptr,  # [N]
    lse2_ptr,  # [N] fp32, base-2 log-sum-exp from the forward
    grad_logprobs_ptr,  # [N] fp32 (unused unless HAS_GRAD_LOGPROBS)
    entropy_ptr,  # [N] fp32 (unused unless HAS_GRAD_ENTROPY)
    grad_entropy_ptr,  # [N] fp32 (unused unless HAS_GRAD_ENTROPY)
    stride_row,
    stride_drow,
    n_cols,  # columns of the buffer (all are written)
    vocab_size,  # columns >= vocab_size are treated as -inf (gradient 0)
    ignore_index,
    scale,  # fp32: log2(e) / T
    inv_temperature,  # fp32: 1 / T
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    skip = (label < 0) | (label == ignore_index)
    n_read = tl.where(skip, 0, vocab_size)
    row_ptr = logits_ptr + row * stride_row
    drow_ptr = dlogits_ptr + row * stride_drow

    lse2 = tl.load(lse2_ptr + row)
    lse2_safe = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # all -inf row: p = 2^(-inf - inf) = 0
    g = 0.0
    if HAS_GRAD_LOGPROBS:
        g = tl.load(grad_logprobs_ptr + row).to(tl.float32) * inv_temperature
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row).to(tl.float32) * inv_temperature
        h = tl.load(entropy_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf"))
        u = x.to(tl.float32) * scale
        p = tl.exp2(u - lse2_safe)
        dz = tl.where(cols == label, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            log_p = tl.where(p > 0.0, (u - lse2_safe) * LN2_C, 0.0)  # p log p -> 0 where p = 0
            dz -= g_h * p * (log_p + h)
        dz = tl.where(skip, 0.0, dz)
        tl.store(drow_ptr + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=cols < n_cols)


def logprob_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse2: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    *,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    inplace: bool = False,
    out: torch.Tensor | None = None,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> torch.Tensor:
    """Launch the backward kernel; no validation, no autograd (see ``flowloss.ops.triton_logprobs``).

    Returns ``dlogits`` of ``logits``' shape and dtype: a new tensor, ``out`` (a ``[N, V]`` buffer of the
    logits' dtype whose last dimension has stride 1) when given, or ``logits`` itself (overwritten) when
    ``inplace``. ``lse2`` is the forward's base-2 log-sum-exp. ``grad_logprobs`` / ``grad_entropy`` of
    ``None`` mean zero upstream gradient; ``entropy`` (the forward's) is needed only with ``grad_entropy``.
    """
    n_rows, n_cols = logits.shape
    vocab = n_cols if vocab_size is None else int(vocab_size)
    dlogits = logits if inplace else (out if out is not None else torch.empty_like(logits))
    if n_rows == 0:
        return dlogits
    has_grad_entropy = grad_entropy is not None
    if has_grad_entropy and entropy is None:
        raise ValueError("`entropy` (the forward's output) is needed when `grad_entropy` is given")
    with launch.on_device(logits):
        _logprob_backward_kernel[(n_rows,)](
            logits,
            dlogits,
            labels,
            lse2,
            grad_logprobs if grad_logprobs is not None else lse2,
            entropy if has_grad_entropy else lse2,
            grad_entropy if has_grad_entropy else lse2,
            logits.stride(0),
            dlogits.stride(0),
            n_cols,
            vocab,
            int(ignore_index),
            float(LOG2E / float(temperature)),
            float(1.0 / float(temperature)),
            HAS_GRAD_LOGPROBS=grad_logprobs is not None,
            HAS_GRAD_ENTROPY=has_grad_entropy,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return dlogits

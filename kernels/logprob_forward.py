"""Forward Triton kernel: per-row log-prob of the chosen token, log-sum-exp and (optionally) entropy.

For one row of logits ``x [V]``, temperature ``T`` and label ``y``, ``z = x / T`` (after the fp32 upcast)::

    lse      = log sum_v exp(z_v)                                  [N] fp32, stored as lse2 = lse / ln 2
    logprob  = z_y - lse                                           [N] fp32
    entropy  = -sum_v p_v log p_v = lse - sum_v p_v z_v,  p = softmax(z)   [N] fp32 (optional)

One pass over the vocabulary in blocks of ``BLOCK_V`` columns (the tiling depends on ``V`` only, never on
``N``, so a row's result does not change with the batch it is in). The pass keeps, in fp32 and base 2
(``u = z * log2(e)``, so every exponential is an ``exp2``):

    m = max_v u_v                     running maximum
    s = sum_v 2^(u_v - m)             rescaled by 2^(m_old - m_new) whenever m grows
    t = sum_v 2^(u_v - m) (u_v - m)   (entropy only) rescaled as t' = a (t + (m_old - m_new) s)
                                      with a = 2^(m_old - m_new)

so that ``lse2 = m + log2 s`` and ``entropy = ln2 (log2 s - t / s)``. The log-sum-exp is stored in base 2
(``lse2 = lse / ln 2``) because the backward recomputes ``p = 2^(u - lse2)`` from it: a round trip through the
natural log would cost an fp32 rounding of ``|lse|`` (5e-4 at 1e4), i.e. a 1e-3 relative error in ``p``.
Keeping ``t`` relative to the running maximum avoids the cancellation of ``lse - sum p z`` when logits
are large (|z| ~ 1e4).

``-inf`` logits are legal (padded vocabularies): a block that is all ``-inf`` while the running maximum
is still ``-inf`` would give ``2^(-inf - -inf) = NaN``; the rescale uses a "safe" maximum (0 while it is
``-inf``) and ``-inf`` entries contribute exactly 0 to ``s`` and ``t``. Columns ``>= vocab_size`` are read
as ``-inf``. Rows whose label is negative or equals ``ignore_index`` are skipped: their logits are never read
and they get ``logprob = lse = entropy = 0``. A chosen logit of ``-inf`` gives ``logprob = -inf``. A row
whose kept logits are all ``-inf`` gives ``lse = -inf``, ``logprob = -inf`` and ``entropy = 0``.

Memory: reads each kept row once (plus the label's element, a cache hit), writes O(N) fp32. No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, launch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Compiled kernels may only read globals that are constexpr (the interpreter does not enforce this).
LN2_C = tl.constexpr(LN2)

# Tiling. One program per row walks the row in blocks of BLOCK_V columns: 4096 columns x 2 B (bf16) is
# 8 KiB per block; with 8 warps (256 threads) that is 16 elements per thread, i.e. two 16-byte vector loads
# per thread per block. Several programs are resident per SM, so enough bytes are in flight to saturate HBM,
# while few registers are live per thread (~16 fp32 values for x/u/e) and occupancy stays high. The block
# reductions (max, s, t) cost shuffles + shared memory once per 4096 columns, small next to the 8-16 KiB
# load. One program per row keeps the grid 1-D (N up to 2^31) and each row's result independent of N.
# The same on every target (configs.LOGITS; checked per target by tests/kernels/test_offline_compile.py).
DEFAULT_BLOCK_V = configs.LOGITS["block_v"]
DEFAULT_NUM_WARPS = configs.LOGITS["num_warps"]


@triton.jit
def _logprob_forward_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16, last dim contiguous, row stride `stride_row`
    labels_ptr,  # [N] int32/int64
    logprobs_ptr,  # [N] fp32 out
    lse2_ptr,  # [N] fp32 out: base-2 log-sum-exp of u = z log2(e)
    entropy_ptr,  # [N] fp32 out (unused unless WITH_ENTROPY)
    stride_row,
    vocab_size,  # columns >= vocab_size read as -inf
    ignore_index,
    scale,  # fp32: log2(e) / T
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    skip = (label < 0) | (label == ignore_index)
    # A skipped row loops zero times: its logits are never read.
    n_cols = tl.where(skip, 0, vocab_size)
    row_ptr = logits_ptr + row * stride_row

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf"))
        u = x.to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(u, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)  # 0 while m is -inf (then s = t = 0 anyway)
        e = tl.exp2(u - m_safe)  # exactly 0 for -inf entries
        if WITH_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)  # finite; s = 0 when m = -inf
            t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0.0, u - m_safe, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    # s = 0 only when the row is all -inf (or skipped): lse2 = -inf then. `live` is `s != 0`, not `s > 0`, so a
    # NaN/+inf logit (s = NaN) propagates as NaN instead of passing for a dead row. The guards keep the
    # arithmetic free of 0 * inf and 0 / 0 even in the discarded branch.
    live = s != 0.0
    # s == 1 (one token holds all the mass, e.g. V = 1): log2(1) = 0 exactly, whatever the fast log2 rounds to.
    log2_s = tl.where(s == 1.0, 0.0, tl.log2(tl.where(live, s, 1.0)))
    lse2 = tl.where(live, m + log2_s, float("-inf"))
    safe_label = tl.where(skip, 0, label)
    u_label = tl.load(row_ptr + safe_label, mask=~skip, other=0.0).to(tl.float32) * scale
    logprob = (u_label - tl.where(live, lse2, 0.0)) * LN2_C
    logprob = tl.where(live, logprob, float("-inf"))
    tl.store(logprobs_ptr + row, tl.where(skip, 0.0, logprob))
    tl.store(lse2_ptr + row, tl.where(skip, 0.0, lse2))
    if WITH_ENTROPY:
        entropy = (log2_s - t / tl.where(live, s, 1.0)) * LN2_C
        entropy = tl.where(live, entropy, 0.0)
        tl.store(entropy_ptr + row, tl.where(skip, 0.0, entropy))


def logprob_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel; no validation, no autograd (see ``flowloss.ops.triton_logprobs``).

    ``logits [N, V]`` with ``logits.stride(1) == 1``; ``labels [N]`` int32/int64, negative or ``ignore_index``
    = skip the row. Returns fp32 ``(logprobs [N], lse2 [N], entropy [N] or None)``; ``lse2 * ln 2`` is the
    natural log-sum-exp of ``logits / temperature`` over the first ``vocab_size`` columns (all by default),
    kept in base 2 for `logprob_backward` (see the module docstring). Skipped rows hold 0 in all three.
    """
    n_rows, n_cols = logits.shape
    vocab = n_cols if vocab_size is None else int(vocab_size)
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse2 = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if with_entropy else None
    if n_rows == 0:
        return logprobs, lse2, entropy
    with launch.on_device(logits):
        _logprob_forward_kernel[(n_rows,)](
            logits,
            labels,
            logprobs,
            lse2,
            entropy if entropy is not None else lse2,
            logits.stride(0),
            vocab,
            int(ignore_index),
            float(LOG2E / float(temperature)),
            WITH_ENTROPY=with_entropy,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return logprobs, lse2, entropy

"""Backward Triton kernels of the fused ``lm_head`` + log-prob: ``dH``, ``dW`` and ``db`` without ``[N, V]`` logits.

With ``z = (h W^T + b) / T`` recomputed tile by tile, ``p = softmax(z)`` from the forward's base-2 log-sum-exp
``lse2``, upstream gradients ``g [N]`` (of the log-prob) and ``g_H [N]`` (of the entropy ``H [N]``)::

    dz_nv = [g_n (onehot(y_n)_v - p_nv) - g_Hn p_nv (log p_nv + H_n)] / T          [N, V], never whole
    dH    = dz @ W     [N, H]            dW = dz^T @ h     [V, H]            db = sum_n dz_n     [V]

Skipped rows (``label < 0`` or ``== ignore_index``) have ``dz = 0`` and ``dH = 0`` and are never read.

Why a recompute, and where the sums live. A per-token log-prob gets an arbitrary upstream ``g`` per row, so (unlike
a mean cross-entropy) the gradient cannot be finished in the forward: the backward recomputes the logits. With
``F = N_kept H V`` (1.0e13 at N = 16,384, H = 4096, V = 151,936): forward ``2F``, backward ``2F`` (recompute)
+ ``2F`` (``dH``) + ``2F`` (``dW``) = ``8F`` in all, 103 ms at the ~790 TFLOP/s of dense bf16 on an H200. ``dH[n]``
sums over all of ``V`` and ``dW[v]`` over all of ``N``, and an ``H = 4096`` wide fp32 row block does not fit on
chip (128 x 4096 x 4 B = 2 MiB), so someone must hold partial sums:

====================================  =====  =====================================  ==========================
design                                FLOPs  extra memory (bytes)                   deterministic / precision
====================================  =====  =====================================  ==========================
fused tiles, fp32 atomics (CCE-like)  8F     ``4 (N + V) H``: 2.7 GiB, 2.1x dW + dH  no / fp32
fused tiles, locked adds into bf16    8F     ~0                                     no / rounds every partial
dz chunks, one pass, fp32 dH buffer   8F     ``4 N H`` + chunk: 256 MiB (0.19x)      yes / fp32, one rounding
dz chunks, two passes (default)       10F    chunk only: ``(dW + dH) / 24``         yes / fp32, one rounding
====================================  =====  =====================================  ==========================

Chosen: materialized ``dz`` chunks and owned GEMMs. A chunk of ``dz`` is recomputed into a bounded buffer (the
input dtype, like the naive path's ``dz``), then GEMM kernels contract it where one program owns each output tile,
sums in fp32 registers in a fixed order and writes once. ``dW`` of a vocabulary chunk is owned when the chunk spans
all rows, ``dH`` of a row chunk when it spans all columns, and one small chunk cannot span both, so:

- pass W: vocabulary chunks of ``w_cols`` columns x all rows -> ``dW`` and ``db`` of the chunk, finished (rows are
  split into sub-chunks, summed in an fp32 ``[w_cols, H]`` buffer, only when N is huge);
- pass H: row chunks of ``h_rows`` rows x all columns, in sub-chunks of ``h_cols`` summed in an fp32 ``[h_rows, H]``
  buffer -> ``dH`` of the chunk, finished. It recomputes only the tiles pass W found live.

``10F`` (129 ms at 790 TFLOP/s; the goal of 100 ms is below even the ``8F`` floor without filtering), deterministic,
scratch within a budget (``max_scratch_bytes``, default 1/24 of the requested gradients' bytes, at least 4 MiB:
55 MiB, 4.2 %, at the shape above). When the budget holds an fp32 ``[N, H]`` buffer (at N = 4096, V = 262,144 by
default; anywhere with a larger ``max_scratch_bytes``) pass W also sums ``dH`` chunk by chunk and pass H is dropped:
``8F``, one recompute, same results bitwise. No atomics anywhere: ``deterministic`` changes nothing (accepted for
PyTorch's convention; a non-deterministic variant would need the atomic designs above, which lose on memory or
precision, and is not offered).

Bytes (HBM), default plan at the shape above: pass W writes and reads ``dz`` once (2 N V bytes = 5 GB each way)
and streams ``h`` (128 MiB) twice per vocabulary chunk (92 chunks: 24 GB); pass H the same ``dz`` traffic and ``W``
(1.2 GB) twice per row chunk (16 chunks: 40 GB). About 80 GB, ~17 ms at 4.8 TB/s, overlapping ~130 ms of tensor-core
work; larger chunks (``max_scratch_bytes``, ``h_rows``) trade memory for less traffic.

Kernels. ``_linear_logprob_dz_kernel`` recomputes a ``[block_n, block_v]`` logit tile (the forward's tiling),
forms ``dz``, writes it (live tiles only), one int8 flag per tile (live or not) and, when ``db`` is wanted, the
tile's fp32 column sums (reduced in a fixed order). ``_live_tiles_kernel`` compacts the flags of a chunk into, per
GEMM output tile, the increasing list of live tiles it sums over (a prefix sum, no atomics), so the GEMMs
(``_linear_logprob_dweight_kernel``, ``_linear_logprob_dhidden_kernel``) loop over that list: tiles of skipped rows
(and filtered tiles) cost no FLOPs with or without ``order``, and the loop keeps Triton's software pipelining (a
branch around the loads in the loop would serialise them: the compile test checks for asynchronous copies). A GEMM
that continues a partial sum starts from the stored fp32 value, so chunking never changes the summation order: a
row's ``dH`` is bitwise independent of the batch and of the plan (tested); ``dW`` and ``db`` sum over the batch.

Gradient filtering (``filter_eps``; ``None``, the default, is exact). Write ``dz = g onehot - q``. A tile is
skipped by the GEMMs (and pass H's recompute) when it holds no label of its rows and, for every row in it,
``sum_{v in tile} |q_nv| <= filter_eps (|g_n| + |g_Hn|) / T / cdiv(V, block_v)``. So each row loses at most
``filter_eps (|g_n| + |g_Hn|) / T`` of ``dz`` in L1 over the whole vocabulary: ``|error of dH_nk| <= filter_eps
(|g_n| + |g_Hn|) / T max_v |W_vk|``, and ``dW_vk`` loses at most ``filter_eps / cdiv(V, block_v) sum_n (|g_n| +
|g_Hn|) |h_nk| / T``: sound bounds whatever the distribution. For comparison, rounding ``dz`` to bf16 (the naive
path) moves a ``dH`` element by up to ``2^-8 sum_v |dz_nv| |W_vk|`` with ``sum_v |dz_nv| >= 2 |g_n| (1 - p_ny) / T``,
so ``filter_eps = 2^-10`` stays within a quarter of bf16 rounding unless the label already holds nearly all the
mass. Cut Cross-Entropy's rule (skip when every ``|p - onehot| < eps``) has no such bound: a distribution spread over
more than ``1 / eps`` tokens loses most of its mass, and every tail row of ``dW`` becomes 0. Caveats: the recompute
of pass W is never skipped (``2F``), so filtering saves at most the GEMMs and pass H's recompute (``10F -> 4F`` in
the limit); on random inputs with logits of standard deviation 2-3 (the flowloss bench) every tile holds mass far
above any sound threshold and nothing is skipped; it pays off on trained models, whose tails sit at ``p ~ 1e-8``
and below. ``db`` is always exact (pass W computes every tile). A row's ``dH`` can then depend on its tile-mates
(a tile is live if any row needs it).

Layout and limits: ``hidden [N, H]`` with any row stride (``stride(1) == 1``), ``W [V, H]`` with ``stride(1) == 1``;
int64 offsets; grids put the long axis first; fp32 inputs use ``input_precision="ieee"`` (FMA units, not tensor
cores: slow, for exactness) unless ``allow_tf32``. No host synchronisation: the launcher issues the same kernels
whatever the labels hold (the kept-row count is only ever read on device), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .linear_logprob_forward import (
    LN2_C,
    LOG2E,
    dot_precision,
    interpreting,
    logit_tile,
    resolve_tuning,
    row_tile,
)

# Tiling (first guesses; to be tuned on the GPU). The recompute tile is the forward's (128 x 128, K steps of
# 64). The GEMMs reuse its tiling on the summed axis (so a tile flag covers one GEMM step) and take 128 columns
# of H per program: (w_cols / 128) x 32 programs for dW (416 at the 1664-column chunk the default budget gives at
# N = 16,384, V = 151,936, H = 4096), 256 for a 1024-row dH chunk. h_rows = 1024 streams W (1.2 GB at V = 151,936)
# twice per pass-H chunk (16 chunks at N = 16,384: 40 GB, ~8 ms at 4.8 TB/s, overlapping compute) and costs
# 1024 x 4096 x 4 B = 16 MiB of fp32 dH accumulator. Measured for sm_90 (ptxas -v): no spills; 218 registers for
# the recompute kernel with entropy and filter, 118-132 for the GEMMs.
DEFAULT_BACKWARD_TUNING = {
    "block_n": 128,
    "block_v": 128,
    "block_k": 64,
    "block_h": 128,
    "num_warps": 8,
    "num_stages": 3,
    "gemm_num_warps": 8,
    "gemm_num_stages": 3,
    "max_scratch_bytes": None,
    "h_rows": 1024,
    "min_chunk_tiles": 4,
    # Pass W splits its rows (summing dW in fp32) only for huge N, then into sub-chunks of at least this many row
    # tiles, so the fp32 read-modify-write (8 w_cols H bytes per sub-chunk) stays small next to the GEMM.
    "min_split_row_tiles": 16,
    "compact_block": 1024,
    "allow_tf32": False,
}
# Default scratch budget: 1/24 of the requested gradients' bytes (4.2 %: the goal is a peak of at most 1.05x the
# outputs, and the forward's O(N) buffers and the tile flags take a little more), at least 4 MiB.
SCRATCH_FRACTION = 24
MIN_SCRATCH_BYTES = 4 * 2**20


@triton.jit
def _linear_logprob_dz_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] (unused unless HAS_BIAS)
    labels_ptr,  # [N]
    order_ptr,  # [N] (unused unless HAS_ORDER)
    lse2_ptr,  # [N] fp32, base-2 log-sum-exp from the forward
    grad_logprobs_ptr,  # [N] (unused unless HAS_GRAD_LOGPROBS)
    entropy_ptr,  # [N] fp32 (unused unless HAS_GRAD_ENTROPY)
    grad_entropy_ptr,  # [N] (unused unless HAS_GRAD_ENTROPY)
    dz_ptr,  # [tiles_n * BLOCK_N, tiles_v * BLOCK_V] chunk buffer, row stride stride_dz, hidden's dtype
    flags_ptr,  # [cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)] int8, row stride stride_flags: 1 = tile has gradient
    colsum_ptr,  # [tiles_n, tiles_v * BLOCK_V] fp32 column sums of dz (unused unless WRITE_COLSUM)
    row_tile0,  # first row tile (global index) of this launch
    col0,  # first column of this launch (a multiple of BLOCK_V)
    n_rows,
    vocab_size,
    hidden_size,
    stride_hidden,
    stride_weight,
    stride_dz,
    stride_flags,
    stride_colsum,
    ignore_index,
    scale,  # fp32: log2(e) / T
    inv_temperature,  # fp32: 1 / T
    filter_share,  # fp32: filter_eps / cdiv(V, BLOCK_V)
    HAS_BIAS: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr,  # decide the tile flag with the filtering rule (else: 1 iff the tile has kept rows)
    READ_FLAGS: tl.constexpr,  # flags were decided by an earlier pass: recompute only live tiles, keep flags
    WRITE_COLSUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_V]`` tile of ``dz``: recompute the logits, write ``dz``, its flag, its column sums."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    tile = row_tile0 + i
    vtile = col0 // BLOCK_V + j
    rows, labels, kept = row_tile(labels_ptr, order_ptr, tile, n_rows, ignore_index, HAS_ORDER, BLOCK_N)
    any_kept = tl.max(kept.to(tl.int32), axis=0) > 0
    flag_ptr = flags_ptr + tile.to(tl.int64) * stride_flags + vtile
    live = any_kept
    if READ_FLAGS:
        live = live & (tl.load(flag_ptr) != 0)
    cols = col0 + j * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_size

    # A dead tile (no kept rows, or filtered out by an earlier pass) runs its K loop zero times.
    acc = logit_tile(
        hidden_ptr, weight_ptr, rows, kept, cols, vocab_size, tl.where(live, hidden_size, 0), stride_hidden,
        stride_weight, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    u = tl.where(col_ok[None, :], acc * scale, float("-inf"))
    # Skipped rows read lse2 = +inf (p = 0); an all -inf row (lse2 = -inf) also gets p = 0, so its gradient is g
    # on the label only, as in logprob_backward.py.
    lse2 = tl.load(lse2_ptr + rows, mask=kept, other=float("inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    p = tl.exp2(u - lse2[:, None])
    g = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_GRAD_LOGPROBS:
        g = tl.load(grad_logprobs_ptr + rows, mask=kept, other=0.0).to(tl.float32) * inv_temperature
    q = g[:, None] * p  # dz = g onehot - q
    g_h = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=kept, other=0.0).to(tl.float32) * inv_temperature
        h_n = tl.load(entropy_ptr + rows, mask=kept, other=0.0)
        log_p = tl.where(p > 0.0, (u - lse2[:, None]) * LN2_C, 0.0)  # p log p -> 0 where p = 0
        q += g_h[:, None] * p * (log_p + h_n[:, None])
    is_label = cols[None, :] == labels[:, None]
    write = kept[:, None] & live
    dz = tl.where(write, tl.where(is_label, g[:, None], 0.0) - q, 0.0)

    if READ_FLAGS:
        keep_tile = live
    elif FILTER:
        # Skip the tile only if no kept row has its label here and every kept row's |q| mass here is within
        # its share of the budget (NaN mass fails the test: the tile is kept and NaN propagates).
        mass = tl.sum(tl.where(write, tl.abs(q), 0.0), axis=1)
        budget = filter_share * (tl.abs(g) + tl.abs(g_h))
        has_label = tl.sum(tl.where(is_label & col_ok[None, :], 1, 0), axis=1) > 0
        needed = kept & (has_label | ~(mass <= budget))
        keep_tile = tl.max(needed.to(tl.int32), axis=0) > 0
        tl.store(flag_ptr, keep_tile.to(tl.int8))
    else:
        keep_tile = any_kept
        tl.store(flag_ptr, keep_tile.to(tl.int8))

    if WRITE_COLSUM:  # every tile, filtered or not: db stays exact
        tl.store(colsum_ptr + i.to(tl.int64) * stride_colsum + j * BLOCK_V + tl.arange(0, BLOCK_V), tl.sum(dz, axis=0))
    # Only live tiles are written: the GEMMs read nothing else (see _live_tiles_kernel).
    offs_n = i.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = j * BLOCK_V + tl.arange(0, BLOCK_V)
    store = (tl.zeros((BLOCK_N, BLOCK_V), tl.int32) + keep_tile.to(tl.int32)) != 0  # a full-shape mask
    tl.store(dz_ptr + offs_n[:, None] * stride_dz + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=store)


@triton.jit
def _live_tiles_kernel(
    flags_ptr,  # int8 flags of one chunk, viewed as [M, K] with strides (stride_m, stride_k)
    index_ptr,  # [M, K] int32 out: row m lists, in increasing order, the k with flag != 0
    count_ptr,  # [M] int32 out: how many
    n_k,
    stride_m,
    stride_k,
    stride_index,
    BLOCK: tl.constexpr,
):
    """Compact the live tiles of one GEMM operand row: a prefix sum, no atomics (deterministic)."""
    m = tl.program_id(0).to(tl.int64)
    count = tl.zeros((), tl.int32)
    for k0 in range(0, n_k, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        live = (tl.load(flags_ptr + m * stride_m + ks * stride_k, mask=ks < n_k, other=0) != 0).to(tl.int32)
        slot = count + tl.cumsum(live, axis=0) - 1
        tl.store(index_ptr + m * stride_index + slot, ks, mask=live != 0)
        count += tl.sum(live, axis=0)
    tl.store(count_ptr + m, count)


@triton.jit
def _linear_logprob_dweight_kernel(
    dz_ptr,  # [rows of the chunk (padded), cols of the chunk (padded)], row stride stride_dz
    hidden_ptr,  # [N, H]
    row_index_ptr,  # [N] int64: hidden row of each position, -1 for a skipped row
    index_ptr,  # [vocabulary tiles of the chunk, row tiles of the chunk] int32: live row tiles per column tile
    count_ptr,  # [vocabulary tiles of the chunk] int32
    out_ptr,  # [cols of the chunk, H], row stride stride_out: fp32 accumulator or dW's slice (its dtype)
    pos0,  # first position of the chunk
    n_cols,  # valid columns of the chunk (rows of out)
    n_rows,
    hidden_size,
    stride_dz,
    stride_hidden,
    stride_index,
    stride_out,
    ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[v, k] (+)= sum_rows dz[row, v] h[row, k]`` for one ``[BLOCK_V, BLOCK_H]`` tile it owns, over the
    live row tiles only (in increasing order: a fixed summation order)."""
    i = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < hidden_size
    offs_v = i * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_n = tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + offs_v[:, None].to(tl.int64) * stride_out + hs[None, :]
    mask = (offs_v < n_cols)[:, None] & h_ok[None, :]
    # Continuing from the stored partial sum (not adding it at the end) keeps the summation order that of one
    # pass over all row tiles, so the result does not depend on how the rows were split into sub-chunks.
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    if ACCUMULATE:
        acc = tl.load(out_ptrs, mask=mask, other=0.0)
    n_live = tl.load(count_ptr + i)
    for it in range(0, n_live):
        r = tl.load(index_ptr + i.to(tl.int64) * stride_index + it)
        local = r.to(tl.int64) * BLOCK_N + offs_n
        pos = pos0 + local
        rows = tl.load(row_index_ptr + pos, mask=pos < n_rows, other=-1)
        a = tl.load(dz_ptr + offs_v[:, None] + local[None, :] * stride_dz)  # [BLOCK_V, BLOCK_N] = dz^T
        b = tl.load(  # skipped rows are never read (their dz is 0; NaN there must not leak)
            hidden_ptr + rows[:, None] * stride_hidden + hs[None, :],
            mask=(rows >= 0)[:, None] & h_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_logprob_dhidden_kernel(
    dz_ptr,  # [rows of the chunk (padded), cols of the sub-chunk (padded)], row stride stride_dz
    weight_ptr,  # [V, H]
    row_index_ptr,  # [N] int64: hidden row of each position, -1 for a skipped row
    index_ptr,  # [row tiles of the chunk, vocabulary tiles of the sub-chunk] int32: live column tiles per row tile
    count_ptr,  # [row tiles of the chunk] int32
    out_ptr,  # [rows of the chunk, H] by position, row stride stride_out: fp32 accumulator or dH's dtype
    pos0,  # first position of the chunk
    col0,  # first column of the sub-chunk
    n_out_rows,  # valid rows of out
    n_rows,
    vocab_size,
    hidden_size,
    stride_dz,
    stride_weight,
    stride_index,
    stride_out,
    ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[n, k] (+)= sum_v dz[n, v] W[v, k]`` for one ``[BLOCK_N, BLOCK_H]`` tile it owns, over the live
    column tiles only (in increasing order); skipped rows get exactly 0."""
    i = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < hidden_size
    local = i.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    out_ptrs = out_ptr + local[:, None] * stride_out + hs[None, :]
    mask = (local < n_out_rows)[:, None] & h_ok[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    if ACCUMULATE:  # continue from the partial sum: the order is that of one pass over all column tiles
        acc = tl.load(out_ptrs, mask=mask, other=0.0)
    n_live = tl.load(count_ptr + i)
    for it in range(0, n_live):
        c = tl.load(index_ptr + i.to(tl.int64) * stride_index + it)
        cols = c * BLOCK_V + offs_v
        vs = col0 + cols
        a = tl.load(dz_ptr + local[:, None] * stride_dz + cols[None, :])  # [BLOCK_N, BLOCK_V]
        b = tl.load(
            weight_ptr + vs[:, None].to(tl.int64) * stride_weight + hs[None, :],
            mask=(vs < vocab_size)[:, None] & h_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    pos = pos0 + local
    kept = tl.load(row_index_ptr + pos, mask=pos < n_rows, other=-1) >= 0
    acc = tl.where(kept[:, None], acc, 0.0)  # exactly 0 for skipped rows, even against a NaN in W
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _round_down(x: float, m: int) -> int:
    return max(0, int(x) // m * m)


@dataclass(frozen=True)
class BackwardPlan:
    """How the backward walks the ``[N, V]`` gradient (all sizes multiples of the tiles, by padded extent).

    Pass W (when ``dW`` is needed, or ``db`` alone): vocabulary chunks of ``w_cols`` columns, each in row
    sub-chunks of ``w_rows`` rows; ``w_rows >= n_pad`` means one sub-chunk and no fp32 ``dW`` buffer. Pass H
    (when ``dH`` is needed and not ``single_pass``): row chunks of ``h_rows`` rows, each in column sub-chunks of
    ``h_cols``; ``h_cols >= v_pad`` means one sub-chunk and no fp32 ``dH`` buffer. ``single_pass``: ``dH`` is
    summed into an fp32 ``[N, H]`` buffer during pass W (one recompute). ``scratch_bytes``: the largest pass's
    buffers.
    """

    n_pad: int
    v_pad: int
    pass_w: bool
    pass_h: bool
    single_pass: bool
    w_cols: int
    w_rows: int
    h_rows: int
    h_cols: int
    scratch_bytes: int


def default_scratch_bytes(n_rows, vocab, hidden_size, itemsize, need_hidden, need_weight, need_bias) -> int:
    """``max(4 MiB, (bytes of the requested gradients) / 24)``."""
    outputs = itemsize * hidden_size * (vocab * need_weight + n_rows * need_hidden) + 4 * vocab * need_bias
    return max(MIN_SCRATCH_BYTES, outputs // SCRATCH_FRACTION)


def plan_backward(
    n_rows: int,
    vocab: int,
    hidden_size: int,
    itemsize: int,
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    has_order: bool,
    budget: int,
    block_n: int,
    block_v: int,
    h_rows: int,
    min_chunk_tiles: int,
    min_split_row_tiles: int = 16,
) -> BackwardPlan:
    """Chunk sizes that keep the backward's scratch within ``budget`` bytes (pure arithmetic on shapes)."""
    n_pad, v_pad = _round_up(n_rows, block_n), _round_up(vocab, block_v)
    pass_w = need_weight or (need_bias and not need_hidden)
    bias_in_w = need_bias and pass_w
    fp32 = 4

    def w_bytes(rows: int, cols: int) -> int:  # dz chunk + column sums + fp32 dW buffer if rows are split
        acc = fp32 * cols * hidden_size if (need_weight and rows < n_pad) else 0
        return itemsize * rows * cols + fp32 * (rows // block_n) * cols * bias_in_w + acc

    def w_cols_for(rows: int, avail: int) -> int:
        per_col = itemsize * rows + fp32 * (rows // block_n) * bias_in_w
        return min(v_pad, _round_down(avail / per_col, block_v))

    min_cols = min(v_pad, min_chunk_tiles * block_v)
    convert_rows = min(n_pad, _round_up(h_rows, block_n))
    single = False
    w_rows = w_cols = 0
    w_scratch = 0
    if pass_w:
        # Single pass if an fp32 [N, H] dH buffer (+ a conversion block) fits beside a pass-W chunk.
        if need_hidden and need_weight:
            extra = fp32 * n_pad * hidden_size + itemsize * convert_rows * hidden_size
            cols = w_cols_for(n_pad, budget - extra)
            single = cols >= min_cols
            if single:
                w_rows, w_cols = n_pad, cols
                w_scratch = extra + w_bytes(w_rows, w_cols)
        if not single:
            cols = w_cols_for(n_pad, budget)
            if cols >= min_cols:
                w_rows, w_cols = n_pad, cols
            else:  # too many rows for one sub-chunk: split them, summing dW in fp32 (8 w_cols H bytes of
                # traffic per sub-chunk against 2 w_rows w_cols H FLOPs: keep w_rows large)
                w_cols = min_cols
                avail = budget - fp32 * w_cols * hidden_size
                per_row = itemsize * w_cols + fp32 * w_cols * bias_in_w / block_n
                w_rows = min(n_pad, max(min_split_row_tiles * block_n, _round_down(avail / per_row, block_n)))
            w_scratch = w_bytes(w_rows, w_cols)

    pass_h = need_hidden and not single
    h_rows_, h_cols = 0, 0
    h_scratch = 0
    if pass_h:
        bias_in_h = need_bias and not pass_w
        rows = min(n_pad, _round_up(h_rows, block_n))
        while True:
            tmp = itemsize * rows * hidden_size if has_order else 0  # dtype copy scattered through `order`
            per_col = itemsize * rows + fp32 * (rows // block_n) * bias_in_h
            if per_col * v_pad + tmp <= budget:  # whole vocabulary at once: dH written directly
                h_cols, acc = v_pad, 0
                break
            acc = fp32 * rows * hidden_size
            h_cols = min(v_pad, _round_down((budget - tmp - acc) / per_col, block_v))
            if h_cols >= min(v_pad, min_chunk_tiles * block_v) or rows == block_n:
                h_cols = max(block_v, h_cols)
                break
            rows = max(block_n, _round_down(rows // 2, block_n))
        h_rows_ = rows
        h_scratch = per_col * h_cols + tmp + acc
    return BackwardPlan(
        n_pad, v_pad, pass_w, pass_h, single, w_cols, w_rows, h_rows_, h_cols, max(w_scratch, h_scratch)
    )


def linear_logprob_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    *,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    order: torch.Tensor | None = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    filter_eps: float | None = None,
    deterministic: bool | None = None,
    **tuning,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels; no validation, no autograd, no host synchronisation.

    Inputs as for `linear_logprob_forward`; ``lse`` is its base-2 ``lse2`` output, ``entropy`` its entropy
    (needed only with ``grad_entropy``). ``grad_logprobs`` / ``grad_entropy`` ``[N]`` (any float dtype) or None for
    zero. ``filter_eps``: ``None`` (default) is exact; a float enables the tile filter of the module docstring
    (dropped gradient per row at most ``filter_eps (|g| + |g_H|) / T`` in L1). ``deterministic`` is accepted for
    PyTorch's convention and changes nothing: every path here is deterministic. ``tuning`` overrides
    `DEFAULT_BACKWARD_TUNING` (tiles, warps, stages, ``max_scratch_bytes``, ``h_rows``, ``min_chunk_tiles``,
    ``min_split_row_tiles``, ``compact_block``, ``allow_tf32``).

    Returns ``(d_hidden [N, H] in hidden's dtype (contiguous), d_weight [V, H] in weight's dtype, d_bias [V] in
    bias's dtype)``, None where not needed (``d_bias`` is None without a bias).
    """
    del deterministic  # every path is deterministic (see the module docstring)
    cfg = resolve_tuning(DEFAULT_BACKWARD_TUNING, tuning)
    need_bias = need_bias and bias is not None
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    d_hidden = torch.empty((n_rows, hidden_size), dtype=dtype, device=device) if need_hidden else None
    d_weight = torch.empty((vocab, hidden_size), dtype=weight.dtype, device=device) if need_weight else None
    d_bias = None
    has_grad_entropy = grad_entropy is not None
    if has_grad_entropy and entropy is None:
        raise ValueError("`entropy` (the forward's output) is needed when `grad_entropy` is given")
    if n_rows == 0 or (grad_logprobs is None and not has_grad_entropy):
        for out in (d_hidden, d_weight):
            if out is not None:
                out.zero_()
        return d_hidden, d_weight, torch.zeros_like(bias) if need_bias else None

    bn, bv, bh = cfg["block_n"], cfg["block_v"], cfg["block_h"]
    budget = cfg["max_scratch_bytes"]
    if budget is None:
        budget = default_scratch_bytes(
            n_rows, vocab, hidden_size, hidden.element_size(), need_hidden, need_weight, need_bias
        )
    plan = plan_backward(
        n_rows,
        vocab,
        hidden_size,
        hidden.element_size(),
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        has_order=order is not None,
        budget=budget,
        block_n=bn,
        block_v=bv,
        h_rows=cfg["h_rows"],
        min_chunk_tiles=cfg["min_chunk_tiles"],
        min_split_row_tiles=cfg["min_split_row_tiles"],
    )
    n_vtiles = triton.cdiv(vocab, bv)
    # flags[row tile, vocabulary tile] = 1 when the tile of dz is live (has kept rows, and survives the filter)
    flags = torch.empty((plan.n_pad // bn, n_vtiles), dtype=torch.int8, device=device)
    db = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    # Position p of the walk reads hidden row row_index[p] (order[p], or p), -1 when that row is skipped.
    positions = order.to(torch.int64) if order is not None else torch.arange(n_rows, device=device)
    kept = (labels >= 0) & (labels != ignore_index)
    row_index = torch.where(kept[positions], positions, torch.full_like(positions, -1))
    dot_prec = dot_precision(dtype, cfg["allow_tf32"])
    upcast = interpreting()
    filtering = filter_eps is not None
    h_grid = triton.cdiv(hidden_size, bh)
    gemm = {
        "DOT_PRECISION": dot_prec,
        "UPCAST": upcast,
        "BLOCK_N": bn,
        "BLOCK_V": bv,
        "BLOCK_H": bh,
        "num_warps": cfg["gemm_num_warps"],
        "num_stages": cfg["gemm_num_stages"],
    }

    def recompute(dz, colsum, tile0, n_tiles, c0, n_cols, *, read_flags):
        """dz (and flags, column sums) of row tiles [tile0, tile0 + n_tiles) x columns [c0, c0 + n_cols)."""
        _linear_logprob_dz_kernel[(n_tiles, triton.cdiv(n_cols, bv))](
            hidden,
            weight,
            bias if bias is not None else weight,
            labels,
            order if order is not None else labels,
            lse,
            grad_logprobs if grad_logprobs is not None else lse,
            entropy if has_grad_entropy else lse,
            grad_entropy if has_grad_entropy else lse,
            dz,
            flags,
            colsum if colsum is not None else lse,
            tile0,
            c0,
            n_rows,
            vocab,
            hidden_size,
            hidden.stride(0),
            weight.stride(0),
            dz.stride(0),
            flags.stride(0),
            colsum.stride(0) if colsum is not None else 0,
            int(ignore_index),
            float(LOG2E / float(temperature)),
            float(1.0 / float(temperature)),
            float(filter_eps) / n_vtiles if filtering else 0.0,
            HAS_BIAS=bias is not None,
            HAS_ORDER=order is not None,
            HAS_GRAD_LOGPROBS=grad_logprobs is not None,
            HAS_GRAD_ENTROPY=has_grad_entropy,
            FILTER=filtering and not read_flags,
            READ_FLAGS=read_flags,
            WRITE_COLSUM=colsum is not None,
            DOT_PRECISION=dot_prec,
            UPCAST=upcast,
            BLOCK_N=bn,
            BLOCK_V=bv,
            BLOCK_K=cfg["block_k"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        if colsum is not None:  # fixed-order fp32 sum over the row tiles of this launch
            db[c0 : c0 + n_cols] += colsum[:n_tiles, :n_cols].sum(dim=0)

    def live_tiles(block_flags, index, count, *, by_column):
        """For each GEMM output tile, the live tiles it sums over: rows of index (+ count) from flags."""
        n_m, n_k = (block_flags.shape[1], block_flags.shape[0]) if by_column else block_flags.shape
        stride_m, stride_k = (1, block_flags.stride(0)) if by_column else (block_flags.stride(0), 1)
        _live_tiles_kernel[(n_m,)](
            block_flags, index, count, n_k, stride_m, stride_k, index.stride(0), BLOCK=cfg["compact_block"]
        )

    def dweight(dz, out, index, count, tile0, n_tiles, c0, n_cols, *, accumulate):
        live_tiles(flags[tile0 : tile0 + n_tiles, c0 // bv : c0 // bv + triton.cdiv(n_cols, bv)], index, count,
                   by_column=True)  # fmt: skip
        _linear_logprob_dweight_kernel[(triton.cdiv(n_cols, bv), h_grid)](
            dz,
            hidden,
            row_index,
            index,
            count,
            out,
            tile0 * bn,
            n_cols,
            n_rows,
            hidden_size,
            dz.stride(0),
            hidden.stride(0),
            index.stride(0),
            out.stride(0),
            ACCUMULATE=accumulate,
            **gemm,
        )

    def dhidden(dz, out, index, count, tile0, n_tiles, c0, n_cols, n_out_rows, *, accumulate):
        live_tiles(flags[tile0 : tile0 + n_tiles, c0 // bv : c0 // bv + triton.cdiv(n_cols, bv)], index, count,
                   by_column=False)  # fmt: skip
        _linear_logprob_dhidden_kernel[(n_tiles, h_grid)](
            dz,
            weight,
            row_index,
            index,
            count,
            out,
            tile0 * bn,
            c0,
            n_out_rows,
            n_rows,
            vocab,
            hidden_size,
            dz.stride(0),
            weight.stride(0),
            index.stride(0),
            out.stride(0),
            ACCUMULATE=accumulate,
            **gemm,
        )

    def store_hidden(src, p0, n_pos):
        """Positions ``p0 .. p0 + n_pos`` of ``src`` into their rows of ``d_hidden`` (skipped rows hold 0)."""
        n_pos = min(n_pos, n_rows - p0)
        if n_pos <= 0:
            return
        if order is None:
            d_hidden[p0 : p0 + n_pos].copy_(src[:n_pos])
        else:
            d_hidden.index_copy_(0, positions[p0 : p0 + n_pos], src[:n_pos].to(dtype))

    def int32(*shape):
        return torch.empty(shape, dtype=torch.int32, device=device)

    if plan.pass_w:
        w_tiles_n, w_tiles_v = plan.w_rows // bn, plan.w_cols // bv
        dz = torch.empty((plan.w_rows, plan.w_cols), dtype=dtype, device=device)
        colsum = torch.empty((w_tiles_n, plan.w_cols), dtype=torch.float32, device=device) if need_bias else None
        acc_w = None
        if need_weight and plan.w_rows < plan.n_pad:
            acc_w = torch.empty((plan.w_cols, hidden_size), dtype=torch.float32, device=device)
        acc_h = None
        if plan.single_pass:
            acc_h = torch.empty((plan.n_pad, hidden_size), dtype=torch.float32, device=device)
        index_w, count_w = int32(w_tiles_v, w_tiles_n), int32(w_tiles_v)
        index_h, count_h = int32(w_tiles_n, w_tiles_v), int32(w_tiles_n)
        for c0 in range(0, vocab, plan.w_cols):
            n_cols = min(plan.w_cols, vocab - c0)
            for p0 in range(0, plan.n_pad, plan.w_rows):
                tile0, n_tiles = p0 // bn, min(plan.w_rows, plan.n_pad - p0) // bn
                recompute(dz, colsum, tile0, n_tiles, c0, n_cols, read_flags=False)
                if need_weight:
                    out = acc_w if acc_w is not None else d_weight[c0 : c0 + n_cols]
                    dweight(dz, out, index_w, count_w, tile0, n_tiles, c0, n_cols, accumulate=p0 > 0)
                if acc_h is not None:
                    dhidden(dz, acc_h[p0:], index_h, count_h, tile0, n_tiles, c0, n_cols, n_tiles * bn,
                            accumulate=c0 > 0)  # fmt: skip
            if acc_w is not None:
                d_weight[c0 : c0 + n_cols].copy_(acc_w[:n_cols])
        if acc_h is not None:
            step = _round_up(cfg["h_rows"], bn)
            for p0 in range(0, n_rows, step):
                store_hidden(acc_h[p0 : p0 + step], p0, step)
        del dz, colsum, acc_w, acc_h

    if plan.pass_h:
        h_tiles_n, h_tiles_v = plan.h_rows // bn, plan.h_cols // bv
        colsum = None
        if need_bias and not plan.pass_w:
            colsum = torch.empty((h_tiles_n, plan.h_cols), dtype=torch.float32, device=device)
        dz = torch.empty((plan.h_rows, plan.h_cols), dtype=dtype, device=device)
        one_sub_chunk = plan.h_cols >= plan.v_pad
        acc = None
        if not one_sub_chunk:  # sum the sub-chunks in fp32, round once
            acc = torch.empty((plan.h_rows, hidden_size), dtype=torch.float32, device=device)
        elif order is not None:  # rows are scattered through `order` afterwards
            acc = torch.empty((plan.h_rows, hidden_size), dtype=dtype, device=device)
        index_h, count_h = int32(h_tiles_n, h_tiles_v), int32(h_tiles_n)
        for p0 in range(0, plan.n_pad, plan.h_rows):
            tile0, n_tiles = p0 // bn, min(plan.h_rows, plan.n_pad - p0) // bn
            if acc is None:  # no order, whole vocabulary at once: write dH in place
                out, n_out = d_hidden[p0:], n_rows - p0
            else:
                out, n_out = acc, n_tiles * bn
            for c0 in range(0, vocab, plan.h_cols):
                n_cols = min(plan.h_cols, vocab - c0)
                recompute(dz, colsum, tile0, n_tiles, c0, n_cols, read_flags=plan.pass_w)
                dhidden(dz, out, index_h, count_h, tile0, n_tiles, c0, n_cols, n_out, accumulate=c0 > 0)
            if acc is not None:
                store_hidden(acc, p0, n_tiles * bn)

    if need_bias:
        d_bias = db.to(bias.dtype)
    return d_hidden, d_weight, d_bias

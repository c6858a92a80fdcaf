"""Backward Triton kernels of the fused ``lm_head`` + log-prob: ``dH``, ``dW`` and ``db`` without ``[N, V]`` logits.

With ``z = (h W^T + b) / T`` recomputed tile by tile, ``p = softmax(z)`` from the forward's base-2 log-sum-exp
``lse2``, upstream gradients ``g [N]`` (of the log-prob) and ``g_H [N]`` (of the entropy ``H [N]``)::

    dz_nv = [g_n (onehot(y_n)_v - p_nv) - g_Hn p_nv (log p_nv + H_n)] / T          [N, V], never whole
    dH    = dz @ W     [N, H]            dW = dz^T @ h     [V, H]            db = sum_n dz_n     [V]

Skipped rows (``label < 0`` or ``== ignore_index``) have ``dz = 0`` and ``dH = 0`` and are never read.

Kernels. ``_linear_logprob_dz_kernel`` recomputes ``[block_n, block_v]`` logit tiles (the forward's tiling, in
grouped order: ``group_n`` row tiles share the hidden rows while they run), forms ``dz`` into a bounded chunk
buffer, one int8 flag per tile (live or not) and, when ``db`` is wanted, the tile's fp32 column sums. The GEMM
kernels (``_linear_logprob_dweight_kernel``, ``_linear_logprob_dhidden_kernel``) contract the chunk; one program
owns each output tile, sums in fp32 in a fixed order and writes once (no atomics: deterministic). They loop over the
live tiles only: with ``order`` (kept rows first) and no filter these are a prefix, counted on the device from the
kept-row count; otherwise ``_live_tiles_kernel`` lists them (a prefix sum). How the chunks are sized (two passes
or one): ``linear_logprob_plan.py``. The design, the FLOP and byte counts, and the gradient filter's error bound:
``docs/kernels.md`` ("Fused linear: the backward").

Gradient filtering (``filter_eps``; ``None``, the default, is exact): a tile is skipped by the GEMMs when it holds
no label of its rows and, for every row in it, ``sum_{v in tile} |q_nv| <= filter_eps (|g_n| + |g_Hn|) / T /
cdiv(V, block_v)`` with ``dz = g onehot - q``: each row loses at most ``filter_eps (|g_n| + |g_Hn|) / T`` of ``dz``
in L1. ``db`` stays exact.

Layout and limits: ``hidden [N, H]`` with any row stride (``stride(1) == 1``), ``W [V, H]`` with ``stride(1) == 1``;
int64 offsets; fp32 inputs need TF32 (``allow_tf32``) on a GPU (`configs`). No host synchronisation: the launcher
issues the same kernels whatever the labels hold, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, launch
from .linear_logprob_forward import (
    LN2_C,
    LOG2E,
    dot_precision,
    grouped_tile,
    interpreting,
    logit_tile,
    resolve_tuning,
    row_tile,
)
from .linear_logprob_plan import default_scratch_bytes, plan_backward

# Tiling (first guesses; to be tuned on the GPU; per target: configs.py). The recompute tile is the forward's
# (128 x 128, K steps of 64), in groups of 8 row tiles. The GEMMs reuse its tiling on the summed axis (so a tile flag
# covers one GEMM step) and take 128 columns of H per program: (w_cols / 128) x 32 programs for dW (512 at the
# 2048-column chunk the default budget gives at N = 16,384, V = 151,936, H = 4096). h_rows = 1024: the rows per
# pass-H chunk (two-pass plan) and per conversion block of the single pass's fp32 dH buffer. Register, shared memory
# and spill figures per target: tests/kernels/test_offline_compile.py.
DEFAULT_BACKWARD_TUNING = {
    "block_n": 128,
    "block_v": 128,
    "block_k": 64,
    "block_h": 128,
    "group_n": 8,
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


# Chunk positions and sizes vary from launch to launch: not specialized on their values (which would compile one
# variant per chunk offset class), so one backward compiles each kernel once.
@triton.jit(do_not_specialize=["row_tile0", "col0", "n_tiles", "n_col_tiles"])
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
    n_tiles,  # row tiles of this launch
    n_col_tiles,  # column tiles of this launch
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
    GROUP_N: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_V]`` tile of ``dz``: recompute the logits, write ``dz``, its flag, its column sums.
    A 1-D grid over ``n_tiles x n_col_tiles`` tiles in grouped order (`grouped_tile`)."""
    i, j = grouped_tile(tl.program_id(0), n_tiles, n_col_tiles, GROUP_N)
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


@triton.jit(do_not_specialize=["pos0", "n_tiles", "n_cols"])
def _linear_logprob_dweight_kernel(
    dz_ptr,  # [rows of the chunk (padded), cols of the chunk (padded)], row stride stride_dz
    hidden_ptr,  # [N, H]
    row_index_ptr,  # [N] int64: hidden row of each position, -1 for a skipped row
    index_ptr,  # [vocabulary tiles of the chunk, row tiles of the chunk] int32: live row tiles per column tile
    count_ptr,  # [vocabulary tiles of the chunk] int32 (PREFIX: [1] int32, the kept-row count of the batch)
    out_ptr,  # [cols of the chunk, H], row stride stride_out: fp32 accumulator or dW's slice (its dtype)
    pos0,  # first position of the chunk
    n_tiles,  # row tiles of the chunk
    n_cols,  # valid columns of the chunk (rows of out)
    n_rows,
    hidden_size,
    stride_dz,
    stride_hidden,
    stride_index,
    stride_out,
    ACCUMULATE: tl.constexpr,
    PREFIX: tl.constexpr,  # the live row tiles are the first cdiv(kept - pos0, BLOCK_N) (kept rows first, no filter)
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
    if PREFIX:
        n_live = tl.minimum(tl.maximum(tl.cdiv(tl.load(count_ptr) - pos0, BLOCK_N), 0), n_tiles)
    else:
        n_live = tl.load(count_ptr + i)
    for it in range(0, n_live):
        r = it
        if not PREFIX:
            r = tl.load(index_ptr + i.to(tl.int64) * stride_index + it)
        local = r.to(tl.int64) * BLOCK_N + offs_n  # type: ignore[attr-defined]  # a Triton scalar under @triton.jit
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


@triton.jit(do_not_specialize=["pos0", "col0", "n_col_tiles", "n_out_rows"])
def _linear_logprob_dhidden_kernel(
    dz_ptr,  # [rows of the chunk (padded), cols of the sub-chunk (padded)], row stride stride_dz
    weight_ptr,  # [V, H]
    row_index_ptr,  # [N] int64: hidden row of each position, -1 for a skipped row
    index_ptr,  # [row tiles of the chunk, vocabulary tiles of the sub-chunk] int32: live column tiles per row tile
    count_ptr,  # [row tiles of the chunk] int32 (PREFIX: [1] int32, the kept-row count of the batch)
    out_ptr,  # [rows of the chunk, H] by position, row stride stride_out: fp32 accumulator or dH's dtype
    pos0,  # first position of the chunk
    col0,  # first column of the sub-chunk
    n_col_tiles,  # column tiles of the sub-chunk
    n_out_rows,  # valid rows of out
    n_rows,
    vocab_size,
    hidden_size,
    stride_dz,
    stride_weight,
    stride_index,
    stride_out,
    ACCUMULATE: tl.constexpr,
    PREFIX: tl.constexpr,  # a row tile with a kept row has every column tile live (kept rows first, no filter)
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
    if PREFIX:  # noqa: SIM108 (a constexpr branch)
        n_live = tl.where(pos0 + i * BLOCK_N < tl.load(count_ptr), n_col_tiles, 0)
    else:
        n_live = tl.load(count_ptr + i)
    for it in range(0, n_live):
        c = it
        if not PREFIX:
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
    cfg = resolve_tuning(DEFAULT_BACKWARD_TUNING, {**configs.linear_tuning(hidden, tuning, backward=True), **tuning})
    with launch.on_device(hidden):
        return _backward(
            hidden, weight, bias, labels, lse, grad_logprobs, entropy, grad_entropy, temperature, ignore_index, order,
            need_hidden, need_weight, need_bias and bias is not None, filter_eps, cfg,
        )  # fmt: skip


def _backward(
    hidden, weight, bias, labels, lse, grad_logprobs, entropy, grad_entropy, temperature, ignore_index, order,
    need_hidden, need_weight, need_bias, filter_eps, cfg,
):  # fmt: skip
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
            n_rows, vocab, hidden_size, hidden.element_size(), need_hidden, need_weight, need_bias, block_n=bn,
            h_rows=cfg["h_rows"],
        )  # fmt: skip
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
    row_index = torch.where(kept.index_select(0, positions), positions, torch.full_like(positions, -1))
    dot_prec = dot_precision(dtype, cfg["allow_tf32"])
    upcast = interpreting()
    filtering = filter_eps is not None
    # Kept rows first and no filter: the live tiles of every GEMM are a prefix, counted from the kept rows on the
    # device, so no tile lists are compacted (two launches fewer per chunk).
    prefix = order is not None and not filtering
    kept_count = kept.sum(dtype=torch.int32).reshape(1) if prefix else None
    h_grid = triton.cdiv(hidden_size, bh)
    gemm = {
        "PREFIX": prefix,
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
        n_col_tiles = triton.cdiv(n_cols, bv)
        _linear_logprob_dz_kernel[(n_tiles * n_col_tiles,)](
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
            n_tiles,
            n_col_tiles,
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
            GROUP_N=cfg["group_n"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        if colsum is not None:  # fixed-order fp32 sum over the row tiles of this launch
            assert db is not None  # colsum exists only when the bias gradient is asked for
            db[c0 : c0 + n_cols] += colsum[:n_tiles, :n_cols].sum(dim=0)

    def live_tiles(block_flags, index, count, *, by_column):
        """For each GEMM output tile, the live tiles it sums over: rows of index (+ count) from flags; with
        ``prefix`` nothing to compact (the GEMMs count from ``kept_count``)."""
        if prefix:
            return
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
            kept_count if prefix else count,
            out,
            tile0 * bn,
            n_tiles,
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
            kept_count if prefix else count,
            out,
            tile0 * bn,
            c0,
            triton.cdiv(n_cols, bv),
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
        assert d_hidden is not None  # only called when dH is asked for
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
                if d_weight is not None:
                    out = acc_w if acc_w is not None else d_weight[c0 : c0 + n_cols]
                    dweight(dz, out, index_w, count_w, tile0, n_tiles, c0, n_cols, accumulate=p0 > 0)
                if acc_h is not None:
                    dhidden(dz, acc_h[p0:], index_h, count_h, tile0, n_tiles, c0, n_cols, n_tiles * bn,
                            accumulate=c0 > 0)  # fmt: skip
            if acc_w is not None and d_weight is not None:
                d_weight[c0 : c0 + n_cols].copy_(acc_w[:n_cols])
        if acc_h is not None:
            step = -(-cfg["h_rows"] // bn) * bn
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
                assert d_hidden is not None  # pass H runs only for dH
                out, n_out = d_hidden[p0:], n_rows - p0
            else:
                out, n_out = acc, n_tiles * bn
            for c0 in range(0, vocab, plan.h_cols):
                n_cols = min(plan.h_cols, vocab - c0)
                recompute(dz, colsum, tile0, n_tiles, c0, n_cols, read_flags=plan.pass_w)
                dhidden(dz, out, index_h, count_h, tile0, n_tiles, c0, n_cols, n_out, accumulate=c0 > 0)
            if acc is not None:
                store_hidden(acc, p0, n_tiles * bn)

    if db is not None and bias is not None:
        d_bias = db.to(bias.dtype)
    return d_hidden, d_weight, d_bias

"""How the fused lm_head backward walks the ``[N, V]`` gradient in bounded chunks: pure arithmetic on shapes.

The backward (``linear_logprob_backward.py``) recomputes ``dz`` one chunk at a time into a scratch buffer and
contracts it with GEMM kernels that own their output tiles (no atomics). Pass W covers vocabulary chunks x all rows
(``dW``, ``db``), pass H row chunks x all columns (``dH``); when the budget also holds an fp32 ``[N, H]`` buffer,
pass W sums ``dH`` too and pass H is dropped (the single pass: ``8 N H V`` FLOPs instead of ``10``, the same bits).
`plan_backward` picks the chunk sizes for a budget; `default_scratch_bytes` is the default budget. The design and
its costs: ``docs/kernels.md`` ("Fused linear: the backward").
"""

from __future__ import annotations

from dataclasses import dataclass

# Default scratch budget: 1/24 of the requested gradients' bytes (4.2 %: the goal is a peak of at most 1.05x the
# outputs, and the forward's O(N) buffers and the tile flags take a little more), at least 64 MiB. The floor
# matters for dH alone (a frozen lm_head, LoRA): 1/24 of dH is a few MiB, and chunks that small took 6,272 chunk
# launches (12,546 kernels) for one backward at N = 16,384, V = 262,144, fp32; with 64 MiB, 352 chunks.
SCRATCH_FRACTION = 24
MIN_SCRATCH_BYTES = 64 * 2**20
# The single pass is the default when its fp32 dH buffer costs at most 1/SINGLE_PASS_FRACTION of the gradients'
# bytes (0.19x at N = 16,384, H = 4096, V = 151,936: 256 MiB against 1.3 GiB of dW + dH, for 20 % fewer FLOPs).
SINGLE_PASS_FRACTION = 4


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


def default_scratch_bytes(
    n_rows, vocab, hidden_size, itemsize, need_hidden, need_weight, need_bias, *, block_n=128, h_rows=1024
) -> int:
    """The default budget: ``max(64 MiB, (bytes of the requested gradients) / 24)``, plus, when both ``dH`` and ``dW``
    are wanted and an fp32 ``[N, H]`` buffer (and a conversion block) costs at most 1/4 of the gradients' bytes, that
    buffer: the single-pass plan (8 N H V FLOPs instead of 10, same results bitwise)."""
    outputs = itemsize * hidden_size * (vocab * need_weight + n_rows * need_hidden) + 4 * vocab * need_bias
    budget = max(MIN_SCRATCH_BYTES, outputs // SCRATCH_FRACTION)
    if need_hidden and need_weight:
        n_pad = _round_up(n_rows, block_n)
        extra = 4 * n_pad * hidden_size + itemsize * min(n_pad, _round_up(h_rows, block_n)) * hidden_size
        if extra * SINGLE_PASS_FRACTION <= outputs:
            budget += extra
    return budget


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


__all__ = ["BackwardPlan", "default_scratch_bytes", "plan_backward"]

"""Forward Triton kernels of the fused ``lm_head`` + log-prob: per-row log-prob, log-sum-exp and entropy
straight from the hidden states, without the ``[N, V]`` logits ever reaching memory.

For hidden states ``h [N, H]``, head ``W [V, H]``, optional bias ``b [V]``, labels ``y [N]`` and temperature
``T``, with the matmul accumulated in fp32 and the temperature applied after it::

    z_n      = (h_n @ W^T + b) / T                                   [V] per row, fp32, never stored
    lse_n    = log sum_v exp(z_nv)                                   stored as lse2 = lse / ln 2   [N] fp32
    logp_n   = z_n[y_n] - lse_n                                      [N] fp32
    H_n      = -sum_v p_nv log p_nv = lse_n - sum_v p_nv z_nv,  p_n = softmax(z_n)   [N] fp32 (optional)

Work: ``2 N_kept H V`` FLOPs on tensor cores (``tl.dot`` on fp16/bf16 tiles, fp32 accumulation; fp32 inputs as
TF32, which a GPU target's configuration requires and only where the user allowed TF32, `configs`; IEEE fp32
under the interpreter or with an explicit ``allow_tf32=False`` tuning). Bytes: the hidden rows and ``W`` are
streamed through L2 like any GEMM's operands (``W`` once per row tile group); HBM writes are O(N).
Nothing of size ``[N, V]`` exists, not even per tile outside registers.

Schedule. ``partial`` kernel, grid ``(cdiv(N, BLOCK_N), cdiv(V, SPLIT_V))``: program ``(i, s)`` owns row tile
``i`` (``BLOCK_N`` rows, read through ``order`` when given) and vocabulary split ``s`` (``SPLIT_V`` columns).
It walks its split in ``BLOCK_V``-column tiles; for each tile it accumulates the ``[BLOCK_N, BLOCK_V]`` logit
tile over ``H`` in ``BLOCK_K`` steps, then folds the tile into a per-row online log-sum-exp (base 2,
``u = z log2(e)``, so every exponential is an ``exp2``), exactly as ``logprob_forward.py`` does per row::

    m = max_v u_v          s = sum_v 2^(u_v - m)          t = sum_v 2^(u_v - m) (u_v - m)   (entropy only)

rescaling ``s`` by ``a = 2^(m_old - m_new)`` and ``t`` as ``t' = a (t + (m_old - m_new) s)`` when the maximum
grows. The label's logit is picked on the way (``u`` where ``column == y``; no extra load, no out-of-bounds read
whatever the label). The split writes ``(m, s, t, u_y)`` to a ``[4, S, N]`` fp32 buffer (``16 S N`` bytes: 5 MB
at N = 16,384, V = 151,936). The ``combine`` kernel (1-D grid over rows) merges the ``S`` partials of a row in
split order and writes ``lse2 = m + log2 s``, ``logp = ln2 (u_y - lse2)``, ``H = ln2 (log2 s - t / s)``.

Why split the vocabulary: one program per row tile alone gives ``N / 128`` programs, 32 at N = 4096 on a
132-SM H200. Splits of a fixed ``SPLIT_V`` columns (a constant, never derived from ``N``) give enough programs
at small N, while a row's arithmetic (tiles, split boundaries, merge order) depends only on ``V`` and the
tuning, never on the batch: a row's result is bitwise the same in any batch and at any position (tested).
No atomics, no locks: the merge order is fixed, so results are deterministic.

Skipped rows (``label < 0`` or ``label == ignore_index``) are never read (masked loads) and get 0 in all
outputs. A row tile whose rows are all skipped does no work: with ``order`` (kept rows first, built by the
caller on device) every tile past the kept rows exits at once, so skipped rows cost no FLOPs and the launcher
needs no host-side count (no synchronisation; CUDA-graph capturable). A kept label ``>= V`` reads nothing out of
bounds; its outputs are unspecified (the caller replaces them). ``-inf`` logits (e.g. from a ``-inf`` bias) are
legal and get ``p = 0``; the rescale uses a "safe" maximum (0 while the running maximum is ``-inf``) so an
all ``-inf`` tile gives no ``-inf - -inf``. A NaN or ``+inf`` logit on a kept row makes ``s`` NaN, and the row's
outputs NaN (``live = s != 0``, not ``s > 0``). A row whose logits are all ``-inf`` gives ``lse = -inf``,
``logp = -inf`` and ``H = 0``, as in ``logprob_forward.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import configs, launch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LN2_C = tl.constexpr(LN2)

# Tiling (first guesses for an H100/H200 at bf16; to be tuned on the GPU; per target: configs.py). A 128 x 128 fp32
# logit tile is 64 KiB of registers over 8 warps (64 per thread), leaving room for the online-softmax temporaries;
# 64-deep K steps of bf16 are 16 KiB per operand and stage. SPLIT_V = 8192 columns gives 19 splits at V = 151,936,
# so N = 4096 still launches 608 programs (4.6 waves on 132 SMs) and each program runs 64 tiles, long enough to
# amortize its set-up. Programs run in groups of GROUP_N = 8 row tiles across the splits (`grouped_tile`): the ~132
# programs in flight read 8 row tiles of hidden states (8 MiB at H = 4096), which stay in L2, and 16 splits of W,
# each shared by 8 programs, instead of all N rows (128 MiB at N = 16,384, more than the 50-60 MB L2) re-read from
# HBM for every tile of one split. The combine kernel is O(N S): negligible.
DEFAULT_FORWARD_TUNING = {
    "block_n": 128,
    "block_v": 128,
    "block_k": 64,
    "split_v": 8192,
    "group_n": 8,
    "num_warps": 8,
    "num_stages": 3,
    "combine_block": 256,
    "allow_tf32": False,
}


def interpreting() -> bool:
    """True under Triton's CPU interpreter, whose ``tl.dot`` mishandles bf16 (it multiplies the raw bits:
    triton-lang/triton#11584); the kernels then upcast dot operands to fp32 (exact for bf16/fp16 products)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``"ieee"`` for fp32 operands unless TF32 is asked for; ignored by ``tl.dot`` for fp16/bf16."""
    return "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"


def resolve_tuning(defaults: dict, tuning: dict) -> dict:
    """``defaults`` updated with ``tuning``; an unknown key is a typo and raises ``TypeError``."""
    unknown = set(tuning) - set(defaults)
    if unknown:
        raise TypeError(f"unknown tuning option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **tuning}


@triton.jit
def grouped_tile(pid, n_tiles, n_cols, GROUP_N: tl.constexpr):
    """Program ``pid`` of a 1-D grid over ``n_tiles x n_cols`` tiles -> ``(row tile, column)``, in groups of
    ``GROUP_N`` row tiles: consecutive programs walk the row tiles of a group first, then the next column, so the
    programs in flight share ``GROUP_N`` row tiles of hidden states and a few columns (splits, or vocabulary tiles)
    of ``W``. A bijection: every tile is computed once, whatever the order (results do not depend on it)."""
    per_group = GROUP_N * n_cols
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_tiles - first, GROUP_N)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def row_tile(labels_ptr, order_ptr, tile, n_rows, ignore_index, HAS_ORDER: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of row tile ``tile`` (positions ``tile * BLOCK_N + [0, BLOCK_N)``, through ``order`` when given):
    ``(rows int64 [BLOCK_N], labels int64 [BLOCK_N], kept bool [BLOCK_N])``."""
    pos = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = pos < n_rows
    rows = pos
    if HAS_ORDER:
        rows = tl.load(order_ptr + pos, mask=in_range, other=0).to(tl.int64)
    labels = tl.load(labels_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    kept = in_range & (labels >= 0) & (labels != ignore_index)
    return rows, labels, kept


@triton.jit
def logit_tile(
    hidden_ptr,
    weight_ptr,
    rows,
    kept,
    cols,
    vocab_size,
    hidden_size,
    stride_hidden,
    stride_weight,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``h[rows] @ W[cols]^T``: ``[BLOCK_N, BLOCK_V]`` fp32, accumulated over ``H`` in ``BLOCK_K`` steps.

    Skipped rows (``~kept``) and columns ``>= vocab_size`` are not loaded (read as 0); their entries are
    meaningless and callers discard them with ``tl.where``. ``hidden_size = 0`` gives a zero tile, no loads."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows[:, None] * stride_hidden + ks[None, :]
    w_ptrs = weight_ptr + cols[None, :].to(tl.int64) * stride_weight + ks[:, None]
    col_ok = cols < vocab_size
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = (k0 + ks) < hidden_size
        h = tl.load(h_ptrs, mask=kept[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _linear_logprob_partial_kernel(
    hidden_ptr,  # [N, H] fp32/bf16/fp16, stride(1) == 1, row stride `stride_hidden`
    weight_ptr,  # [V, H] same dtype, row stride `stride_weight`
    bias_ptr,  # [V] (unused unless HAS_BIAS)
    labels_ptr,  # [N] int32/int64
    order_ptr,  # [N] int32/int64 permutation, kept rows first (unused unless HAS_ORDER)
    partial_ptr,  # [4, S, N] fp32 out: m, s, t, u_label per (split, row); written for kept rows only
    n_rows,
    n_splits,  # S = cdiv(vocab_size, SPLIT_V)
    vocab_size,
    hidden_size,
    stride_hidden,
    stride_weight,
    ignore_index,
    scale,  # fp32: log2(e) / T
    HAS_BIAS: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    tile, split = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), n_splits, GROUP_N)
    rows, labels, kept = row_tile(labels_ptr, order_ptr, tile, n_rows, ignore_index, HAS_ORDER, BLOCK_N)
    start = split * SPLIT_V
    # A tile without kept rows loops zero times: nothing is read, nothing is written.
    stop = tl.where(tl.max(kept.to(tl.int32), axis=0) > 0, tl.minimum(start + SPLIT_V, vocab_size), start)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    u_label = tl.zeros((BLOCK_N,), tl.float32)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(start, stop, BLOCK_V):
        cols = v0 + offs_v
        acc = logit_tile(
            hidden_ptr, weight_ptr, rows, kept, cols, vocab_size, hidden_size, stride_hidden, stride_weight,
            DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < vocab_size, other=0.0).to(tl.float32)[None, :]
        u = tl.where((cols < vocab_size)[None, :], acc * scale, float("-inf"))
        # The label's logit: exactly one column matches (adding zeros is exact; -inf and NaN pass through).
        u_label += tl.sum(tl.where(cols[None, :] == labels[:, None], u, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(u, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)  # 0 while m is -inf (s = t = 0 then)
        e = tl.exp2(u - m_safe[:, None])  # exactly 0 for -inf entries
        if WITH_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
            t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0.0, u - m_safe[:, None], 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    out = partial_ptr + split * n_rows + rows
    plane = tl.cast(n_splits, tl.int64) * n_rows  # n_splits may be specialized to a constexpr 1
    tl.store(out, m, mask=kept)
    tl.store(out + plane, s, mask=kept)
    if WITH_ENTROPY:
        tl.store(out + 2 * plane, t, mask=kept)
    tl.store(out + 3 * plane, u_label, mask=kept)


@triton.jit
def _linear_logprob_combine_kernel(
    partial_ptr,  # [4, S, N] fp32 from the partial kernel
    labels_ptr,  # [N]
    logprobs_ptr,  # [N] fp32 out
    lse2_ptr,  # [N] fp32 out (base 2)
    entropy_ptr,  # [N] fp32 out (unused unless WITH_ENTROPY)
    n_rows,
    n_splits,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    kept = in_range & (labels >= 0) & (labels != ignore_index)
    plane = tl.cast(n_splits, tl.int64) * n_rows  # n_splits may be specialized to a constexpr 1

    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    u_label = tl.zeros((BLOCK,), tl.float32)
    for split in range(0, n_splits):
        ptr = partial_ptr + split * n_rows + rows
        m_i = tl.load(ptr, mask=kept, other=float("-inf"))
        s_i = tl.load(ptr + plane, mask=kept, other=0.0)
        u_label += tl.load(ptr + 3 * plane, mask=kept, other=0.0)
        m_new = tl.maximum(m, m_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_safe)
        a_i = tl.exp2(m_i - m_safe)
        if WITH_ENTROPY:
            t_i = tl.load(ptr + 2 * plane, mask=kept, other=0.0)
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
            shift_i = tl.where(m_i == float("-inf"), 0.0, m_i - m_safe)
            t = a * (t + shift * s) + a_i * (t_i + shift_i * s_i)
        s = a * s + a_i * s_i
        m = m_new

    # As in logprob_forward.py: s = 0 only for an all -inf row; NaN/+inf logits make s NaN and propagate.
    live = s != 0.0
    log2_s = tl.log2(tl.where(live, s, 1.0))
    lse2 = tl.where(live, m + log2_s, float("-inf"))
    logprob = tl.where(live, (u_label - tl.where(live, lse2, 0.0)) * LN2_C, float("-inf"))
    tl.store(logprobs_ptr + rows, tl.where(kept, logprob, 0.0), mask=in_range)
    tl.store(lse2_ptr + rows, tl.where(kept, lse2, 0.0), mask=in_range)
    if WITH_ENTROPY:
        entropy = tl.where(live, (log2_s - t / tl.where(live, s, 1.0)) * LN2_C, 0.0)
        tl.store(entropy_ptr + rows, tl.where(kept, entropy, 0.0), mask=in_range)


def linear_logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    order: torch.Tensor | None = None,
    **tuning,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernels; no validation, no autograd, no host synchronisation.

    ``hidden [N, H]`` (``stride(1) == 1``, any row stride), ``weight [V, H]`` (``stride(1) == 1``) and ``bias [V]``
    or None, one float dtype (fp32/bf16/fp16); ``labels [N]`` int32/int64 (negative or ``ignore_index`` = skip);
    ``order`` an optional ``[N]`` int32/int64 permutation of the rows with the kept rows first. On a GPU the
    target's configuration (`configs.linear_config`; `configs.NoConfig` where there is none, e.g. fp32 without
    TF32) replaces the defaults; ``tuning`` overrides both (`DEFAULT_FORWARD_TUNING`: ``block_n``, ``block_v``,
    ``block_k``, ``split_v`` (a multiple of ``block_v``), ``group_n``, ``num_warps``, ``num_stages``,
    ``combine_block``, ``allow_tf32``, default ``torch.backends.cuda.matmul.allow_tf32``). Runs on ``hidden``'s
    device.

    Returns fp32 ``(logprobs [N], lse2 [N], entropy [N] or None)`` in the original row order; ``lse2`` is the
    base-2 log-sum-exp (``lse2 * ln 2 = logsumexp(z)``), what `linear_logprob_backward` takes. Skipped rows
    hold 0 in all three.
    """
    cfg = resolve_tuning(DEFAULT_FORWARD_TUNING, {**configs.linear_tuning(hidden, tuning, backward=False), **tuning})
    with launch.on_device(hidden):
        return _forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, order, cfg)


def _forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, order, cfg):
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse2 = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device) if with_entropy else None
    if n_rows == 0:
        return logprobs, lse2, entropy
    split_v = int(cfg["split_v"])
    if split_v % cfg["block_v"]:
        raise ValueError(f"split_v={split_v} must be a multiple of block_v={cfg['block_v']}")
    n_splits = triton.cdiv(vocab_size, split_v)
    partial = torch.empty((4, n_splits, n_rows), dtype=torch.float32, device=device)
    _linear_logprob_partial_kernel[(triton.cdiv(n_rows, cfg["block_n"]) * n_splits,)](
        hidden,
        weight,
        bias if bias is not None else weight,
        labels,
        order if order is not None else labels,
        partial,
        n_rows,
        n_splits,
        vocab_size,
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        int(ignore_index),
        float(LOG2E / float(temperature)),
        HAS_BIAS=bias is not None,
        HAS_ORDER=order is not None,
        WITH_ENTROPY=with_entropy,
        DOT_PRECISION=dot_precision(hidden.dtype, cfg["allow_tf32"]),
        UPCAST=interpreting(),
        SPLIT_V=split_v,
        BLOCK_N=cfg["block_n"],
        BLOCK_V=cfg["block_v"],
        BLOCK_K=cfg["block_k"],
        GROUP_N=cfg["group_n"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    _linear_logprob_combine_kernel[(triton.cdiv(n_rows, cfg["combine_block"]),)](
        partial,
        labels,
        logprobs,
        lse2,
        entropy if entropy is not None else lse2,
        n_rows,
        n_splits,
        int(ignore_index),
        WITH_ENTROPY=with_entropy,
        BLOCK=cfg["combine_block"],
    )
    return logprobs, lse2, entropy

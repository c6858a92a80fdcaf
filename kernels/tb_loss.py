"""Fused Triton kernels of the trajectory-balance loss's per-sequence part: one launch forward, one backward.

For row ``i`` with response mask ``m [T]``, token log-probs ``lp`` (policy), ``ref`` (reference), optionally
``old`` (sampling policy) and ``ro`` (inference engine), reward ``r_i`` and log-partition ``z_i``, everything in
fp32 after the upcast (inputs may be fp16/bf16/fp32)::

    rho_t    = lp_t - old_t                                       (detached)
    kept_t   = m_t and not (r_i > 0 and rho_t > hi  or  r_i < 0 and rho_t < lo)    token clip mask, else m_t
               (a non-finite rho_t is kept: a bad log-prob must reach the loss)
    n_i      = sum_t kept_t                                       hi = log1p(eps_high), lo = log1p(-eps_low)
    l_i      = sum_kept (lp_t - ref_t)  [/ max(n_i, 1) with length normalization]
    delta_i  = (z_i + l_i) - beta r_i
    s_i      = sum_kept rho_t  [/ max(n_i, 1) for "geometric_clipped"]           unclipped log-weight
    c_i      = clip(s_i, lo, hi) | min(s_i, log max_weight) | min(s_i, 20) | 0   by importance mode
    c_i      = NaN where s_i is not finite (a clip must not hide an infinite ratio)
    c_i     += min(sum_kept (old_t - ro_t) [/ max(n_i, 1) geometric], log tis_cap)   with rollout log-probs
               (NaN where that sum is -inf: a rollout log-prob of +inf)
    w_i      = exp(c_i)                                            (1 exactly for mode "none" without rollout)
    per_seq_i = w_i g(delta_i) where n_i > 0, else 0               g: the penalty (squared, shifted_cosh, ...)

Backward, with upstream ``u_i = d loss / d per_seq_i`` (``w``, the clip mask and ``old`` are constants)::

    d z_i     = u_i w_i g'(delta_i)                  (0 where n_i = 0)
    d lp_it   = d z_i / max(n_i, 1)   on kept tokens with length normalization, d z_i without; exactly 0 elsewhere

Masked entries may hold ``-inf``/NaN: loads are bounded by the row only (so they vectorize to 16-byte
accesses) and every loaded value is selected away (``tl.where``) where the mask is False before any arithmetic,
never multiplied by 0. A NaN at a kept position propagates to ``delta``/``w`` and to ``per_seq`` (clamps are
written as selects, which keep NaN on the GPU as in the interpreter; ``tl.minimum`` would drop it).

Layout: one program per row (a 1-D grid: ``B`` up to 2^31), a loop over ``T`` in blocks of ``BLOCK_T``; row
offsets are int64 (``row * stride``), the token dimension must have stride 1 (the launchers copy otherwise).
The forward reads each ``[B, T]`` input once and writes ``per_seq [B]`` and ``stats [NSTATS, B]`` (fp32); the
backward re-reads the mask (and ``lp``, ``old`` for the token clip mask) and writes ``d lp [B, T]`` in ``lp``'s
dtype and ``d z [B]`` in ``z``'s dtype. No atomics: a row's result does not depend on the batch.

Accuracy: per-token terms are summed in fp32 block vectors (``BLOCK_T`` partial sums, then a tree reduction).
``exp`` is Triton's (on NVIDIA ``ex2.approx`` of ``x log2 e``: relative error about ``2^-22 + |x| 2^-24``);
``expm1`` and ``expm1(x) - x`` use a Taylor polynomial for ``|x| < 1`` so small residuals keep full precision.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch

# Importance modes and penalties as compile-time integers.
MODE_IDS = {"none": 0, "sequence_clipped": 1, "sequence_capped": 2, "sequence": 3, "geometric_clipped": 4}
PENALTY_IDS = {"squared": 0, "shifted_cosh": 1, "linex": 2, "huber": 3}
# Cap of log w in mode "sequence" (flowloss.importance.UNCLIPPED_LOG_WEIGHT_LIMIT; not imported: kernels know
# nothing of losses).
SEQUENCE_LOG_WEIGHT_LIMIT = 20.0

# Rows of the fp32 `stats [NSTATS, B]` buffer the forward writes (the last one is what the backward needs).
STAT_ROWS = (
    "delta",  # delta_i (also for rows with no kept token)
    "weights",  # w_i
    "log_weights_unclipped",  # s_i (0 in mode "none")
    "clipped_low",  # 1.0 where s_i < lo (clipped modes), else 0.0
    "clipped_high",  # 1.0 where s_i was capped from above, else 0.0
    "lengths",  # n_i, kept tokens
    "counted",  # 1.0 where the row has a token in the mask, else 0.0
    "mask_lengths",  # sum_t m_t
    "seq_logprobs",  # sum_kept lp [/ max(n_i, 1)]
    "seq_ref_logprobs",  # sum_kept ref [/ max(n_i, 1)]
    "dper_seq_ddelta",  # w_i g'(delta_i) where n_i > 0, else 0
)
NSTATS = len(STAT_ROWS)
_ROW = {name: k for k, name in enumerate(STAT_ROWS)}
# Compiled kernels may only read globals that are constexpr (the interpreter does not enforce this).
S_DELTA = tl.constexpr(_ROW["delta"])
S_WEIGHTS = tl.constexpr(_ROW["weights"])
S_LOG_W = tl.constexpr(_ROW["log_weights_unclipped"])
S_LOW = tl.constexpr(_ROW["clipped_low"])
S_HIGH = tl.constexpr(_ROW["clipped_high"])
S_LENGTHS = tl.constexpr(_ROW["lengths"])
S_COUNTED = tl.constexpr(_ROW["counted"])
S_MASK_LENGTHS = tl.constexpr(_ROW["mask_lengths"])
S_SEQ_LP = tl.constexpr(_ROW["seq_logprobs"])
S_SEQ_REF = tl.constexpr(_ROW["seq_ref_logprobs"])
S_DPS = tl.constexpr(_ROW["dper_seq_ddelta"])

# Tiling: a row of T <= 2048 tokens is one block (the B = 16, T = 1024 training shape is one iteration, 4 warps,
# 8 elements per thread per input); longer rows loop. The kernels are latency-bound at training shapes (a few
# KiB per row), so the block only needs to keep enough loads in flight; tune with the `block_t` argument.
MAX_BLOCK_T = 2048


def block_and_warps(n_tokens: int, block_t: int | None = None) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)``: the next power of two of ``T`` in ``[16, MAX_BLOCK_T]`` unless given, 8 tokens
    per thread (1-8 warps)."""
    block = block_t or min(MAX_BLOCK_T, max(16, triton.next_power_of_2(max(n_tokens, 1))))
    return block, max(1, min(8, block // 256))


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without cancellation: Taylor to ``x^11 / 11!`` for ``|x| < 1`` (truncation < 3e-9)."""
    small = tl.abs(x) < 1.0  # NaN: False, takes the exp branch and stays NaN
    xs = tl.where(small, x, 0.0)
    p = xs * (1.0 / 39916800.0) + 1.0 / 3628800.0
    p = p * xs + 1.0 / 362880.0
    p = p * xs + 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    p = p * xs + 1.0
    return tl.where(small, xs * p, tl.exp(tl.where(small, 0.0, x)) - 1.0)


@triton.jit
def _expm1_minus_x(x):
    """``exp(x) - 1 - x`` without cancellation: ``x^2 sum_k x^k / (k + 2)!`` for ``|x| < 1``."""
    small = tl.abs(x) < 1.0
    xs = tl.where(small, x, 0.0)
    p = xs * (1.0 / 479001600.0) + 1.0 / 39916800.0
    p = p * xs + 1.0 / 3628800.0
    p = p * xs + 1.0 / 362880.0
    p = p * xs + 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    return tl.where(small, xs * xs * p, _expm1(x) - x)


@triton.jit
def _penalty(d, linex_a, linex_a2, huber_k, PENALTY: tl.constexpr):
    """``(g(d), g'(d))`` of the penalty (see ``flowloss.penalties``); NaN in, NaN out."""
    if PENALTY == 0:  # d^2
        g = d * d
        dg = d + d
    elif PENALTY == 1:  # 2 (cosh d - 1) = E^2 / (E + 1) and 2 sinh|d| = E + E / (E + 1), E = expm1(|d|)
        e = _expm1(tl.abs(d))
        e_safe = tl.where(e < 1e30, e, 1e30)  # E / (E + 1) -> 1, not inf / inf, when E overflows
        ratio = e_safe / (e_safe + 1.0)
        g = e * ratio
        dg = tl.where(d < 0.0, -(e + ratio), e + ratio)
    elif PENALTY == 2:  # 2 (expm1(a d) - a d) / a^2, derivative 2 expm1(a d) / a
        x = linex_a * d
        g = 2.0 * _expm1_minus_x(x) / linex_a2
        dg = 2.0 * _expm1(x) / linex_a
    else:  # d^2 inside [-k, k], k (2 |d| - k) outside; derivative 2 d, 2 k sign(d)
        ad = tl.abs(d)
        inside = ad <= huber_k  # NaN: outside, stays NaN through d / |d|
        g = tl.where(inside, d * d, huber_k * (2.0 * ad - huber_k))
        dg = tl.where(inside, d + d, 2.0 * huber_k * (d / tl.where(inside, 1.0, ad)))
    return g, dg


@triton.jit
def _tb_forward_kernel(
    lp_ptr,  # [B, T] fp16/bf16/fp32, row stride stride_lp, token stride 1
    ref_ptr,  # [B, T]
    old_ptr,  # [B, T] (unused unless HAS_OLD)
    ro_ptr,  # [B, T] (unused unless HAS_ROLLOUT)
    mask_ptr,  # [B, T] bool (or any dtype, read as != 0)
    rewards_ptr,  # [B], stride stride_r
    log_z_ptr,  # [B], stride stride_z
    per_seq_ptr,  # [B] fp32 out
    stats_ptr,  # [NSTATS, B] fp32 out
    n_rows,
    n_tokens,
    stride_lp,
    stride_ref,
    stride_old,
    stride_ro,
    stride_mask,
    stride_r,
    stride_z,
    beta,  # fp32
    clip_lo,  # fp32: log1p(-eps_low)
    clip_hi,  # fp32: log1p(eps_high)
    log_cap,  # fp32: log(max_weight) ("sequence_capped") or 20 ("sequence")
    log_tis_cap,  # fp32: log(tis_cap)
    linex_a,
    linex_a2,  # fp32: a * a
    huber_k,
    MODE: tl.constexpr,  # MODE_IDS
    PENALTY: tl.constexpr,  # PENALTY_IDS
    HAS_OLD: tl.constexpr,  # read old (a weight mode other than "none", the token clip mask, or TIS)
    HAS_ROLLOUT: tl.constexpr,
    TOKEN_CLIP: tl.constexpr,
    LENGTH_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r = tl.load(rewards_ptr + row * stride_r).to(tl.float32)
    z = tl.load(log_z_ptr + row * stride_z).to(tl.float32)
    lp_row = lp_ptr + row * stride_lp
    ref_row = ref_ptr + row * stride_ref
    old_row = old_ptr + row * stride_old
    ro_row = ro_ptr + row * stride_ro
    mask_row = mask_ptr + row * stride_mask
    # Token clip mask as two per-row thresholds: drop rho > hi when r > 0, rho < lo when r < 0 (NaN r: none).
    drop_above = tl.where(r > 0.0, clip_hi, float("inf"))
    drop_below = tl.where(r < 0.0, clip_lo, float("-inf"))

    # Per-lane partial sums, reduced once after the loop.
    acc_diff = tl.zeros([BLOCK_T], tl.float32)  # lp - ref: the residual's sum (one rounding per token)
    acc_lp = tl.zeros([BLOCK_T], tl.float32)  # diagnostics only
    acc_ref = tl.zeros([BLOCK_T], tl.float32)
    acc_rho = tl.zeros([BLOCK_T], tl.float32)
    acc_tis = tl.zeros([BLOCK_T], tl.float32)
    n_kept = tl.zeros([BLOCK_T], tl.int32)
    n_mask = tl.zeros([BLOCK_T], tl.int32)
    offs = tl.arange(0, BLOCK_T)
    for start in range(0, n_tokens, BLOCK_T):
        cols = start + offs
        in_row = cols < n_tokens
        m = tl.load(mask_row + cols, mask=in_row, other=0) != 0
        # Loads are bounded by the row only (so they vectorize); masked entries are selected away at once.
        lp = tl.where(m, tl.load(lp_row + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
        ref = tl.where(m, tl.load(ref_row + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
        kept = m
        if HAS_OLD:
            old = tl.where(m, tl.load(old_row + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
            rho = lp - old
            if TOKEN_CLIP:
                # NaN or infinite rho: kept, as in PyTorch (dropping it would hide a bad log-prob)
                outside = ((rho > drop_above) | (rho < drop_below)) & (tl.abs(rho) < float("inf"))
                kept = m & ~outside
            acc_rho += tl.where(kept, rho, 0.0)
            if HAS_ROLLOUT:
                ro = tl.where(m, tl.load(ro_row + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
                acc_tis += tl.where(kept, old - ro, 0.0)
        acc_diff += tl.where(kept, lp - ref, 0.0)
        acc_lp += tl.where(kept, lp, 0.0)
        acc_ref += tl.where(kept, ref, 0.0)
        n_kept += kept.to(tl.int32)
        n_mask += m.to(tl.int32)

    length = tl.sum(n_kept, axis=0).to(tl.float32)
    mask_length = tl.sum(n_mask, axis=0).to(tl.float32)
    denominator = tl.maximum(length, 1.0)
    diff = tl.sum(acc_diff, axis=0)
    seq_lp = tl.sum(acc_lp, axis=0)
    seq_ref = tl.sum(acc_ref, axis=0)
    if LENGTH_NORM:
        diff = diff / denominator
        seq_lp = seq_lp / denominator
        seq_ref = seq_ref / denominator
    delta = (z + diff) - beta * r

    # Importance weight in log space; clamps as selects so that NaN stays NaN.
    log_w = tl.zeros((), tl.float32)
    clipped = tl.zeros((), tl.float32)
    low = tl.zeros((), tl.int1)
    high = tl.zeros((), tl.int1)
    if MODE != 0:
        log_w = tl.sum(acc_rho, axis=0)
        if MODE == 4:
            log_w = log_w / denominator
        if (MODE == 1) or (MODE == 4):
            low = log_w < clip_lo
            high = log_w > clip_hi
            clipped = tl.where(low, clip_lo, tl.where(high, clip_hi, log_w))
        else:
            high = log_w > log_cap
            clipped = tl.where(high, log_cap, log_w)
        # An infinite log-ratio (old log-prob +-inf at a kept token) would be clipped to a finite weight: NaN.
        clipped = tl.where(tl.abs(log_w) < float("inf"), clipped, float("nan"))
    if HAS_ROLLOUT:
        log_tis = tl.sum(acc_tis, axis=0)
        if MODE == 4:
            log_tis = log_tis / denominator
        # pi_rollout = 0 (+inf here) truncates to exactly log tis_cap; a rollout log-prob of +inf (-inf) is NaN.
        truncated = tl.where(log_tis > log_tis_cap, log_tis_cap, log_tis)
        clipped += tl.where(log_tis > float("-inf"), truncated, float("nan"))
    w = tl.full((), 1.0, tl.float32)  # exactly 1 without a weight
    if (MODE != 0) or HAS_ROLLOUT:
        w = tl.exp(clipped)

    g, dg = _penalty(delta, linex_a, linex_a2, huber_k, PENALTY)
    live = length > 0.0
    tl.store(per_seq_ptr + row, tl.where(live, w * g, 0.0))
    stats_row = stats_ptr + row
    tl.store(stats_row + S_DELTA * n_rows, delta)
    tl.store(stats_row + S_WEIGHTS * n_rows, w)
    tl.store(stats_row + S_LOG_W * n_rows, log_w)
    tl.store(stats_row + S_LOW * n_rows, low.to(tl.float32))
    tl.store(stats_row + S_HIGH * n_rows, high.to(tl.float32))
    tl.store(stats_row + S_LENGTHS * n_rows, length)
    tl.store(stats_row + S_COUNTED * n_rows, (mask_length > 0.0).to(tl.float32))
    tl.store(stats_row + S_MASK_LENGTHS * n_rows, mask_length)
    tl.store(stats_row + S_SEQ_LP * n_rows, seq_lp)
    tl.store(stats_row + S_SEQ_REF * n_rows, seq_ref)
    tl.store(stats_row + S_DPS * n_rows, tl.where(live, w * dg, 0.0))


@triton.jit
def _tb_backward_kernel(
    grad_ptr,  # [B] upstream d loss / d per_seq, stride stride_g
    stats_ptr,  # [NSTATS, B] fp32 from the forward
    lp_ptr,  # [B, T] (read only with TOKEN_CLIP)
    old_ptr,  # [B, T] (read only with TOKEN_CLIP)
    mask_ptr,  # [B, T]
    rewards_ptr,  # [B] (read only with TOKEN_CLIP)
    dlp_ptr,  # [B, T] out, contiguous, lp's dtype
    dz_ptr,  # [B] out, contiguous, log_z's dtype
    n_rows,
    n_tokens,
    stride_g,
    stride_lp,
    stride_old,
    stride_mask,
    stride_r,
    clip_lo,
    clip_hi,
    TOKEN_CLIP: tl.constexpr,
    LENGTH_NORM: tl.constexpr,
    WRITE_DLP: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    length = tl.load(stats_ptr + S_LENGTHS * n_rows + row)
    dps = tl.load(stats_ptr + S_DPS * n_rows + row)
    u = tl.load(grad_ptr + row * stride_g).to(tl.float32)
    dz = tl.where(length > 0.0, u * dps, 0.0)  # a row with no kept token is the constant 0
    if WRITE_DZ:
        tl.store(dz_ptr + row, dz.to(dz_ptr.dtype.element_ty))
    if WRITE_DLP:
        per_token = dz
        if LENGTH_NORM:
            per_token = dz / tl.maximum(length, 1.0)
        drop_above = float("inf")
        drop_below = float("-inf")
        if TOKEN_CLIP:
            r = tl.load(rewards_ptr + row * stride_r).to(tl.float32)
            drop_above = tl.where(r > 0.0, clip_hi, float("inf"))
            drop_below = tl.where(r < 0.0, clip_lo, float("-inf"))
        mask_row = mask_ptr + row * stride_mask
        lp_row = lp_ptr + row * stride_lp
        old_row = old_ptr + row * stride_old
        dlp_row = dlp_ptr + row * n_tokens
        offs = tl.arange(0, BLOCK_T)
        for start in range(0, n_tokens, BLOCK_T):
            cols = start + offs
            in_row = cols < n_tokens
            kept = tl.load(mask_row + cols, mask=in_row, other=0) != 0
            if TOKEN_CLIP:  # recompute the forward's decision from the same fp32 values
                lp = tl.where(kept, tl.load(lp_row + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
                old = tl.where(kept, tl.load(old_row + cols, mask=in_row, other=0.0).to(tl.float32), 0.0)
                rho = lp - old
                outside = ((rho > drop_above) | (rho < drop_below)) & (tl.abs(rho) < float("inf"))
                kept = kept & ~outside
            out = tl.where(kept, per_token, 0.0)
            tl.store(dlp_row + cols, out.to(dlp_ptr.dtype.element_ty), mask=in_row)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its token dimension has stride 1 (or one token), else a contiguous copy."""
    return x if (x.shape[1] <= 1 or x.stride(1) == 1) else x.contiguous()


def tb_forward(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    *,
    mode: str,
    eps_low: float,
    eps_high: float,
    max_weight: float,
    tis_cap: float,
    token_clip_mask: bool,
    length_normalization: bool,
    penalty: str,
    linex_alpha: float,
    huber_delta: float,
    beta: float,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; no validation, no autograd (see ``flowloss.ops.fused_tb``).

    ``[B, T]`` inputs of any row stride (a token stride other than 1 is copied first), ``[B]`` rewards and
    ``log_z`` of any stride. ``old_logprobs`` is needed for a weight mode other than ``"none"``, the token clip
    mask, or ``rollout_logprobs``. Returns fp32 ``(per_seq [B], stats [NSTATS, B])`` (rows: ``STAT_ROWS``).
    """
    n_rows, n_tokens = logprobs.shape
    device = logprobs.device
    per_seq = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty(NSTATS, n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return per_seq, stats
    has_rollout = rollout_logprobs is not None
    has_old = old_logprobs is not None and (mode != "none" or token_clip_mask or has_rollout)
    lp, ref, m = _token_major(logprobs), _token_major(ref_logprobs), _token_major(mask)
    old = _token_major(old_logprobs) if has_old else lp  # type: ignore[arg-type]
    ro = _token_major(rollout_logprobs) if has_rollout else lp  # type: ignore[arg-type]
    log_cap = math.log(max_weight) if mode == "sequence_capped" else SEQUENCE_LOG_WEIGHT_LIMIT
    block, warps = block_and_warps(n_tokens, block_t)
    with launch.on_device(logprobs):
        _tb_forward_kernel[(n_rows,)](
            lp,
            ref,
            old,
            ro,
            m,
            rewards,
            log_z,
            per_seq,
            stats,
            n_rows,
            n_tokens,
            lp.stride(0),
            ref.stride(0),
            old.stride(0),
            ro.stride(0),
            m.stride(0),
            rewards.stride(0),
            log_z.stride(0),
            float(beta),
            math.log1p(-eps_low),
            math.log1p(eps_high),
            log_cap,
            math.log(tis_cap),
            float(linex_alpha),
            float(linex_alpha) * float(linex_alpha),
            float(huber_delta),
            MODE=MODE_IDS[mode],
            PENALTY=PENALTY_IDS[penalty],
            HAS_OLD=has_old,
            HAS_ROLLOUT=has_rollout and has_old,
            TOKEN_CLIP=token_clip_mask and has_old,
            LENGTH_NORM=length_normalization,
            BLOCK_T=block,
            num_warps=warps,
        )
    return per_seq, stats


def tb_backward(
    grad_per_seq: torch.Tensor,
    stats: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    log_z_dtype: torch.dtype,
    *,
    eps_low: float,
    eps_high: float,
    token_clip_mask: bool,
    length_normalization: bool,
    need_logprobs: bool = True,
    need_log_z: bool = True,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(d logprobs [B, T] in logprobs' dtype, d log_z [B] in log_z_dtype)``,
    both contiguous; an output not needed is an empty ``[0]`` tensor. ``stats`` is `tb_forward`'s."""
    n_rows, n_tokens = logprobs.shape
    device = logprobs.device
    dlp = torch.empty((n_rows, n_tokens) if need_logprobs else (0,), dtype=logprobs.dtype, device=device)
    dz = torch.empty(n_rows if need_log_z else 0, dtype=log_z_dtype, device=device)
    if n_rows == 0 or not (need_logprobs or need_log_z):
        return dlp, dz
    clip = token_clip_mask and old_logprobs is not None
    m = _token_major(mask)
    lp = _token_major(logprobs) if clip else m
    old = _token_major(old_logprobs) if clip else m  # type: ignore[arg-type]
    block, warps = block_and_warps(n_tokens, block_t)
    with launch.on_device(logprobs):
        _tb_backward_kernel[(n_rows,)](
            grad_per_seq,
            stats,
            lp,
            old,
            m,
            rewards,
            dlp if need_logprobs else stats,
            dz if need_log_z else stats,
            n_rows,
            n_tokens,
            grad_per_seq.stride(0),
            lp.stride(0),
            old.stride(0),
            m.stride(0),
            rewards.stride(0),
            math.log1p(-eps_low),
            math.log1p(eps_high),
            TOKEN_CLIP=clip,
            LENGTH_NORM=length_normalization,
            WRITE_DLP=need_logprobs,
            WRITE_DZ=need_log_z,
            BLOCK_T=block,
            num_warps=warps,
        )
    return dlp, dz

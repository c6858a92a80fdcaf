"""The chunked PyTorch implementations (no autograd here: `flowloss.ops.library` wires them).

Logits path, ``logits [N, V]`` or a non-flattenable ``[B, T, V]`` view, labels ``y [N]`` (negative = skipped)::

    forward:  logp_n = z_n[y_n] - logsumexp(z_n), H_n (optional), z = logits / T, one row block at a time
    backward: dlogits = [g (onehot(y) - p) - g_H p (log p + H)] / T, recomputed block by block

Extra memory: one block's fp32 working set (``DEFAULT_CHUNK_BYTES``), plus ``dlogits`` in backward (or nothing
with the in-place backward, which writes the gradient over the logits).

lm_head path, ``hidden [N, H]``, ``W [V, H]``, bias ``b [V]``: each block's logits ``z = (h W^T + b) / T`` exist
only while the block is processed; backward recomputes them (8 N H V FLOPs in all instead of 6) and forms
``dh = dz W``, ``dW += dz^T h``, ``db += sum_rows dz``. On CPU the math runs in float32 (float64 stays float64)
and only the kept rows are projected (their indices are read on the host, free on CPU). On CUDA, half-precision
inputs use tensor-core GEMMs (fp32 accumulation, fp32 logits when ``torch.mm(..., out_dtype=)`` exists) with no
float32 copy of ``W``; every row is projected (skipped rows are zeroed first), because counting the kept rows
would synchronise; ``dW`` accumulates in ``W``'s dtype block by block.
"""

from __future__ import annotations

import torch

from flowloss.ops._block_math import block_backward, block_forward, compute_dtype_for, scaled
from flowloss.ops._rows import flat_view, pick, row_blocks

# Bytes of fp32 working set per row block on the logits path. Backward holds 2-3 block-sized fp32 temporaries,
# forward 1-2; at 4 MiB a block stays inside this class of CPU's last-level cache while the logits stream
# through. Measured on a 2-core EPYC, N=2048, V=151936 fp32, forward+backward medians: 0.6 MiB blocks 978 ms,
# 1.2 MiB 635 ms, 3.5 MiB (this default) 584 ms, 16 MiB 733 ms, 64 MiB 1250 ms. A block is at least one row.
DEFAULT_CHUNK_BYTES = 4 * 2**20
# lm_head path: each block is a matmul, which wants many rows. CPU: 32 MiB of fp32 logits, at least 64 rows
# (55 rows at V=151936 would starve the GEMM). GPU: 512 MiB (~880 rows at V=151936), enough for full speed.
DEFAULT_FUSED_CHUNK_BYTES = 32 * 2**20
DEFAULT_FUSED_CHUNK_BYTES_GPU = 512 * 2**20
MIN_FUSED_CHUNK_ROWS = 64


def default_chunk_rows(vocab: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, itemsize: int = 4) -> int:
    """Rows per block so that one ``[rows, vocab]`` block of ``itemsize``-byte floats is ~``chunk_bytes``."""
    return max(1, chunk_bytes // max(1, vocab * itemsize))


def default_fused_chunk_rows(vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows per lm_head block: ~32 MiB (CPU) or ~512 MiB (GPU) of fp32 logits, at least 64 rows."""
    on_cpu = torch.device(device).type == "cpu"
    budget = DEFAULT_FUSED_CHUNK_BYTES if on_cpu else DEFAULT_FUSED_CHUNK_BYTES_GPU
    return max(MIN_FUSED_CHUNK_ROWS, budget // (4 * max(1, vocab)))


def _host_kept(labels: torch.Tensor) -> list[bool] | None:
    """Kept-row flags on the host for CPU tensors (free there); None elsewhere (no synchronisation)."""
    return (labels >= 0).tolist() if labels.device.type == "cpu" else None


# ------------------------------------------------------------------------------------------------------
# Logits path


def logits_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    return_entropy: bool,
    chunk_rows: int,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N] or [0])`` in the compute dtype (fp32; fp64 for fp64 logits)."""
    cdtype = compute_dtype_for(logits.dtype)
    n = labels.shape[0]
    flat = flat_view(logits)
    logp = logits.new_zeros(n, dtype=cdtype)
    entropy = logits.new_zeros(n if return_entropy else 0, dtype=cdtype)
    narrow = vocab_size < logits.shape[-1]
    for lo, hi, index, kept in row_blocks(logits.shape, flat is not None, chunk_rows, _host_kept(labels)):
        if not kept:  # skipped rows are never read; their outputs stay 0
            continue
        block = pick(logits, flat, index)
        z = scaled(block[:, :vocab_size] if narrow else block, temperature, cdtype)
        y = labels[lo:hi]
        lp, h = block_forward(z, y.clamp_min(0), y >= 0, return_entropy=return_entropy)
        logp[lo:hi] = lp
        if h is not None:
            entropy[lo:hi] = h
    return logp, entropy


def logits_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    chunk_rows: int,
    vocab_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``dlogits`` into ``out`` (a buffer shaped like ``logits``, or ``logits`` itself for in place)."""
    cdtype = compute_dtype_for(logits.dtype)
    flat, gflat = flat_view(logits), flat_view(out)
    flat_ok = flat is not None and gflat is not None
    if not flat_ok:
        flat = gflat = None
    g_entropy = grad_entropy if entropy.numel() > 0 else None  # the entropy term needs both
    narrow = vocab_size < logits.shape[-1]
    for lo, hi, index, kept in row_blocks(logits.shape, flat_ok, chunk_rows, _host_kept(labels)):
        target = pick(out, gflat, index)
        if not kept:
            target.zero_()
            continue
        block = pick(logits, flat, index)
        z = scaled(block[:, :vocab_size] if narrow else block, temperature, cdtype)
        y = labels[lo:hi]
        block_backward(
            z,
            y.clamp_min(0),
            y >= 0,
            grad_logp[lo:hi] if grad_logp is not None else None,
            entropy[lo:hi] if g_entropy is not None else None,
            g_entropy[lo:hi] if g_entropy is not None else None,
            temperature=temperature,
            out=target[:, :vocab_size] if narrow else target,
        )
        if narrow:
            target[:, vocab_size:] = 0
    return out


# ------------------------------------------------------------------------------------------------------
# lm_head path


def _gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype the GEMMs run in: the inputs' half dtype on CUDA (tensor cores), else the compute dtype."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.is_cuda and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return compute_dtype_for(dtype)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``cdtype``: for half inputs on CUDA, fp32 output straight from the GEMM when supported."""
    if a.dtype == cdtype:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=cdtype)
    except (TypeError, RuntimeError, NotImplementedError):  # torch without aten::mm.dtype for this backend
        return (a @ b).to(cdtype)


def _block_logits(h, weight_t, bias, temperature, cdtype):
    z = _mm_fp32(h, weight_t, cdtype)
    if bias is not None:
        z.add_(bias)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _kept_rows(hidden, labels):
    """``(hidden rows, labels, index or None)``: on CPU only the kept rows (host-side index, free there)."""
    if hidden.device.type == "cpu":
        kept = labels >= 0
        if not bool(kept.all()):
            index = kept.nonzero().squeeze(1)
            return hidden.index_select(0, index), labels[index], index
    return hidden, labels, None


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    return_entropy: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N] or [0])``; ``hidden [N, H]``, ``weight [V, H]``, labels negative = skipped."""
    cdtype = compute_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    gdtype = _gemm_dtype(hidden, weight)
    n = labels.shape[0]
    logp = hidden.new_zeros(n, dtype=cdtype)
    entropy = hidden.new_zeros(n if return_entropy else 0, dtype=cdtype)
    rows_h, rows_y, index = _kept_rows(hidden, labels)
    weight_t = weight.to(gdtype).t()
    bias_c = bias.to(cdtype) if bias is not None else None
    out_lp = logp if index is None else logp.new_zeros(rows_y.shape[0])
    out_h = entropy if index is None else entropy.new_zeros(rows_y.shape[0] if return_entropy else 0)
    for lo in range(0, rows_y.shape[0], chunk_rows):
        hi = min(rows_y.shape[0], lo + chunk_rows)
        y = rows_y[lo:hi]
        kept = y >= 0
        h = torch.where(kept.unsqueeze(1), rows_h[lo:hi], rows_h.new_zeros(())).to(gdtype)
        z = _block_logits(h, weight_t, bias_c, temperature, cdtype)
        lp, ent = block_forward(z, y.clamp_min(0), kept, return_entropy=return_entropy)
        out_lp[lo:hi] = lp
        if ent is not None:
            out_h[lo:hi] = ent
    if index is not None:
        logp.index_copy_(0, index, out_lp)
        if return_entropy:
            entropy.index_copy_(0, index, out_h)
    return logp, entropy


def linear_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(d hidden [N, H], d W [V, H], d bias [V])`` (None where not needed), in the inputs' dtypes."""
    cdtype = compute_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    gdtype = _gemm_dtype(hidden, weight)
    weight_g = weight.to(gdtype)
    bias_c = bias.to(cdtype) if bias is not None else None
    rows_h, rows_y, index = _kept_rows(hidden, labels)
    pick_rows = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
    g_lp = pick_rows(grad_logp) if grad_logp is not None else None
    g_h = pick_rows(grad_entropy) if grad_entropy is not None and entropy.numel() > 0 else None
    ent = pick_rows(entropy) if g_h is not None else None
    grad_rows = torch.zeros_like(rows_h) if need_hidden else None
    # dW accumulates in fp32 where the GEMMs do (CPU), in W's dtype on CUDA (no fp32 copy of a V x H matrix).
    grad_w = torch.zeros(weight.shape, dtype=gdtype, device=weight.device) if need_weight else None
    grad_b = torch.zeros(weight.shape[0], dtype=cdtype, device=weight.device) if need_bias else None
    for lo in range(0, rows_y.shape[0], chunk_rows):
        hi = min(rows_y.shape[0], lo + chunk_rows)
        y = rows_y[lo:hi]
        kept = y >= 0
        h = torch.where(kept.unsqueeze(1), rows_h[lo:hi], rows_h.new_zeros(())).to(gdtype)
        z = _block_logits(h, weight_g.t(), bias_c, temperature, cdtype)
        dz = block_backward(
            z,
            y.clamp_min(0),
            kept,
            g_lp[lo:hi] if g_lp is not None else None,
            ent[lo:hi] if ent is not None else None,
            g_h[lo:hi] if g_h is not None else None,
            temperature=temperature,
            out=z,
        )
        if grad_b is not None:
            grad_b += dz.sum(dim=0)
        dz_g = dz.to(gdtype)
        if grad_rows is not None:
            grad_rows[lo:hi] = dz_g @ weight_g
        if grad_w is not None:
            grad_w.addmm_(dz_g.t(), h)
    grad_h = None
    if grad_rows is not None:
        grad_h = grad_rows if index is None else torch.zeros_like(hidden).index_copy_(0, index, grad_rows)
    return (
        grad_h,
        grad_w.to(weight.dtype) if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None and bias is not None else grad_b,
    )

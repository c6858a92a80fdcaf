"""Per-token log-probs ``log pi(y_t | x, y_<t)`` (and entropies) from logits, without an fp32 ``[N, V]`` copy.

For row ``n`` with logits ``z_n [V]``, label ``y_n`` and temperature ``T``::

    s_n       = float32(z_n) / T                       (float64 stays float64 on the chunked path)
    lse_n     = log sum_v exp(s_nv)
    logp_n    = s_n[y_n] - lse_n                          -> returned, float32, shaped like ``labels``
    H_n       = -sum_v p_nv log p_nv,  p_nv = exp(s_nv - lse_n)   -> returned when ``return_entropy``

and the gradients ``d logp_n / d z_nv = (1[v = y_n] - p_nv) / T``,
``d H_n / d z_nv = -p_nv (log p_nv + H_n) / T``.

``log_softmax(logits.float(), -1).gather(...)`` materializes an fp32 ``[N, V]`` tensor (1.2 GB at N=2048,
V=151936) and autograd keeps it for backward, then builds two more ``[N, V]`` tensors in backward. The chunked
path here is a ``torch.autograd.Function`` that loops over blocks of rows, each through PyTorch's fused
(log-)softmax kernel: forward keeps only ``H [N]`` (when asked), the labels and a reference to the logits;
backward recomputes ``p = softmax`` one block at a time and writes
``dlogits`` straight into a single ``[.., V]`` buffer of the logits' dtype, or into the logits themselves
with ``inplace_backward=True``. Its extra memory is one block's fp32 working set (see
`DEFAULT_CHUNK_BYTES`), plus ``dlogits`` in backward, which any implementation must return.

Dispatch (``impl=``): ``"auto"`` picks the fused Triton kernels (``flowloss.ops.triton_logprobs``) for CUDA
logits (not float64) when triton is importable, else ``"chunked"``; ``"reference"`` is the float64 oracle
(`flowloss.reference.token_logprobs`, slow, for tests).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from flowloss._validation import (
    as_bool_mask,
    describe,
    require_choice,
    require_float,
    require_same_device,
    require_tensor,
)

Impl = Literal["auto", "triton", "chunked", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "chunked", "reference")

# Default ignore label: PyTorch's `cross_entropy(ignore_index=-100)` and the Hugging Face convention.
DEFAULT_IGNORE_INDEX = -100

# Bytes of fp32 working set per row block. Backward holds 2-3 block-sized fp32 temporaries (p, or log p and p),
# forward 1-2 (log p, and the scaled copy when T != 1 or the input is half precision); at 4 MiB a block
# stays inside this class of CPU's last-level cache (32 MiB L3 shared, 2 MiB L2 per core) while the logits
# stream through. Measured on a 2-core EPYC, N=2048, V=151936 fp32, forward+backward medians: 0.6 MiB blocks
# 978 ms, 1.2 MiB 635 ms, 3.5 MiB (this default) 584 ms, 16 MiB 733 ms, 64 MiB 1250 ms. A block is never
# smaller than one row, so with V=256k it is one ~1 MiB row.
DEFAULT_CHUNK_BYTES = 4 * 2**20


def default_chunk_rows(vocab: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, itemsize: int = 4) -> int:
    """Rows per block so that one ``[rows, vocab]`` block of ``itemsize``-byte floats is ~``chunk_bytes``."""
    return max(1, chunk_bytes // max(1, vocab * itemsize))


# --------------------------------------------------------------------------------------------------------
# Row blocks: 2-D views of the logits (and of the gradient buffer) that never copy the logits.


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[N, V]`` without a copy, or None when its strides do not allow it."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _segments(valid: torch.Tensor | None, n: int, skip_at_least: int) -> list[tuple[int, int, bool]]:
    """Split flat rows ``0:n`` into ``(lo, hi, kept)`` runs: ``kept=False`` for runs of at least
    ``skip_at_least`` consecutive ignored/masked rows (never read), ``kept=True`` for the rest (shorter ignored
    runs inside them are computed and zeroed by ``where``, which keeps blocks full)."""
    if valid is None or n == 0:
        return [(0, n, True)]
    flags = valid.tolist()
    if all(flags):
        return [(0, n, True)]
    out: list[tuple[int, int, bool]] = []
    lo = 0
    i = 0
    while i < n:
        if flags[i]:
            i += 1
            continue
        j = i
        while j < n and not flags[j]:
            j += 1
        if j - i >= skip_at_least:
            if i > lo:
                out.append((lo, i, True))
            out.append((i, j, False))
            lo = j
        i = j
    if lo < n:
        out.append((lo, n, True))
    return out


def _row_blocks(
    shape: torch.Size, flat_ok: bool, rows: int, valid: torch.Tensor | None = None
) -> Iterator[tuple[int, int, tuple, bool]]:
    """``(lo, hi, index, kept)``: flat rows ``lo:hi`` are ``t[index]`` (2-D) for ``t`` of ``shape``.

    Kept runs come in blocks of at most ``rows`` rows; a long run of rows that ``valid`` (a CPU bool ``[N]``)
    marks as skipped comes as ``kept=False`` blocks, which forward never reads and backward only zeroes. When
    ``t`` cannot be flattened as a view (``logits[:, :-1]`` of a ``[B, T+1, V]`` tensor), blocks stay inside
    one sequence: ``index = (b, slice(t0, t1))``.
    """
    n = shape[0] if len(shape) == 2 else shape[0] * shape[1]
    seq = None if (flat_ok or len(shape) == 2) else shape[1]
    for lo, hi, kept in _segments(valid, n, skip_at_least=max(1, rows // 2)):
        step = rows if kept else hi - lo
        start = lo
        while start < hi:
            stop = min(hi, start + step)
            if seq is None:
                index: tuple = (slice(start, stop),)
            else:
                b = start // seq
                stop = min(stop, (b + 1) * seq)
                index = (b, slice(start - b * seq, stop - b * seq))
            yield start, stop, index, kept
            start = stop


def _index(t: torch.Tensor, flat: torch.Tensor | None, index: tuple) -> torch.Tensor:
    return (flat if flat is not None else t)[index]


# --------------------------------------------------------------------------------------------------------
# One block's math, shared with the fused-linear variant (flowloss.ops.fused_linear).


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(x: torch.Tensor, temperature: float, cdtype: torch.dtype) -> torch.Tensor:
    """``x.to(cdtype) / T``: upcast first, then divide (a view of ``x`` when nothing is to be done)."""
    z = x.to(cdtype)
    return z / temperature if temperature != 1.0 else z


def block_forward(
    z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, *, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z [r, V]`` (already upcast and divided by T) -> ``(logp [r], H [r] | None)``.

    Uses ``torch.log_softmax`` on the block: its fused CPU kernel is ~2x faster than ``logsumexp`` or an
    elementwise ``exp(z - lse)``, and the block-sized output stays in cache. ``labels`` must be in ``[0, V)``
    everywhere (skipped rows carry any in-range label); rows with ``valid == False`` give ``logp = H = 0``.
    """
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    entropy = None
    if want_entropy:
        p = log_p.exp()
        # 0 log 0 = 0 where p = 0 (a -inf logit); a NaN/+inf logit stays NaN (not hidden by a blanket nan_to_num)
        entropy = -(p * log_p).masked_fill_(p == 0, 0.0).sum(dim=-1)
    dead = _all_neg_inf_rows(z, logp)
    if dead is not None:  # no distribution: log-prob -inf and entropy 0, as the Triton kernel gives
        logp = logp.masked_fill(dead, float("-inf"))
        if entropy is not None:
            entropy = entropy.masked_fill(dead, 0.0)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = torch.where(valid, logp, zero)
    if entropy is not None:
        entropy = torch.where(valid, entropy, zero)
    return logp, entropy


def _all_neg_inf_rows(z: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor | None:
    """``[r]`` bool of rows whose logits are all ``-inf``, or None when there are none.

    Such rows make ``log_softmax``/``softmax`` NaN; ``row_values`` (any per-row result of the block) is NaN on
    them, so the common case costs one ``isnan`` over ``[r]`` and never re-reads the block.
    """
    nan_rows = torch.isnan(row_values)
    if not bool(nan_rows.any()):
        return None
    dead = torch.zeros_like(nan_rows)
    dead[nan_rows] = z[nan_rows].amax(dim=-1) == float("-inf")
    return dead if bool(dead.any()) else None


def block_backward(
    z: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    grad_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``dL/dz_raw [r, V]`` for one block into ``out`` (any float dtype), where ``z = z_raw / T``.

    ``dz = -[p (g + g_H (log p + H)) - g onehot(y)] / T``, recomputing ``p = softmax(z)`` with the fused
    kernel (no saved state but ``H``); zero on rows with ``valid == False``. ``out`` may alias ``z`` or the
    raw logits (``inplace_backward``): they are read in full before ``out`` is written. ``g``/``g_H`` of
    ``None`` count as zero.
    """
    rows = z.shape[0]
    g = grad_logp if grad_logp is not None else torch.zeros(rows, dtype=z.dtype, device=z.device)
    g = torch.where(valid, g.to(z.dtype), 0.0)
    if grad_entropy is not None and entropy is not None:
        g_h = torch.where(valid, grad_entropy.to(z.dtype), 0.0)
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        coef = log_p.add_(entropy.unsqueeze(1)).mul_(g_h.unsqueeze(1)).add_(g.unsqueeze(1)).mul_(p)
        coef.masked_fill_(p == 0, 0.0)  # p = 0 and log p = -inf: the limit is 0 (NaN input stays NaN)
    else:
        coef = torch.softmax(z, dim=-1).mul_(g.unsqueeze(1))
    dead = _all_neg_inf_rows(z, coef[:, 0]) if coef.shape[1] else None
    if dead is not None:  # all -inf row: p = 0, only the label's term is left (as in the Triton kernel)
        coef[dead] = 0.0
    arange = torch.arange(rows, device=z.device)
    coef[arange, labels] -= g
    torch.mul(coef, -1.0 / temperature, out=out)
    if not bool(valid.all()):
        # Skipped rows may hold anything (even inf/NaN); their gradient is exactly 0.
        out[~valid] = 0.0
    return out


# --------------------------------------------------------------------------------------------------------
# The chunked CPU path.


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Row-chunked log-softmax-gather (+ entropy) with an O(N) saved state; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, labels, valid, temperature, want_entropy, chunk_rows, inplace_backward):
        cdtype = compute_dtype_for(logits.dtype)
        n = labels.shape[0]
        flat = _flat_view(logits)
        logp = torch.zeros(n, dtype=cdtype, device=logits.device)
        entropy = torch.zeros(n if want_entropy else 0, dtype=cdtype, device=logits.device)
        valid_cpu = valid.cpu()
        for lo, hi, index, kept in _row_blocks(logits.shape, flat is not None, chunk_rows, valid_cpu):
            if not kept:  # skipped rows are never read; their outputs stay 0
                continue
            z = _scaled(_index(logits, flat, index), temperature, cdtype)
            lp, h = block_forward(z, labels[lo:hi], valid[lo:hi], want_entropy=want_entropy)
            logp[lo:hi] = lp
            if h is not None:
                entropy[lo:hi] = h
        ctx.save_for_backward(logits, labels, valid, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.inplace_backward = temperature, chunk_rows, inplace_backward
        ctx.want_entropy = want_entropy
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, valid, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        temperature = ctx.temperature
        cdtype = compute_dtype_for(logits.dtype)
        # One [.., V] buffer in the logits' dtype (or the logits themselves), filled block by block.
        grad = logits if ctx.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype,
                                                               device=logits.device)
        flat, gflat = _flat_view(logits), _flat_view(grad)
        flat_ok = flat is not None and gflat is not None
        if not flat_ok:
            flat = gflat = None
        use_entropy = ctx.want_entropy and grad_entropy is not None
        for lo, hi, index, kept in _row_blocks(logits.shape, flat_ok, ctx.chunk_rows, valid.cpu()):
            if not kept:
                _index(grad, gflat, index).zero_()
                continue
            z = _scaled(_index(logits, flat, index), temperature, cdtype)
            block_backward(
                z,
                labels[lo:hi],
                valid[lo:hi],
                grad_logp[lo:hi] if grad_logp is not None else None,
                entropy[lo:hi] if use_entropy else None,
                grad_entropy[lo:hi] if use_entropy else None,
                temperature=temperature,
                out=_index(grad, gflat, index),
            )
        return grad, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------
# Validation and dispatch.


def _check_inputs(logits, labels, mask, temperature, ignore_index, impl, chunk_size) -> torch.Tensor:
    """Validate; return the flat ``[N]`` bool tensor of kept rows (label not ignored and mask set)."""
    require_tensor("logits", logits)
    require_tensor("labels", labels)
    require_float("logits", logits)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`labels` must be an int32/int64 tensor of token ids, got {describe(labels)}")
    if logits.dim() not in (2, 3) or logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            "`logits` must be [B, T, V] with `labels` [B, T], or [N, V] with `labels` [N]; got "
            f"logits {describe(logits)} and labels {describe(labels)}"
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"`logits` must have a vocabulary dimension V >= 1, got {describe(logits)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        0 < temperature < float("inf")
    ):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}")
    require_choice("impl", impl, IMPLS)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be None or an int >= 1 (rows per block), got {chunk_size!r}")
    if mask is not None:
        require_tensor("mask", mask)
    require_same_device([("logits", logits), ("labels", labels), ("mask", mask)])
    return kept_rows(labels, mask, ignore_index=ignore_index, vocab=logits.shape[-1])


def kept_rows(labels: torch.Tensor, mask: torch.Tensor | None, *, ignore_index: int, vocab: int) -> torch.Tensor:
    """Flat ``[N]`` bool: rows whose label is not ``ignore_index`` and whose ``mask`` (if any) is set.

    Refuses a kept label outside ``[0, vocab)`` with the offending position (one host sync).
    """
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & as_bool_mask("mask", mask, "labels", labels)
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"`labels` must be in [0, V={vocab}) or equal to ignore_index={ignore_index} (or be masked out); "
            f"got {int(labels[where])} at position {where} of labels {describe(labels)}"
        )
    return valid.reshape(-1)


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("flowloss.ops.triton_logprobs")
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, logits: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA fp32/bf16/fp16 logits with triton importable, else ``"chunked"``.

    float64 logits stay on the chunked path (the kernels compute in fp32; float64 is for checking).
    """
    if impl == "auto":
        fast = logits.is_cuda and logits.dtype != torch.float64
        return "triton" if fast and _triton_available() else "chunked"
    if impl == "triton" and not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"`impl='triton'` needs CUDA logits (or TRITON_INTERPRET=1 for the interpreter), got "
            f"{describe(logits)}; use impl='chunked' on CPU"
        )
    return impl


def _run_triton(logits, labels_flat, valid, temperature, return_entropy, ignore_index, inplace_backward):
    try:
        module = importlib.import_module("flowloss.ops.triton_logprobs")
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "`impl='triton'` needs triton and flowloss.ops.triton_logprobs; use impl='chunked'"
        ) from err
    # A view when possible; a non-viewable [B, T, V] slice (logits[:, :-1]) goes as is, never copied.
    flat = _flat_view(logits)
    return module.triton_token_logprobs(
        flat if flat is not None else logits,
        labels_flat,
        temperature=float(temperature),
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        mask=valid,
        inplace_backward=inplace_backward,
    )


def _run_reference(logits, labels_flat, valid, temperature, ignore_index):
    from flowloss import reference

    labels_ref = torch.where(valid, labels_flat, torch.full_like(labels_flat, ignore_index))
    logp, entropy = reference.token_logprobs(
        logits.reshape(-1, logits.shape[-1]), labels_ref, temperature=temperature, ignore_index=ignore_index
    )
    out = compute_dtype_for(logits.dtype)
    return logp.to(out), entropy.to(out)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    mask: torch.Tensor | None = None,
    impl: Impl = "auto",
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs ``log softmax(logits / T)[labels]`` (and entropies), differentiable, memory-lean.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, fp16/bf16/fp32/fp64. Never copied or upcast as a whole.
        labels: ``[B, T]`` or ``[N]`` int32/int64 token ids in ``[0, V)`` (or ``ignore_index``).
        temperature: sampling temperature ``T`` (finite, > 0); the logits are divided by it after the
            fp32 upcast. Use the rollout temperature (1.0 for FlowRL's math runs, 0.6 for code).
        return_entropy: also return ``H = -sum_v p_v log p_v`` per token (differentiable).
        ignore_index: label marking positions to skip (default -100, as in ``F.cross_entropy``).
        mask: optional ``[B, T]``/``[N]`` bool (or 0/1) tensor; positions where it is 0 are skipped too.
        impl: ``"auto"`` (Triton on CUDA when available, else chunked), ``"triton"``, ``"chunked"`` (the
            PyTorch row-block path) or ``"reference"`` (float64 oracle, slow).
        chunk_size: rows per block on the chunked path; default `default_chunk_rows` (~4 MiB fp32).
        inplace_backward: write ``dlogits`` into ``logits``' own storage in backward (saves one ``[.., V]``
            buffer). Only when nothing else reads the logits afterwards: autograd's version counter raises if
            another op saved them for its backward.

    Returns:
        ``logprobs`` shaped like ``labels``: float32 (float64 for float64 logits on the chunked and reference
        paths), 0 with zero gradient at skipped positions; ``(logprobs, entropy)`` when ``return_entropy``.
        A kept row whose logits are all ``-inf`` has no distribution: log-prob ``-inf``, entropy 0, gradient
        ``g / T`` on the label (as the Triton kernel).
    """
    valid = _check_inputs(logits, labels, mask, temperature, ignore_index, impl, chunk_size)
    labels_flat = labels.reshape(-1)
    chosen = resolve_impl(impl, logits)
    if chosen == "triton":
        logp, entropy = _run_triton(
            logits, labels_flat, valid, temperature, return_entropy, ignore_index, inplace_backward
        )
    elif chosen == "reference":
        logp, entropy = _run_reference(logits, labels_flat, valid, temperature, ignore_index)
    else:
        safe_labels = torch.where(valid, labels_flat, torch.zeros_like(labels_flat)).long()
        rows = chunk_size if chunk_size is not None else default_chunk_rows(logits.shape[-1])
        logp, entropy = _ChunkedTokenLogprobs.apply(
            logits, safe_labels, valid, float(temperature), bool(return_entropy), rows, bool(inplace_backward)
        )
    logp = logp.reshape(labels.shape)
    if return_entropy:
        return logp, entropy.reshape(labels.shape)
    return logp

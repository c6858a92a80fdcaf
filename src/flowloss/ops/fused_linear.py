"""Token log-probs straight from the last hidden states: ``lm_head`` and log-softmax fused, block by block.

For hidden states ``h [N, H]``, output projection ``W [V, H]`` (optional bias ``b [V]``), labels ``y [N]`` and
temperature ``T``::

    z_n    = (h_n @ W^T + b) / T            in float32 (float64 stays float64), one row block at a time
    logp_n = z_n[y_n] - logsumexp(z_n)           -> float32 [N] (shaped like ``labels``)
    H_n    = -sum_v p_nv log p_nv                 -> when ``return_entropy``

Backward, per block, with ``dz = [g (onehot(y) - p) - g_H p (log p + H)] / T`` recomputed from ``h``, ``W``::

    dh_block  = dz @ W            dW += dz^T @ h_block            db += sum_rows dz

The full ``[N, V]`` logits never exist: forward keeps ``H [N]`` (when asked) besides references to ``h``,
``W`` and ``b``; each block's ``[rows, V]`` logits live only while that block is processed. The price is a
second ``h_block @ W^T`` in backward (8 N H V FLOPs in all instead of 6). Half-precision ``W`` is upcast to a
float32 copy once per forward and once per backward (``V x H`` floats, not ``N x V``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from flowloss._validation import (
    describe,
    require_float,
    require_same_device,
    require_tensor,
)
from flowloss.ops.token_logprobs import (
    DEFAULT_IGNORE_INDEX,
    block_backward,
    block_forward,
    compute_dtype_for,
    kept_rows,
)

# Bytes of one block's fp32 logits. Larger than the logits-path block (4 MiB) because here each block is a
# matmul, which wants many rows to reach full speed: 32 MiB is 55 rows at V=151936, 262 rows at V=32000.
DEFAULT_FUSED_CHUNK_BYTES = 32 * 2**20
# ... but never fewer rows than this, so the matmul stays efficient at large V (64 x 256k x 4 B = 64 MiB).
MIN_FUSED_CHUNK_ROWS = 64


def default_fused_chunk_rows(vocab: int) -> int:
    """Rows per block: ``~DEFAULT_FUSED_CHUNK_BYTES`` of fp32 logits, at least ``MIN_FUSED_CHUNK_ROWS``."""
    return max(MIN_FUSED_CHUNK_ROWS, DEFAULT_FUSED_CHUNK_BYTES // (4 * max(1, vocab)))


def _block_logits(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """``(h @ W^T + b) / T`` for one block, in the dtype of ``weight_t`` (the compute dtype)."""
    z = h.to(weight_t.dtype) @ weight_t
    if bias is not None:
        z.add_(bias)
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _FusedLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, temperature, want_entropy, chunk_rows):
        cdtype = compute_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
        n = hidden.shape[0]
        weight_t = weight.to(cdtype).t()
        bias_c = bias.to(cdtype) if bias is not None else None
        logp = torch.empty(n, dtype=cdtype, device=hidden.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=cdtype, device=hidden.device)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            z = _block_logits(hidden[lo:hi], weight_t, bias_c, temperature)
            lp, h = block_forward(z, labels[lo:hi], valid[lo:hi], want_entropy=want_entropy)
            logp[lo:hi] = lp
            if h is not None:
                entropy[lo:hi] = h
        ctx.save_for_backward(hidden, weight, bias, labels, valid, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.want_entropy = temperature, chunk_rows, want_entropy
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, valid, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return (None,) * 8
        cdtype = compute_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
        weight_c = weight.to(cdtype)
        bias_c = bias.to(cdtype) if bias is not None else None
        n = hidden.shape[0]
        use_entropy = ctx.want_entropy and grad_entropy is not None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight_c) if need_w else None
        grad_b = torch.zeros_like(bias_c) if need_b else None
        for lo in range(0, n, ctx.chunk_rows):
            hi = min(n, lo + ctx.chunk_rows)
            h = hidden[lo:hi]
            z = _block_logits(h, weight_c.t(), bias_c, ctx.temperature)
            dz = block_backward(
                z,
                labels[lo:hi],
                valid[lo:hi],
                grad_logp[lo:hi] if grad_logp is not None else None,
                entropy[lo:hi] if use_entropy else None,
                grad_entropy[lo:hi] if use_entropy else None,
                temperature=ctx.temperature,
                out=z,
            )
            if grad_h is not None:
                grad_h[lo:hi] = dz @ weight_c
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h.to(cdtype))
            if grad_b is not None:
                grad_b += dz.sum(dim=0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _check(hidden, weight, bias, labels, mask, temperature, ignore_index, chunk_size) -> torch.Tensor:
    for name, t in (("hidden", hidden), ("lm_head_weight", weight), ("labels", labels)):
        require_tensor(name, t)
    require_float("hidden", hidden)
    require_float("lm_head_weight", weight)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`labels` must be an int32/int64 tensor of token ids, got {describe(labels)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(
            f"`lm_head_weight` must be [V, H] with V >= 1 (nn.Linear layout), got {describe(weight)}"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"`hidden` must be [..., H] with H = lm_head_weight.shape[1] = {weight.shape[1]}, "
            f"got {describe(hidden)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"`labels` must have the leading shape of `hidden` {tuple(hidden.shape[:-1])}, "
            f"got {describe(labels)}"
        )
    if bias is not None:
        require_tensor("bias", bias)
        require_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"`bias` must be [V] = ({weight.shape[0]},), got {describe(bias)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        0 < temperature < float("inf")
    ):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be None or an int >= 1 (rows per block), got {chunk_size!r}")
    for name, t in (("bias", bias), ("mask", mask)):
        if t is not None:
            require_tensor(name, t)
    require_same_device(
        [("hidden", hidden), ("lm_head_weight", weight), ("bias", bias), ("labels", labels), ("mask", mask)]
    )
    return kept_rows(labels, mask, ignore_index=ignore_index, vocab=weight.shape[0])


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax((hidden @ W^T + b) / T)[labels]`` without materializing the ``[N, V]`` logits.

    Args:
        hidden: last hidden states ``[..., H]`` (e.g. ``[B, T, H]``), fp16/bf16/fp32/fp64.
        lm_head_weight: the output projection ``W [V, H]`` (``nn.Linear(H, V).weight``).
        labels: ``[...]`` int32/int64 token ids in ``[0, V)`` or ``ignore_index``; ``hidden``'s leading shape.
        temperature: sampling temperature ``T`` (finite, > 0), applied to the fp32 logits (default 1.0, the
            FlowRL math runs' rollout temperature).
        chunk_size: rows per block; default `default_fused_chunk_rows` (~32 MiB of fp32 logits).
        ignore_index: label of skipped positions (default -100, as in ``F.cross_entropy``).
        mask: optional bool (or 0/1) tensor shaped like ``labels``; 0 positions are skipped too.
        return_entropy: also return the per-token entropy of ``softmax(z / T)`` (differentiable).
        bias: optional ``[V]`` output bias (most LLM heads have none).

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 inputs), 0 with zero gradient at
        skipped positions; ``(logprobs, entropy)`` when ``return_entropy``. Gradients flow to ``hidden``,
        ``lm_head_weight`` and ``bias``.
    """
    valid = _check(hidden, lm_head_weight, bias, labels, mask, temperature, ignore_index, chunk_size)
    labels_flat = labels.reshape(-1)
    safe_labels = torch.where(valid, labels_flat, torch.zeros_like(labels_flat)).long()
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_size if chunk_size is not None else default_fused_chunk_rows(lm_head_weight.shape[0])
    kept = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    if kept is not None:
        # Skipped rows cost nothing: only the kept rows' hidden states ([n_kept, H], cheap to gather) are
        # projected; autograd scatters their gradient back (zeros elsewhere).
        hidden2d, safe_labels, valid = hidden2d.index_select(0, kept), safe_labels[kept], valid[kept]
    logp, entropy = _FusedLinearTokenLogprobs.apply(
        hidden2d, lm_head_weight, bias, safe_labels, valid, float(temperature), bool(return_entropy), rows
    )
    if kept is not None:
        n = labels.numel()
        logp = logp.new_zeros(n).index_copy(0, kept, logp)
        entropy = entropy.new_zeros(n).index_copy(0, kept, entropy) if return_entropy else entropy
    logp = logp.reshape(labels.shape)
    if return_entropy:
        return logp, entropy.reshape(labels.shape)
    return logp

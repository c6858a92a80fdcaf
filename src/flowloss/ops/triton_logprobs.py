"""The Triton implementation of the logits path (no autograd here: `flowloss.ops.library` wires it).

For logits ``x [N, V]``, labels ``y [N]`` (negative = skipped row), temperature ``T``, ``z = x / T`` (fp32)::

    logprobs[n] = z[n, y_n] - logsumexp(z[n])                       [N] fp32
    entropy[n]  = -sum_v p[n, v] log p[n, v]                        [N] fp32 (when return_entropy)
    d logits    = (g (onehot(y) - p) - g_H p (log p + H)) / T       [N, V], logits' dtype

Memory: the forward allocates O(N) (log-probs, fp32 base-2 log-sum-exp, entropy); the backward allocates only
``dlogits``, or nothing in place. A ``[B, T, V]`` input that cannot be viewed as ``[B*T, V]`` (``logits[:, :-1]``)
runs as one launch per sequence, each on a ``[T, V]`` view with a plain row stride: read in place, never
copied. Kernels: ``flowloss.kernels.logprob_forward`` / ``logprob_backward``. Nothing here synchronises.
"""

from __future__ import annotations

import torch

from flowloss.kernels.logprob_backward import logprob_backward
from flowloss.kernels.logprob_forward import DEFAULT_BLOCK_V, logprob_forward


def _sequences(logits: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """``[N, V]`` -> one ``(rows, slice)``; ``[B, T, V]`` -> one ``(logits[b], rows of b)`` per sequence."""
    if logits.dim() == 2:
        return [(logits, slice(0, logits.shape[0]))]
    seq = logits.shape[1]
    return [(logits[b], slice(b * seq, (b + 1) * seq)) for b in range(logits.shape[0])]


def forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    return_entropy: bool,
    vocab_size: int,
    block_v: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs [N], entropy [N] or [0], lse2 [N])``, fp32; ``labels`` contiguous, negative = skipped;
    ``block_v=0``: the kernels' default tile."""
    block_v = block_v or DEFAULT_BLOCK_V
    parts = [
        logprob_forward(
            rows,
            labels[span],
            temperature=temperature,
            ignore_index=-1,
            vocab_size=vocab_size,
            with_entropy=return_entropy,
            block_v=block_v,
        )
        for rows, span in _sequences(logits)
    ]
    if len(parts) == 1:
        logprobs, lse2, entropy = parts[0]
    else:
        logprobs = torch.cat([p[0] for p in parts])
        lse2 = torch.cat([p[1] for p in parts])
        entropy = torch.cat([p[2] for p in parts]) if return_entropy else None
    if entropy is None:
        entropy = logprobs.new_empty(0)
    return logprobs, entropy, lse2


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse2: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    vocab_size: int,
    out: torch.Tensor,
    block_v: int = 0,
) -> torch.Tensor:
    """Write ``dlogits`` into ``out`` (a buffer shaped like ``logits``, or ``logits`` itself: in place)."""
    block_v = block_v or DEFAULT_BLOCK_V
    inplace = out is logits
    if grad_logprobs is not None:
        grad_logprobs = grad_logprobs.float().contiguous()
    use_entropy = grad_entropy is not None and entropy.numel() > 0
    if use_entropy:
        grad_entropy = grad_entropy.float().contiguous()  # type: ignore[union-attr]
    for (rows, span), (out_rows, _) in zip(_sequences(logits), _sequences(out)):
        logprob_backward(
            rows,
            labels[span],
            lse2[span],
            grad_logprobs[span] if grad_logprobs is not None else None,
            entropy=entropy[span] if use_entropy else None,
            grad_entropy=grad_entropy[span] if use_entropy else None,  # type: ignore[index]
            temperature=temperature,
            ignore_index=-1,
            vocab_size=vocab_size,
            inplace=inplace,
            out=None if inplace else out_rows,
            block_v=block_v,
        )
    return out


__all__ = ["backward", "forward"]

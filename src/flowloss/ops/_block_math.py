"""One row block's log-prob math in PyTorch, shared by the chunked logits path and the chunked lm_head path.

For a block ``z [r, V]`` (already upcast and divided by ``T``), labels ``y [r]`` and kept rows ``k [r]``::

    logp_n = z_n[y_n] - logsumexp(z_n),   H_n = -sum_v p_nv log p_nv,   p = softmax(z)
    dz_raw = -[p (g + g_H (log p + H)) - g onehot(y)] / T

Skipped rows give 0 and a zero gradient. A kept row whose logits are all ``-inf`` has no distribution: log-prob
``-inf``, entropy 0, gradient ``g / T`` on the label only (the Triton kernels' convention). A NaN/+inf logit on
a kept row gives NaN, never a silently finite value.

Host synchronisation: on CPU tensors (where reading a value costs nothing) the rare all-``-inf`` rows are found
lazily, only when a NaN shows up; on other devices the check is an always-on reduction instead of a branch.
"""

from __future__ import annotations

import torch


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled(x: torch.Tensor, temperature: float, cdtype: torch.dtype) -> torch.Tensor:
    """``x.to(cdtype) / T``: upcast first, then divide (a view of ``x`` when nothing is to be done)."""
    z = x.to(cdtype)
    return z / temperature if temperature != 1.0 else z


def dead_rows(z: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor | None:
    """``[r]`` bool of rows whose logits are all ``-inf`` (None when there are none, on CPU).

    Such rows make ``log_softmax``/``softmax`` NaN. On CPU, ``row_values`` (any per-row result of the block,
    NaN on those rows) makes the common case one ``isnan`` over ``[r]`` without re-reading the block.
    """
    if z.shape[1] == 0:
        return None
    if z.device.type == "cpu":
        nan_rows = torch.isnan(row_values)
        if not bool(nan_rows.any()):
            return None
        dead = nan_rows & (z.amax(dim=-1) == float("-inf"))
        return dead if bool(dead.any()) else None
    return z.amax(dim=-1) == float("-inf")


def block_forward(
    z: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor, *, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z [r, V]`` -> ``(logp [r], H [r] | None)``; ``labels`` must be in ``[0, V)`` on every row.

    Uses ``torch.log_softmax`` on the block: its fused CPU kernel is ~2x faster than ``logsumexp`` or an
    elementwise ``exp(z - lse)``, and the block-sized output stays in cache.
    """
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    entropy = None
    if return_entropy:
        p = log_p.exp()
        # 0 log 0 = 0 where p = 0 (a -inf logit); a NaN/+inf logit stays NaN
        entropy = -(p * log_p).masked_fill_(p == 0, 0.0).sum(dim=-1)
    dead = dead_rows(z, logp)
    if dead is not None:
        logp = logp.masked_fill(dead, float("-inf"))
        if entropy is not None:
            entropy = entropy.masked_fill(dead, 0.0)
    zero = z.new_zeros(())
    logp = torch.where(kept, logp, zero)
    if entropy is not None:
        entropy = torch.where(kept, entropy, zero)
    return logp, entropy


def block_backward(
    z: torch.Tensor,
    labels: torch.Tensor,
    kept: torch.Tensor,
    grad_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``dL/dz_raw [r, V]`` for one block into ``out`` (any float dtype), where ``z = z_raw / T``.

    Recomputes ``p = softmax(z)`` with the fused kernel (no saved state but ``H``); zero on skipped rows.
    ``out`` may alias ``z`` or the raw logits (in-place backward): they are read in full before ``out`` is
    written. ``g``/``g_H`` of ``None`` count as zero.
    """
    rows = z.shape[0]
    zero = z.new_zeros(())
    g = grad_logp.to(z.dtype) if grad_logp is not None else z.new_zeros(rows)
    g = torch.where(kept, g, zero)
    if grad_entropy is not None and entropy is not None:
        g_h = torch.where(kept, grad_entropy.to(z.dtype), zero)
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        coef = log_p.add_(entropy.unsqueeze(1)).mul_(g_h.unsqueeze(1)).add_(g.unsqueeze(1)).mul_(p)
        coef.masked_fill_(p == 0, 0.0)  # p = 0 and log p = -inf: the limit is 0 (NaN input stays NaN)
    else:
        coef = torch.softmax(z, dim=-1).mul_(g.unsqueeze(1))
    dead = dead_rows(z, coef[:, 0]) if coef.shape[1] else None
    if dead is not None:  # all -inf row: p = 0, only the label's term is left
        coef.masked_fill_(dead.unsqueeze(1), 0.0)
    coef[torch.arange(rows, device=z.device), labels] -= g
    torch.mul(coef, -1.0 / temperature, out=out)
    zero_skipped_rows(out, kept)
    return out


def zero_skipped_rows(out: torch.Tensor, kept: torch.Tensor) -> None:
    """``out[~kept] = 0``: skipped rows may hold anything (even inf/NaN); their gradient is exactly 0.

    On CPU the skipped rows are read on the host (free there) and zeroed one contiguous row at a time: a
    broadcast ``masked_fill_`` over ``[r, V]`` costs as much as the softmax pass itself. Elsewhere one
    ``masked_fill_`` (no synchronisation)."""
    if out.device.type != "cpu":
        out.masked_fill_(~kept.unsqueeze(1), 0.0)
        return
    for i in (~kept).nonzero().flatten().tolist():
        out[i].zero_()

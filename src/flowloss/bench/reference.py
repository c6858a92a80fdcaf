"""The float64 reference behind the benchmark's error columns, vectorized in row chunks.

`flowloss.reference.token_logprobs` loops over rows in Python: exact, but minutes at ``N x V = 2048 x 32000``.
Here the same formula runs on float64 copies of a block of rows at a time (``rows * V * 8`` bytes, about
256 MiB at most), so big shapes stay affordable; ``tests/bench`` checks it against the row loop.

For rows ``n`` with ``keep_n`` (label not ignored), upstream gradient ``g_n`` and temperature ``T``::

    logp_n        = log_softmax(z_n / T)[y_n]                     (0 where not kept)
    d/dz_n sum_m g_m logp_m = g_n (onehot(y_n) - softmax(z_n / T)) / T

The gradient comes from float64 autograd of ``logp`` on each block, not from the closed form.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

F64 = torch.float64
BLOCK_BYTES = 256 * 1024 * 1024


def _block_rows(vocab: int) -> int:
    return max(1, BLOCK_BYTES // (8 * 4 * vocab))


def logprob_blocks(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, grad_out: torch.Tensor, *, temperature: float
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, logp [rows], dlogits [rows, V])`` in float64, block by block, for ``logits [N, V]``."""
    n, vocab = logits.shape
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    step = _block_rows(vocab)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        z = logits[rows].detach().to(F64).requires_grad_(True)
        lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, safe[rows, None]).squeeze(-1)
        lp = torch.where(keep[rows], lp, torch.zeros_like(lp))
        (dz,) = torch.autograd.grad(lp, z, grad_out[rows].to(F64))
        yield rows, lp.detach(), dz


def logprobs_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, grad_out: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(logp [N], dlogits [N, V])`` of ``sum_n g_n logp_n`` for ``logits [N, V]``, ``labels [N]``."""
    logp = torch.zeros(logits.shape[0], dtype=F64, device=logits.device)
    grad = torch.zeros(logits.shape, dtype=F64, device=logits.device)
    for rows, lp, dz in logprob_blocks(logits, labels, keep, grad_out, temperature=temperature):
        logp[rows] = lp
        grad[rows] = dz
    return logp, grad


def logprob_errors(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    temperature: float,
    logp: torch.Tensor,
    grad: torch.Tensor | None,
) -> tuple[float, float | None]:
    """``(max |logp - ref|, max |dlogits - ref|)`` without holding the whole float64 reference at once."""
    err, err_grad = 0.0, (None if grad is None else 0.0)
    for rows, lp, dz in logprob_blocks(logits, labels, keep, grad_out, temperature=temperature):
        err = _worse(err, max_abs_error(logp.reshape(-1)[rows], lp))
        if grad is not None:
            err_grad = _worse(err_grad, max_abs_error(grad[rows], dz))
    return err, err_grad


def _worse(a: float | None, b: float) -> float:
    if a is None or b != b:
        return b
    return a if a != a else max(a, b)


def fused_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """float64 ``logp [...]`` of ``log_softmax(hidden @ weight^T / T)[labels]``, 0 where not ``keep``, for
    ``hidden [..., H]`` (labels and keep shaped like its leading dims); forward only, in row blocks."""
    h2 = hidden.detach().reshape(-1, hidden.shape[-1])
    safe = torch.where(keep, labels, torch.zeros_like(labels)).reshape(-1).long()
    kept = keep.reshape(-1)
    w = weight.detach().to(F64)
    logp = torch.zeros(h2.shape[0], dtype=F64, device=hidden.device)
    step = _block_rows(w.shape[0])
    for start in range(0, h2.shape[0], step):
        rows = slice(start, min(start + step, h2.shape[0]))
        z = h2[rows].to(F64) @ w.T
        lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, safe[rows, None]).squeeze(-1)
        logp[rows] = torch.where(kept[rows], lp, torch.zeros_like(lp))
    return logp.reshape(labels.shape)


def fused_logprobs_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``(logp [N], dhidden [N, H], dweight [V, H])`` with ``logits = hidden @ weight^T``."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    w = weight.detach().to(F64).requires_grad_(True)
    logp = torch.zeros(n, dtype=F64, device=hidden.device)
    dhidden = torch.zeros(hidden.shape, dtype=F64, device=hidden.device)
    dweight = torch.zeros(w.shape, dtype=F64, device=hidden.device)
    step = _block_rows(vocab)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        h = hidden[rows].detach().to(F64).requires_grad_(True)
        z = h @ w.T
        lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, safe[rows, None]).squeeze(-1)
        lp = torch.where(keep[rows], lp, torch.zeros_like(lp))
        dh, dw = torch.autograd.grad(lp, (h, w), grad_out[rows].to(F64))
        logp[rows] = lp.detach()
        dhidden[rows] = dh
        dweight += dw
    return logp, dhidden, dweight


def grad_of(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t.grad`` after a backward that must have reached ``t`` (``what`` names it in the error otherwise)."""
    if t.grad is None:
        raise ValueError(f"the backward left no gradient on {what}")
    return t.grad


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` in float64, computed in row blocks (no full float64 copy of ``actual``)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != reference shape {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    a2 = actual.detach().reshape(actual.shape[0], -1) if actual.dim() > 0 else actual.detach().reshape(1, 1)
    e2 = expected.detach().reshape(a2.shape)
    step = max(1, BLOCK_BYTES // (8 * max(a2.shape[1], 1)))
    worst = 0.0
    for start in range(0, a2.shape[0], step):
        diff = (a2[start : start + step].to(F64) - e2[start : start + step].to(F64)).abs()
        if bool(torch.isnan(diff).any()):
            return float("nan")
        worst = max(worst, float(diff.max()))
    return worst

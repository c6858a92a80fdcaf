"""The Triton implementation of the lm_head path (no autograd here: `flowloss.ops.library` wires it).

``hidden [N, H]`` and ``W [V, H]`` (one float dtype; a bias ``[V]`` is cast to it), labels ``[N]`` (negative =
skipped row)::

    forward:  logp_n = z_n[y_n] - logsumexp(z_n), H_n,  z = (h W^T + b) / T   (logits never stored)
    backward: dz recomputed block by block; dh = dz W, dW = dz^T h, db = sum_rows dz   (deterministic)

Skipped rows cost no FLOPs: the rows are walked in an ``order`` with the kept rows first (a stable sort of the
skip flags, on the device: no host synchronisation), and tiles past the kept rows exit at once. Kernels:
``flowloss.kernels.linear_logprob_forward`` / ``linear_logprob_backward`` (their docstrings give the design,
the FLOP and byte counts, and why the backward is deterministic).
"""

from __future__ import annotations

import torch

from flowloss.kernels.linear_logprob_backward import linear_logprob_backward
from flowloss.kernels.linear_logprob_forward import linear_logprob_forward


def _operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The layouts the kernels take: unit stride along ``H``, a bias in the inputs' dtype."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return hidden, weight, bias


def kept_first(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` row order with the kept rows (label >= 0) first, stable: computed on the device."""
    return torch.argsort((labels < 0).to(torch.int8), stable=True)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N] or [0], lse2 [N])``, fp32; lse2 is the base-2 log-sum-exp the backward uses."""
    hidden, weight, bias = _operands(hidden, weight, bias)
    logp, lse2, entropy = linear_logprob_forward(
        hidden,
        weight,
        bias,
        labels,
        temperature=temperature,
        ignore_index=-1,
        with_entropy=return_entropy,
        order=kept_first(labels),
    )
    return logp, entropy if entropy is not None else logp.new_empty(0), lse2


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse2: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(d hidden, d W, d bias)`` in the inputs' dtypes, None where not needed."""
    original_bias = bias
    hidden_c, weight_c, bias_c = _operands(hidden, weight, bias)
    use_entropy = grad_entropy is not None and entropy.numel() > 0
    dh, dw, db = linear_logprob_backward(
        hidden_c,
        weight_c,
        bias_c,
        labels,
        lse2,
        grad_logp,
        entropy=entropy if use_entropy else None,
        grad_entropy=grad_entropy if use_entropy else None,
        temperature=temperature,
        ignore_index=-1,
        order=kept_first(labels),
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias and bias is not None,
    )
    if db is not None and original_bias is not None and db.dtype != original_bias.dtype:
        db = db.to(original_bias.dtype)
    return dh, dw, db

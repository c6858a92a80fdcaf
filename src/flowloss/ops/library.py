"""The log-prob ops as ``torch.library`` custom ops: what autograd, ``torch.compile`` and CUDA graphs see.

Four ops in the ``flowloss`` namespace, each dispatching to an implementation by its ``impl`` string
(``"triton"``: the fused kernels; ``"chunked"``: the PyTorch row-block path):

=====================================  =========================================================================
op                                     computes
=====================================  =========================================================================
``token_logprobs``                     ``(logp [N], entropy [N] or [0], aux [N] or [0])`` from logits
``token_logprobs_backward``            ``dlogits`` (a new buffer)
``token_logprobs_backward_``           ``dlogits`` written over the logits (in-place backward; mutates them)
``linear_logprobs``                    ``(logp, entropy, aux)`` from hidden states and the lm_head weight
``linear_logprobs_backward``           ``(d hidden, d weight, d bias)`` (empty where not needed)
=====================================  =========================================================================

The ops are defined with `flowloss.ops._define.define_op` (``torch.library.define``, registered for every backend)
with a fake (meta) implementation and ``register_autograd``: the operator Dynamo and the dispatcher see with
``torch.library.custom_op``, without the cost of its first call (see there).

Labels reach the ops already resolved: ``[N]`` int64, negative = skipped row (ignored, masked, or out of the
vocabulary: the caller marks those NaN). ``aux`` is what the backward reuses (the Triton path's base-2
log-sum-exp). Dynamo treats each op as one node (their fake implementations give the shapes), so
``torch.compile(fullgraph=True)`` traces a whole step through them; the ops never synchronise with the device.

Double backward (``create_graph=True``): the gradient is then computed with differentiable PyTorch ops on the
full ``[N, V]`` logits (memory-hungry but exact), so Hessian-vector products through the log-probs are right.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from flowloss.ops import chunked
from flowloss.ops._block_math import compute_dtype_for
from flowloss.ops._define import define_op


def triton_module(kind: str = "logits") -> ModuleType:
    """The module holding the Triton implementation of ``kind`` (imported on first use: it imports triton)."""
    if kind == "logits":
        from flowloss.ops import triton_logprobs

        return triton_logprobs
    from flowloss.ops import triton_linear

    return triton_linear


def _out_dtype(dtype: torch.dtype, impl: str) -> torch.dtype:
    return torch.float32 if impl == "triton" else compute_dtype_for(dtype)


# ------------------------------------------------------------------------------------------------------
# Logits path


@define_op(
    "token_logprobs(Tensor logits, Tensor labels, float temperature, bool return_entropy, str impl, "
    "SymInt chunk_rows, SymInt vocab_size, SymInt block_v, bool inplace_backward) -> (Tensor, Tensor, Tensor)"
)
def token_logprobs_op(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    return_entropy: bool,
    impl: str,
    chunk_rows: int,
    vocab_size: int,
    block_v: int,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if impl == "triton":
        return triton_module().forward(
            logits, labels, temperature=temperature, return_entropy=return_entropy, vocab_size=vocab_size,
            block_v=block_v,
        )
    logp, entropy = chunked.logits_forward(
        logits, labels, temperature=temperature, return_entropy=return_entropy, chunk_rows=chunk_rows,
        vocab_size=vocab_size,
    )
    return logp, entropy, logp.new_empty(0)


@torch.library.register_fake("flowloss::token_logprobs")
def _(logits, labels, temperature, return_entropy, impl, chunk_rows, vocab_size, block_v, inplace_backward):
    n = labels.shape[0]
    dtype = _out_dtype(logits.dtype, impl)
    aux = n if impl == "triton" else 0
    return (
        logits.new_empty(n, dtype=dtype),
        logits.new_empty(n if return_entropy else 0, dtype=dtype),
        logits.new_empty(aux, dtype=torch.float32),
    )


def _logits_backward_into(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl, chunk_rows,
                          vocab_size, block_v, out):
    if impl == "triton":
        return triton_module().backward(
            logits, labels, aux, entropy, grad_logp, grad_entropy, temperature=temperature,
            vocab_size=vocab_size, out=out, block_v=block_v,
        )
    return chunked.logits_backward(
        logits, labels, entropy, grad_logp, grad_entropy, temperature=temperature, chunk_rows=chunk_rows,
        vocab_size=vocab_size, out=out,
    )


@define_op(
    "token_logprobs_backward(Tensor logits, Tensor labels, Tensor entropy, Tensor aux, Tensor? grad_logp, "
    "Tensor? grad_entropy, float temperature, str impl, SymInt chunk_rows, SymInt vocab_size, SymInt block_v) "
    "-> Tensor"
)
def token_logprobs_backward_op(
    logits: Tensor,
    labels: Tensor,
    entropy: Tensor,
    aux: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    impl: str,
    chunk_rows: int,
    vocab_size: int,
    block_v: int,
) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _logits_backward_into(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl,
                                 chunk_rows, vocab_size, block_v, out)


@torch.library.register_fake("flowloss::token_logprobs_backward")
def _(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl, chunk_rows, vocab_size, block_v):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@define_op(
    "token_logprobs_backward_(Tensor(a0!) logits, Tensor labels, Tensor entropy, Tensor aux, Tensor? grad_logp, "
    "Tensor? grad_entropy, float temperature, str impl, SymInt chunk_rows, SymInt vocab_size, SymInt block_v) -> ()"
)
def token_logprobs_backward_inplace_op(
    logits: Tensor,
    labels: Tensor,
    entropy: Tensor,
    aux: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    impl: str,
    chunk_rows: int,
    vocab_size: int,
    block_v: int,
) -> None:
    _logits_backward_into(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl, chunk_rows,
                          vocab_size, block_v, logits)
    # The kernels' stores are invisible to autograd: bump the version counter so that another node that saved
    # the logits raises instead of reading their gradient (the chunked path's out= writes bump it as well).
    torch.autograd.graph.increment_version(logits)


@torch.library.register_fake("flowloss::token_logprobs_backward_")
def _(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl, chunk_rows, vocab_size, block_v):
    return None


def _logits_setup(ctx, inputs, output):
    logits, labels, temperature, return_entropy, impl, chunk_rows, vocab_size, block_v, inplace = inputs
    _, entropy, aux = output
    ctx.save_for_backward(logits, labels, entropy, aux)
    ctx.options = (temperature, return_entropy, impl, chunk_rows, vocab_size, block_v, inplace)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(aux)


def _differentiable_dz(z, labels, grad_logp, grad_entropy, temperature):
    """``dL/dz_raw`` with plain (differentiable) ops on a full ``z [N, V]`` (for ``create_graph=True``)."""
    kept = (labels >= 0).unsqueeze(1)
    y = labels.clamp_min(0).unsqueeze(1)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    zeros = z.new_zeros(z.shape[0])
    g = (grad_logp.to(z.dtype) if grad_logp is not None else zeros).unsqueeze(1)
    dz = torch.zeros_like(z).scatter(1, y, g.expand(-1, 1)) - p * g
    if grad_entropy is not None:
        safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        entropy = -(p * safe_log_p).sum(dim=-1, keepdim=True)
        dz = dz - grad_entropy.to(z.dtype).unsqueeze(1) * p * (safe_log_p + entropy)
    return torch.where(kept, dz, torch.zeros_like(dz)) / temperature


def _logits_backward(ctx, grad_logp, grad_entropy, _grad_aux):
    logits, labels, entropy, aux = ctx.saved_tensors
    temperature, return_entropy, impl, chunk_rows, vocab_size, block_v, inplace = ctx.options
    nones = (None,) * 8
    if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
        return (None, *nones)
    if not return_entropy:
        grad_entropy = None
    if torch.is_grad_enabled():  # create_graph=True: a differentiable formula, so second derivatives are right
        flat = logits.reshape(-1, logits.shape[-1])
        z = flat[:, :vocab_size].to(compute_dtype_for(logits.dtype)) / temperature
        dz = _differentiable_dz(z, labels, grad_logp, grad_entropy, temperature)
        if vocab_size < flat.shape[1]:
            dz = torch.cat([dz, dz.new_zeros(dz.shape[0], flat.shape[1] - vocab_size)], dim=1)
        return (dz.to(logits.dtype).reshape(logits.shape), *nones)
    if inplace:
        token_logprobs_backward_inplace_op(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature,
                                           impl, chunk_rows, vocab_size, block_v)
        # The logits now hold their gradient: another autograd node that saved them must fail loudly.
        return (logits.detach(), *nones)
    dlogits = token_logprobs_backward_op(logits, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl,
                                         chunk_rows, vocab_size, block_v)
    return (dlogits, *nones)


torch.library.register_autograd("flowloss::token_logprobs", _logits_backward, setup_context=_logits_setup)


# ------------------------------------------------------------------------------------------------------
# lm_head path


@define_op(
    "linear_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature, "
    "bool return_entropy, str impl, SymInt chunk_rows) -> (Tensor, Tensor, Tensor)"
)
def linear_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    return_entropy: bool,
    impl: str,
    chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if impl == "triton":
        return triton_module("linear").forward(
            hidden, weight, bias, labels, temperature=temperature, return_entropy=return_entropy
        )
    logp, entropy = chunked.linear_forward(
        hidden, weight, bias, labels, temperature=temperature, return_entropy=return_entropy, chunk_rows=chunk_rows
    )
    return logp, entropy, logp.new_empty(0)


@torch.library.register_fake("flowloss::linear_logprobs")
def _(hidden, weight, bias, labels, temperature, return_entropy, impl, chunk_rows):
    n = labels.shape[0]
    dtype = _out_dtype(torch.promote_types(hidden.dtype, weight.dtype), impl)
    aux = n if impl == "triton" else 0
    return (
        hidden.new_empty(n, dtype=dtype),
        hidden.new_empty(n if return_entropy else 0, dtype=dtype),
        hidden.new_empty(aux, dtype=torch.float32),
    )


@define_op(
    "linear_logprobs_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor entropy, "
    "Tensor aux, Tensor? grad_logp, Tensor? grad_entropy, float temperature, str impl, SymInt chunk_rows, "
    "bool need_hidden, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"
)
def linear_logprobs_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    entropy: Tensor,
    aux: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    impl: str,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if impl == "triton":
        grads = triton_module("linear").backward(
            hidden, weight, bias, labels, aux, entropy, grad_logp, grad_entropy, temperature=temperature,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
        )
    else:
        grads = chunked.linear_backward(
            hidden, weight, bias, labels, entropy, grad_logp, grad_entropy, temperature=temperature,
            chunk_rows=chunk_rows, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
        )
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)  # type: ignore[return-value]


@torch.library.register_fake("flowloss::linear_logprobs_backward")
def _(hidden, weight, bias, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl, chunk_rows,
      need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0),
    )


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, return_entropy, impl, chunk_rows = inputs
    _, entropy, aux = output
    ctx.save_for_backward(hidden, weight, bias, labels, entropy, aux)
    ctx.options = (temperature, return_entropy, impl, chunk_rows)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(aux)


def _linear_backward(ctx, grad_logp, grad_entropy, _grad_aux):
    hidden, weight, bias, labels, entropy, aux = ctx.saved_tensors
    temperature, return_entropy, impl, chunk_rows = ctx.options
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    nones = (None,) * 5
    if not (need_h or need_w or need_b) or (grad_logp is None and grad_entropy is None):
        return (None, None, None, *nones)
    if not return_entropy:
        grad_entropy = None
    if torch.is_grad_enabled():  # create_graph=True: differentiable formula on the full logits
        cdtype = compute_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
        h, w = hidden.to(cdtype), weight.to(cdtype)
        z = h @ w.t()
        if bias is not None:
            z = z + bias.to(cdtype)
        dz = _differentiable_dz(z / temperature, labels, grad_logp, grad_entropy, temperature)
        return (
            (dz @ w).to(hidden.dtype) if need_h else None,
            (dz.t() @ h).to(weight.dtype) if need_w else None,
            dz.sum(dim=0).to(bias.dtype) if need_b else None,
            *nones,
        )
    dh, dw, db = linear_logprobs_backward_op(
        hidden, weight, bias, labels, entropy, aux, grad_logp, grad_entropy, temperature, impl, chunk_rows,
        need_h, need_w, need_b,
    )
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, *nones)


torch.library.register_autograd("flowloss::linear_logprobs", _linear_backward, setup_context=_linear_setup)

"""The per-sequence part of the trajectory-balance loss as one fused operator (two Triton launches in all).

For ``[B, T]`` token log-probs ``logprobs`` (with gradient), ``ref_logprobs``, optional ``old_logprobs`` /
``rollout_logprobs``, a bool ``mask [B, T]``, ``rewards [B]`` and ``log_z [B]`` (with gradient), and the
options of `flowloss.FlowRLOptions` (``mode`` the resolved weight mode)::

    kept_it         = mask_it, minus the tokens the token clip mask drops          (detached)
    l_i - l_ref_i   = sum_kept (logprobs - ref_logprobs) [/ max(|kept_i|, 1) with length normalization]
    delta_i         = log_z_i + l_i - l_ref_i - beta r_i
    w_i             = the weight of ``mode`` over the kept tokens, times the TIS factor (detached)
    per_sequence_i  = w_i g(delta_i) where row i has a kept token, else 0                 [B] fp32

exactly the math of ``trajectory_balance_loss``'s PyTorch path (``flowloss.losses``) before the reduction,
computed by ``flowloss::tb_sequence_terms``: one forward launch (``flowloss.kernels.tb_loss``), one backward
launch for ``d logprobs`` and ``d log_z``. The sum over rows and the normalizer stay in PyTorch
(`reduce_per_sequence`, 1-4 ops). Nothing here synchronises with the device, and Dynamo sees one node per
direction, so ``torch.compile(fullgraph=True)`` traces through it. Inputs: CUDA (or CPU under
``TRITON_INTERPRET=1``) tensors, fp16/bf16/fp32, accumulated in fp32; float64 stays on the PyTorch path.

Double backward (``create_graph=True``) is not implemented: the backward raises instead of returning a gradient
that would silently lack its second-order part.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flowloss.ops._define import define_op
from flowloss.ops.dispatch import interpreter_on, triton_available, unsupported_reason
from flowloss.options import FlowRLOptions
from flowloss.reductions import normalizer_value

# The rows of the op's `stats` output (kept equal to flowloss.kernels.tb_loss.STAT_ROWS, checked in the tests;
# repeated here so that importing this module needs no triton).
STAT_ROWS = (
    "delta",
    "weights",
    "log_weights_unclipped",
    "clipped_low",
    "clipped_high",
    "lengths",
    "counted",
    "mask_lengths",
    "seq_logprobs",
    "seq_ref_logprobs",
    "dper_seq_ddelta",
)


class TBSequenceTerms(NamedTuple):
    """`fused_tb_sequence_terms`'s result: ``per_sequence`` carries the gradient, the rest are detached
    ``[B]`` fp32 views of one buffer (flags and counts as 0.0/1.0 and float counts)."""

    per_sequence: Tensor  # w_i g(delta_i), 0 for rows without a kept token
    delta: Tensor  # log_z_i + l_i - l_ref_i - beta r_i (every row)
    weights: Tensor  # w_i (1 without importance weights)
    log_weights_unclipped: Tensor  # the mode's log-weight before clipping/capping (0 for "none")
    clipped_low: Tensor  # 1.0 where clipped at 1 - eps_low
    clipped_high: Tensor  # 1.0 where clipped at 1 + eps_high or capped
    lengths: Tensor  # |kept_i| (after the token clip mask)
    counted: Tensor  # 1.0 where the row has a token in `mask` (the default count N)
    mask_lengths: Tensor  # sum_t mask_it
    seq_logprobs: Tensor  # l_i (detached)
    seq_ref_logprobs: Tensor  # l_ref_i


def fused_tb_supported(*tensors: Tensor | None) -> bool:
    """Whether the fused op can take these tensors: all on CUDA (or CPU under Triton's interpreter), the float
    ones fp16/bf16/fp32 (float64 stays on the PyTorch path), and the Triton kernel importable."""
    named = [(f"tensor {i}", t) for i, t in enumerate(tensors)]
    return unsupported_reason(named, cpu_ok=interpreter_on()) is None and triton_available("tb_loss")


# ------------------------------------------------------------------------------------------------------
# The operators (`flowloss.ops._define.define_op`: no torch.library.custom_op wrapper)


@define_op(
    "tb_sequence_terms(Tensor logprobs, Tensor ref_logprobs, Tensor rewards, Tensor log_z, Tensor mask, "
    "Tensor? old_logprobs, Tensor? rollout_logprobs, str mode, float eps_low, float eps_high, float max_weight, "
    "float tis_cap, bool token_clip_mask, bool length_normalization, str penalty, float linex_alpha, "
    "float huber_delta, float beta, SymInt block_t) -> (Tensor, Tensor)"
)
def tb_sequence_terms_op(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    log_z: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
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
    block_t: int,
) -> tuple[Tensor, Tensor]:
    """``(per_sequence [B], stats [len(STAT_ROWS), B])``, fp32; ``block_t=0``: the kernel's default tile."""
    from flowloss.kernels.tb_loss import tb_forward

    return tb_forward(
        logprobs,
        ref_logprobs,
        rewards,
        log_z,
        mask,
        old_logprobs,
        rollout_logprobs,
        mode=mode,
        eps_low=eps_low,
        eps_high=eps_high,
        max_weight=max_weight,
        tis_cap=tis_cap,
        token_clip_mask=token_clip_mask,
        length_normalization=length_normalization,
        penalty=penalty,
        linex_alpha=linex_alpha,
        huber_delta=huber_delta,
        beta=beta,
        block_t=block_t or None,
    )


@torch.library.register_fake("flowloss::tb_sequence_terms")
def _(logprobs, ref_logprobs, rewards, log_z, mask, old_logprobs, rollout_logprobs, mode, eps_low, eps_high,
      max_weight, tis_cap, token_clip_mask, length_normalization, penalty, linex_alpha, huber_delta, beta, block_t):
    n = logprobs.shape[0]
    return (
        logprobs.new_empty(n, dtype=torch.float32),
        logprobs.new_empty((len(STAT_ROWS), n), dtype=torch.float32),
    )


@define_op(
    "tb_sequence_terms_backward(Tensor grad_per_sequence, Tensor stats, Tensor logprobs, Tensor mask, "
    "Tensor rewards, Tensor? old_logprobs, Tensor log_z, float eps_low, float eps_high, bool token_clip_mask, "
    "bool length_normalization, bool need_logprobs, bool need_log_z, SymInt block_t) -> (Tensor, Tensor)"
)
def tb_sequence_terms_backward_op(
    grad_per_sequence: Tensor,
    stats: Tensor,
    logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    old_logprobs: Tensor | None,
    log_z: Tensor,
    eps_low: float,
    eps_high: float,
    token_clip_mask: bool,
    length_normalization: bool,
    need_logprobs: bool,
    need_log_z: bool,
    block_t: int,
) -> tuple[Tensor, Tensor]:
    """``(d logprobs [B, T] or [0], d log_z [B] or [0])`` in the inputs' dtypes (``log_z`` gives only its dtype)."""
    from flowloss.kernels.tb_loss import tb_backward

    return tb_backward(
        grad_per_sequence,
        stats,
        logprobs,
        mask,
        rewards,
        old_logprobs,
        log_z.dtype,
        eps_low=eps_low,
        eps_high=eps_high,
        token_clip_mask=token_clip_mask,
        length_normalization=length_normalization,
        need_logprobs=need_logprobs,
        need_log_z=need_log_z,
        block_t=block_t or None,
    )


@torch.library.register_fake("flowloss::tb_sequence_terms_backward")
def _(grad_per_sequence, stats, logprobs, mask, rewards, old_logprobs, log_z, eps_low, eps_high, token_clip_mask,
      length_normalization, need_logprobs, need_log_z, block_t):
    return (
        logprobs.new_empty(logprobs.shape if need_logprobs else (0,)),
        log_z.new_empty(log_z.shape[0] if need_log_z else 0),
    )


def _setup_context(ctx, inputs, output):
    (logprobs, _ref, rewards, log_z, mask, old_logprobs, _rollout, _mode, eps_low, eps_high, _max_weight, _tis_cap,
     token_clip_mask, length_normalization, *_rest, block_t) = inputs
    _, stats = output
    # logprobs/old/rewards are read again only for the token clip mask; log_z only for its dtype.
    ctx.save_for_backward(stats, logprobs, mask, rewards, old_logprobs, log_z)
    ctx.options = (eps_low, eps_high, token_clip_mask, length_normalization, block_t)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_per_sequence, _grad_stats):
    stats, logprobs, mask, rewards, old_logprobs, log_z = ctx.saved_tensors
    eps_low, eps_high, token_clip_mask, length_normalization, block_t = ctx.options
    need_logprobs, need_log_z = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    nones = (None,) * 15
    if grad_per_sequence is None or not (need_logprobs or need_log_z):
        return (None, None, None, None, *nones)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "flowloss::tb_sequence_terms has no double backward (create_graph=True): use the PyTorch path of "
            "trajectory_balance_loss (float64 or CPU inputs) for higher-order gradients"
        )
    dlp, dz = tb_sequence_terms_backward_op(
        grad_per_sequence, stats, logprobs, mask, rewards, old_logprobs, log_z, eps_low, eps_high,
        token_clip_mask, length_normalization, need_logprobs, need_log_z, block_t,
    )
    return (dlp if need_logprobs else None, None, None, dz if need_log_z else None, *nones)


torch.library.register_autograd("flowloss::tb_sequence_terms", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------
# Python entry points


def fused_tb_sequence_terms(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    log_z: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    *,
    options: FlowRLOptions,
    mode: str,
    block_t: int = 0,
) -> TBSequenceTerms:
    """The per-sequence terms of the TB loss in two launches (see the module docstring); inputs already checked.

    Args:
        logprobs: ``[B, T]`` fp16/bf16/fp32 (differentiable); any row stride.
        ref_logprobs, old_logprobs, rollout_logprobs: ``[B, T]`` (``old`` needed for a weight mode other than
            ``"none"``, the token clip mask and TIS; ``rollout`` only with ``old``).
        rewards: ``[B]`` (``r_hat``); log_z: ``[B]`` (differentiable; squeeze a ``[B, 1]`` first).
        mask: ``[B, T]`` bool response mask; masked entries of the log-probs may hold anything (never read).
        options: the loss's validated `flowloss.FlowRLOptions` (its ``reduction`` is applied by the caller).
        mode: the resolved weight mode (``options.resolved_importance_weights(old_logprobs is not None)``).
        block_t: tokens per block (a power of two >= 16), 0 for the default.

    Returns:
        `TBSequenceTerms`: ``per_sequence [B]`` fp32 (gradient to ``logprobs`` and ``log_z``) and detached
        ``[B]`` diagnostics, all computed by the same forward launch.
    """
    o = options  # an operator takes plain values: the options are unpacked here, once
    per_sequence, stats = tb_sequence_terms_op(
        logprobs, ref_logprobs, rewards, log_z, mask, old_logprobs, rollout_logprobs, mode, o.eps_low, o.eps_high,
        o.max_weight, o.tis_cap, o.token_clip_mask, o.length_normalization, o.penalty, o.linex_alpha, o.huber_delta,
        o.beta, int(block_t),
    )
    return TBSequenceTerms(per_sequence, *stats.unbind(0)[: len(TBSequenceTerms._fields) - 1])


def reduce_per_sequence(
    per_sequence: Tensor, counted: Tensor, reduction: str, normalizer: float | Tensor | None
) -> Tensor:
    """`flowloss.reductions.apply_reduction` for the fused op's output, in 0-4 ops.

    ``per_sequence`` is already 0 on rows without a kept token, so no select is needed: ``"none"`` returns it
    (divided by ``normalizer`` when given), ``"sum"`` its sum (likewise), ``"mean"`` its sum over ``normalizer``
    or over ``sum(counted)`` clamped to >= 1 (``counted`` the 0.0/1.0 row flags).
    """
    if normalizer is not None:
        normalizer = normalizer_value(normalizer, per_sequence)
        return (per_sequence if reduction == "none" else per_sequence.sum()) / normalizer
    if reduction == "none":
        return per_sequence
    total = per_sequence.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1.0)


__all__ = [
    "STAT_ROWS",
    "TBSequenceTerms",
    "fused_tb_sequence_terms",
    "fused_tb_supported",
    "reduce_per_sequence",
    "tb_sequence_terms_op",
]

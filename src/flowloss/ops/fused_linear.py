"""Token log-probs straight from the last hidden states: ``lm_head`` and log-softmax fused, block by block.

For hidden states ``h [N, H]``, output projection ``W [V, H]`` (optional bias ``b [V]``), labels ``y [N]`` and
temperature ``T``::

    z_n    = (h_n @ W^T + b) / T            accumulated in float32 (float64 stays float64)
    logp_n = z_n[y_n] - logsumexp(z_n)           -> float32 [N] (shaped like ``labels``)
    H_n    = -sum_v p_nv log p_nv                 -> when ``return_entropy``

Backward, with ``dz = [g (onehot(y) - p) - g_H p (log p + H)] / T`` recomputed from ``h`` and ``W``::

    dh = dz @ W            dW = dz^T @ h            db = sum_rows dz

The full ``[N, V]`` logits never exist. This module validates and resolves the labels (on the device, without
synchronising) and calls the operator ``flowloss::linear_logprobs`` (`flowloss.ops.library`): the chunked PyTorch
path (`flowloss.ops.chunked`: block matmuls, 8 N H V FLOPs in all), or with ``impl="triton"`` the fused Triton
kernels (`flowloss.ops.triton_linear`), which ``impl="auto"`` does not pick until they have run on a GPU
(`flowloss.ops.dispatch`).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from flowloss._validation import (
    as_bool_mask,
    as_flag,
    as_index,
    as_temperature,
    describe,
    require_choice,
    require_float_tensor,
    require_same_device,
    require_tensor,
)
from flowloss.ops.chunked import default_fused_chunk_rows
from flowloss.ops.dispatch import LINEAR_IMPLS, resolve_impl
from flowloss.ops.library import linear_logprobs_op
from flowloss.ops.token_logprobs import resolve_labels
from flowloss.strict import is_strict


def _check(hidden, weight, bias, labels, mask, impl, chunk_size, strict) -> torch.Tensor | None:
    require_float_tensor("hidden", hidden)
    require_float_tensor("lm_head_weight", weight)
    require_tensor("labels", labels)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`labels` must be an int32 or int64 tensor of token ids, got {describe(labels)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"`lm_head_weight` must be [V, H] with V >= 1 (nn.Linear layout), got {describe(weight)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"`hidden` must be [..., H] with H = lm_head_weight.shape[1] = {weight.shape[1]}, got {describe(hidden)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"`labels` must have the leading shape of `hidden` {tuple(hidden.shape[:-1])}, got {describe(labels)}"
        )
    if bias is not None:
        require_float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"`bias` must be [V] = ({weight.shape[0]},), got {describe(bias)}")
    require_choice("impl", impl, LINEAR_IMPLS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be None or an int >= 1 (rows per block), got {chunk_size!r}")
    bool_mask = None
    if mask is not None:
        bool_mask = as_bool_mask("mask", mask, "labels", labels, strict=strict)
    require_same_device(
        [("hidden", hidden), ("lm_head_weight", weight), ("bias", bias), ("labels", labels), ("mask", bool_mask)]
    )
    return bool_mask


@overload
def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = ...,
    chunk_size: int | None = ...,
    ignore_index: int = ...,
    mask: torch.Tensor | None = ...,
    return_entropy: Literal[False] = ...,
    bias: torch.Tensor | None = ...,
    impl: str = ...,
    strict: bool | None = ...,
) -> torch.Tensor: ...


@overload
def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = ...,
    chunk_size: int | None = ...,
    ignore_index: int = ...,
    mask: torch.Tensor | None = ...,
    return_entropy: Literal[True],
    bias: torch.Tensor | None = ...,
    impl: str = ...,
    strict: bool | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = ...,
    chunk_size: int | None = ...,
    ignore_index: int = ...,
    mask: torch.Tensor | None = ...,
    return_entropy: bool = ...,
    bias: torch.Tensor | None = ...,
    impl: str = ...,
    strict: bool | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    strict: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax((hidden @ W^T + b) / T)[labels]`` without materializing the ``[N, V]`` logits.

    Args:
        hidden: last hidden states ``[..., H]`` (e.g. ``[B, T, H]``), fp16/bf16/fp32/fp64.
        lm_head_weight: the output projection ``W [V, H]`` (``nn.Linear(H, V).weight``).
        labels: ``[...]`` int32/int64 token ids in ``[0, V)`` or ``ignore_index``; ``hidden``'s leading shape.
        temperature: sampling temperature ``T`` (finite, > 0), applied to the fp32 logits (default 1.0, the
            FlowRL math runs' rollout temperature).
        chunk_size: rows per block of the chunked path; default ~32 MiB (CPU) / ~512 MiB (GPU) of fp32 logits.
        ignore_index: label of skipped positions (default -100, as in ``F.cross_entropy``).
        mask: optional bool tensor shaped like ``labels`` (numbers read as ``mask != 0``); 0 positions are
            skipped too.
        return_entropy: also return the per-token entropy of ``softmax(z / T)`` (differentiable).
        bias: optional ``[V]`` output bias (most LLM heads have none).
        impl: ``"auto"`` (today ``"chunked"``: the fused Triton kernels have not run on a GPU yet;
            `flowloss.ops.dispatch` decides), ``"triton"`` (the fused kernels: CUDA bf16/fp16, fp32 where TF32 is
            allowed, on a GPU with a checked configuration) or ``"chunked"``.
        strict: also refuse, with the position, a kept label outside ``[0, V)`` (reads device memory);
            default: the global setting (`flowloss.strict`).

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 inputs), 0 with zero gradient at
        skipped positions (their hidden states are never used, even if NaN); ``(logprobs, entropy)`` when
        ``return_entropy``. A kept label outside ``[0, V)`` gives NaN. Gradients flow to ``hidden``,
        ``lm_head_weight`` and ``bias``; second derivatives (``create_graph=True``) are exact, computed on the
        full logits.
    """
    temperature = as_temperature(temperature)
    return_entropy = as_flag("return_entropy", return_entropy)
    ignore_index = as_index("ignore_index", ignore_index)
    strict = is_strict(strict)
    bool_mask = _check(hidden, lm_head_weight, bias, labels, mask, impl, chunk_size, strict)
    if impl != "chunked" and hidden.dtype != lm_head_weight.dtype:
        if impl == "triton":
            raise TypeError(
                f"`impl='triton'` needs `hidden` and `lm_head_weight` of one dtype, got {hidden.dtype} and "
                f"{lm_head_weight.dtype}"
            )
        impl = "chunked"
    chosen = resolve_impl(impl, hidden, kind="linear", name="hidden")
    effective, bad = resolve_labels(
        labels, bool_mask, ignore_index=ignore_index, vocab=lm_head_weight.shape[0], strict=strict
    )
    rows = chunk_size if chunk_size is not None else default_fused_chunk_rows(lm_head_weight.shape[0], hidden.device)
    logp, entropy, _ = linear_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, bias, effective, temperature, return_entropy, chosen,
        rows,
    )
    nan = logp.new_full((), float("nan"))
    logp = torch.where(bad, nan, logp).reshape(labels.shape)
    if return_entropy:
        return logp, torch.where(bad, nan, entropy).reshape(labels.shape)
    return logp

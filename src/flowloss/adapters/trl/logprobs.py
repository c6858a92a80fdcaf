"""The log-prob call: every log-prob TRL computes, through the path ``FlowRLConfig.flowrl_logprobs`` names.

TRL 1.16 computes every per-token log-prob -- the policy's forward with gradient in ``_compute_loss``, the old
policy's and the reference's forwards without -- in ``_get_per_token_logps_and_entropies``, which calls
``model(input_ids, attention_mask, labels=labels, fused_lm_head=True)``; ``labels [B, S]`` are the input ids with
``-100`` on the prompt and the padding. `FlowlossLMHead` answers those calls. For the completion's ``C`` tokens
(TRL's ``logits_to_keep``), hidden states ``h [B, C, H]`` at the positions before them, ``lm_head`` weight
``W [V, H]``, bias ``b`` and TRL's ``temperature`` ``T``::

    logp[b, t] = log softmax(s (h W^T + b) / T)[labels[b, t + 1]]     (0 where the label is -100)
    H[b, t]    = -sum_v p_v log p_v                                     (when TRL asks for entropies)

with ``s`` the model's logit scale (1 for most models). The paths:

* ``"framework"``: TRL's own fused head (``trl.kernels.ChunkedLogProbFunction``: 32,768-column tiles, a Triton
  epilogue on CUDA/XPU; on CPU it scores every position of the sequence, prompt included);
* ``"logits"``: the model's own forward with ``logits_to_keep = C + 1`` (so the ``[B, C, V]`` logits are built
  by the model, in its dtype, with whatever softcapping, logit scale or PEFT adapter its ``lm_head`` applies),
  then `flowloss.token_logprobs` on them (no float32 copy of the logits);
* ``"hidden"``: the decoder's last hidden state, then `flowloss.token_logprobs_from_hidden` with ``lm_head``'s
  weight and bias: the ``[B, C, V]`` logits are never built. A logit scale is folded into the temperature
  (``T / s``); final-logit softcapping, a PEFT adapter on ``lm_head`` and DeepSpeed ZeRO-3 are refused (the
  first two would be dropped silently; ZeRO-3 gathers ``lm_head`` only inside its own forward).

The decoder runs once per call, so the log-Z head's forward hook sees the same hidden states as the log-probs.
``"auto"`` is ``"hidden"`` on CPU (measured: ``docs/adapters/trl.md``) and ``"framework"`` elsewhere (flowloss's
paths have not been measured inside TRL on a GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flowloss import token_logprobs, token_logprobs_from_hidden
from flowloss.adapters.trl._compat import (
    FusedCausalLMOutput,
    is_adapter_layer,
    maybe_gather_lm_head_ctx,
    wrap_fused_forward,
)

__all__ = ["LOGPROB_PATHS", "FlowlossLMHead", "hidden_path_problem", "logit_scale_of", "resolve_logprob_path"]

LOGPROB_PATHS = ("auto", "framework", "logits", "hidden")


def resolve_logprob_path(path: str, device: torch.device | str) -> str:
    """``"auto"`` -> the measured default for ``device`` (``"hidden"`` on CPU, ``"framework"`` elsewhere)."""
    if path not in LOGPROB_PATHS:
        raise ValueError(f"`flowrl_logprobs` must be one of {LOGPROB_PATHS}, got {path!r}")
    if path != "auto":
        return path
    return "hidden" if torch.device(device).type == "cpu" else "framework"


def _text_config(model: nn.Module) -> Any:
    config: Any = model.config  # a transformers PretrainedConfig: attributes differ per model
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale_of(text_config: Any) -> float:
    """The factor ``s`` a model multiplies its logits by before any softcapping (1.0 for most models).

    ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``1 / logits_scaling``
    (Granite, MiniCPM3; HyperCLOVA X multiplies by it): the config fields TRL's fused head reads too.
    """
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def hidden_path_problem(model: nn.Module) -> str | None:
    """Why ``flowrl_logprobs="hidden"`` cannot compute ``model``'s log-probs exactly, or None."""
    text_config = _text_config(model)
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return (
            f"{type(model).__name__} softcaps its logits (final_logit_softcapping="
            f"{text_config.final_logit_softcapping}), which token_logprobs_from_hidden does not apply"
        )
    scale = logit_scale_of(text_config)
    if not (math.isfinite(scale) and scale > 0):
        return f"{type(model).__name__}'s logit scale is {scale}, which cannot be folded into the temperature"
    hf: Any = model  # a transformers PreTrainedModel (nn.Module types its attributes as Tensor | Module)
    head = hf.get_output_embeddings()
    if head is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    if is_adapter_layer(head):
        return (
            f"lm_head carries a PEFT adapter ({type(head).__name__}): the hidden path multiplies by lm_head.weight, "
            "so the adapter's term would be left out of the log-probs and never trained"
        )
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3 gathers lm_head only inside its forward, which the hidden path does not call"
    except Exception:  # transformers without the integration
        pass
    return None


@dataclass
class _Request:
    logits_to_keep: int | None = None
    compute_entropy: bool = True


class FlowlossLMHead:
    """Answers TRL's ``model(..., labels=..., fused_lm_head=True)`` calls with the chosen log-prob ``path``.

    ``install(model)`` wraps the forward of the Hugging Face model (inside PEFT/DDP wrappers) that TRL patched;
    `request` tells the next calls how many completion tokens TRL keeps and whether it reads entropies (set by
    ``FlowRLTrainer._get_per_token_logps_and_entropies`` around TRL's own method). ``path`` may be changed
    between calls (``"framework"`` hands every call to TRL's head).
    """

    def __init__(self, path: str, *, temperature: float, cast_lm_head_to_fp32: bool = False) -> None:
        if path not in LOGPROB_PATHS[1:]:
            raise ValueError(f"`path` must be one of {LOGPROB_PATHS[1:]}, got {path!r}")
        self.path = path
        self.temperature = float(temperature)
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        self._request = _Request()

    def install(self, model: nn.Module) -> None:
        """Wrap ``model``'s (TRL-patched) forward; ``model`` is the Hugging Face causal LM itself."""
        takes_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        # torch types nn.Module.__setattr__'s value as Tensor | Module; a plain attribute is allowed (and meant) here
        model._flowrl_takes_logits_to_keep = takes_keep  # type: ignore[assignment]
        wrap_fused_forward(model, self._forward)

    @contextlib.contextmanager
    def request(self, logits_to_keep: int | None, compute_entropy: bool) -> Iterator[None]:
        previous, self._request = self._request, _Request(logits_to_keep, compute_entropy)
        try:
            yield
        finally:
            self._request = previous

    # -- the forward ----------------------------------------------------------------------------------------

    def _forward(self, model: nn.Module, trl_forward: Any, *args: Any, fused_lm_head: bool = False,
                 labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                 num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or self.path == "framework":
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        if shift_labels is not None or labels is None:
            raise NotImplementedError(
                f"flowrl_logprobs={self.path!r} scores `labels` shifted by one (GRPO's layout); pre-shifted "
                "`shift_labels` (context/sequence parallelism) need flowrl_logprobs='framework'"
            )
        keep = self._request.logits_to_keep
        keep = labels.size(1) - 1 if keep is None else min(int(keep), labels.size(1) - 1)
        targets = labels[:, -keep:]
        kwargs["use_cache"] = False
        if getattr(_text_config(model), "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        if self.path == "logits":
            logp, entropy, aux_loss = self._from_logits(model, trl_forward, targets, keep, args, kwargs)
        else:
            logp, entropy, aux_loss = self._from_hidden(model, targets, keep, args, kwargs)
        return FusedCausalLMOutput(log_probs=logp, entropy=entropy, label_mask=targets != -100, aux_loss=aux_loss)

    def _from_logits(self, model, trl_forward, targets, keep, args, kwargs):
        if model._flowrl_takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep + 1
        out = trl_forward(*args, **kwargs)  # fused_lm_head=False: the model's own forward
        logits = out.logits[:, -(keep + 1) : -1]  # read in place: no copy, no float32 upcast of [B, C, V]
        want = self._request.compute_entropy
        result = token_logprobs(logits, targets, temperature=self.temperature, return_entropy=want)
        logp, entropy = result if want else (result, None)
        return logp, entropy, getattr(out, "aux_loss", None)

    def _from_hidden(self, model, targets, keep, args, kwargs):
        problem = hidden_path_problem(model)
        if problem is not None:
            raise ValueError(f"flowrl_logprobs='hidden' is not exact here: {problem}; use 'logits' or 'framework'")
        out = model.base_model(*args, **kwargs)
        hidden = out.last_hidden_state[:, -(keep + 1) : -1]
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards lm_head as DTensors: gather (differentiably) once
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden = hidden.to(weight.device)
        if self.cast_lm_head_to_fp32:  # TRL's option: project in float32
            hidden = hidden.float()
        temperature = self.temperature / logit_scale_of(_text_config(model))
        want = self._request.compute_entropy
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            result = token_logprobs_from_hidden(
                hidden, weight, targets.to(weight.device), bias=bias, temperature=temperature, return_entropy=want
            )
        logp, entropy = result if want else (result, None)
        return logp, entropy, self._aux_loss(model, out, kwargs)

    @staticmethod
    def _aux_loss(model: nn.Module, out: Any, kwargs: dict[str, Any]) -> torch.Tensor | int | None:
        """An MoE model's load-balancing loss from the decoder's router logits, as its own forward computes it
        (transformers' ``load_balancing_loss_func`` returns the int 0 for router logits that are not a tuple)."""
        if not kwargs.get("output_router_logits") or getattr(out, "router_logits", None) is None:
            return None
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        text_config = _text_config(model)
        experts = getattr(model, "num_experts", None) or getattr(text_config, "num_experts", None) or getattr(
            text_config, "num_local_experts", None)
        top_k = getattr(model, "num_experts_per_tok", None) or getattr(text_config, "num_experts_per_tok", None)
        if experts is None or top_k is None:
            raise ValueError(
                f"cannot read the number of experts of {type(model).__name__} for its load-balancing loss; use "
                "flowrl_logprobs='logits' (the model's own forward computes it)"
            )
        return load_balancing_loss_func(out.router_logits, experts, top_k, kwargs.get("attention_mask"))

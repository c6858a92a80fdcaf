"""The actor's token log-probs through flowloss's ops: ``--flowrl.logprobs`` (OpenRLHF's ``Actor``).

OpenRLHF's ``Actor.forward`` (openrlhf 0.11) computes, for sequences ``[B, S]`` whose last ``A`` positions are
the response (prompts left-padded, responses right-padded; ``action_mask [B, A]``)::

    z_s         = float32(model(sequences).logits[:, s]) / T        every position s: an [B, S, V] fp32 tensor
    log pi(y_t) = log_softmax(z_{t-1})[y_t]                          for the A response tokens, 0 where masked

(``framework``). The two flowloss paths compute the same ``[B, A]`` log-probs from the rows that predict a
response token only, positions ``S-A-1 .. S-2`` (with ``--ds.packing_samples``: those rows of the packed
``[1, N]`` sequence, scattered back to ``[B, A]``):

* ``logits``: ``z = model(..., logits_to_keep=rows).logits`` in the model's dtype, then
  ``flowloss.token_logprobs(z, y, temperature=T, mask=action_mask)`` (no fp32 copy, O(rows) saved state);
* ``hidden``: the lm_head's input ``h [rows, H]`` (the lm_head is bypassed for the forward, so the
  ``[rows, V]`` logits are never built), then ``flowloss.token_logprobs_from_hidden(h, W, y, bias=b,
  temperature=T, mask=action_mask)`` with the lm_head's weight ``W [V, H]`` (tied or not) and bias.

When OpenRLHF asks for it (``--actor.entropy_coef`` set, logged), the entropy ``H_t = -sum_v p_v log p_v`` of
``softmax(z_{t-1} / T)`` comes from the same call, at the same rows. The model runs through ``actor.model``
(the DeepSpeed engine, a PEFT model or the HF model), so LoRA, gradient checkpointing and the decoder hook
that feeds the log-Z head behave as on OpenRLHF's path.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from openrlhf.models import Actor
from torch import nn

from flowloss import token_logprobs, token_logprobs_from_hidden
from flowloss.adapters.common import unwrap_model
from flowloss.adapters.openrlhf._compat import instance_override
from flowloss.adapters.openrlhf.config import CPU_DEFAULT, LOGPROBS_PATHS

__all__ = [
    "CPU_DEFAULT",
    "FlowRLActor",
    "action_log_probs",
    "logprobs_path_problem",
    "resolve_logprobs",
    "use_flowrl_logprobs",
]

# Config attributes of models whose forward transforms the logits after the lm_head (Gemma 2/3 softcapping,
# Cohere's logit_scale, Granite's logits_scaling): the hidden path would skip that transform.
_POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def resolve_logprobs(choice: str, device: torch.device) -> str:
    """The path ``"auto"`` means on ``device``: ``"framework"`` on CUDA (and any other accelerator) - no flowloss
    path has run inside OpenRLHF on a GPU yet -, `CPU_DEFAULT` on CPU (the measured best there)."""
    if choice not in LOGPROBS_PATHS:
        raise ValueError(f"`logprobs` must be one of {LOGPROBS_PATHS}, got {choice!r}")
    if choice != "auto":
        return choice
    return CPU_DEFAULT if torch.device(device).type == "cpu" else "framework"


def _output_layer(hf: nn.Module) -> nn.Module | None:
    get = getattr(hf, "get_output_embeddings", None)
    return get() if callable(get) else None


def logprobs_path_problem(actor: Actor, path: str) -> str | None:
    """Why ``path`` cannot compute this actor's log-probs exactly (None: it can)."""
    if path == "framework":
        return None
    if getattr(actor, "is_vlm", False):
        return "vision-language models need OpenRLHF's multimodal inputs and position ids"
    if path == "logits":
        return None
    hf = unwrap_model(actor.model)
    head = _output_layer(hf)
    if not isinstance(head, nn.Linear):
        return (f"the output layer of {type(hf).__name__} is {type(head).__name__}, not a plain nn.Linear "
                "(LoRA on the lm_head, a tensor-parallel or a quantized head)")
    if hasattr(head.weight, "ds_id"):
        return "DeepSpeed ZeRO-3 partitions the lm_head weight, which is gathered only inside the lm_head's forward"
    config = getattr(hf, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text = get_text_config() if callable(get_text_config) else config
    for key in _POST_HEAD_TRANSFORMS:
        value = getattr(text, key, None)
        if value is not None and value != 1:
            return f"{type(hf).__name__} transforms its logits after the lm_head (config.{key} = {value})"
    return _probe_hidden_path(hf, head)


@torch.no_grad()
def _probe_hidden_path(hf: nn.Module, head: nn.Linear) -> str | None:
    """Check once, on three tokens, that the model's logits are ``h W^T + b`` of the lm_head's input ``h``."""
    ids = torch.arange(3, device=head.weight.device).clamp_max(head.out_features - 1)[None]
    modes = {m: m.training for m in hf.modules()}
    hf.eval()  # no dropout: the two forwards must see the same network
    try:
        expected = hf(ids).logits[0, -1].float()
        with lm_head_passthrough(head):
            hidden = hf(ids).logits[0, -1]
    finally:
        for module, training in modes.items():
            module.training = training
    if hidden.shape != (head.in_features,) or expected.shape != (head.out_features,):
        return (f"{type(hf).__name__}'s logits {tuple(expected.shape)} are not its lm_head's output "
                f"({head.out_features} columns)")
    bias = None if head.bias is None else head.bias.float()
    ours = F.linear(hidden.float(), head.weight.float(), bias)
    gap = float((ours - expected).abs().max())
    if gap > 1e-2 * (1.0 + float(expected.abs().max())):
        return f"{type(hf).__name__}'s logits differ from lm_head(h) by {gap:.3g}: it transforms them after the head"
    return None


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


@contextlib.contextmanager
def lm_head_passthrough(head: nn.Module) -> Iterator[None]:
    """Inside the block ``head(x)`` returns ``x``: the model's forward hands back the lm_head's input as its
    ``logits`` (the rows ``logits_to_keep`` selected) and never builds the ``[rows, V]`` logits."""
    with instance_override(head, "forward", _identity):
        yield


_TAKES_LOGITS_TO_KEEP: dict[type[nn.Module], bool] = {}


def _takes_logits_to_keep(cls: type[nn.Module]) -> bool:
    """Whether ``cls.forward`` takes ``logits_to_keep`` (transformers' causal LMs do); looked up once per class."""
    if cls not in _TAKES_LOGITS_TO_KEEP:
        try:
            _TAKES_LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            _TAKES_LOGITS_TO_KEEP[cls] = False
    return _TAKES_LOGITS_TO_KEEP[cls]


def _unpack(values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int], first: int) -> torch.Tensor:
    """Packed rows ``values [K]`` at flat positions ``positions [K]`` of ``[B, S]`` -> the ``[B, A]`` columns
    ``first .. S-2`` (0 elsewhere); differentiable."""
    batch, seqlen = shape
    flat = values.new_zeros(batch * seqlen).index_put((positions,), values)
    return flat.view(batch, seqlen)[:, first: seqlen - 1]


def action_log_probs(
    actor: Actor,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    path: str,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """``(log_probs [B, A], entropy [B, A] or None, the model's output)`` on ``path`` (``"logits"`` or
    ``"hidden"``), in OpenRLHF's layout: float32, 0 where ``action_mask`` is 0; ``actor.temperature`` applied.

    ``sequences``/``attention_mask`` ``[B, S]`` (left-padded prompts, right-padded responses), ``action_mask``
    ``[B, A]``. With ``actor.packing_samples`` the model runs on OpenRLHF's packed ``[1, N]`` layout
    (``unpad_and_slice_tensor``: no attention mask, position ids restarting per sample). The output's
    ``logits`` is set to None (the path keeps only the rows it needs).
    """
    if path not in ("logits", "hidden"):
        raise ValueError(f"`path` must be 'logits' or 'hidden', got {path!r}")
    model = actor.model
    hf = unwrap_model(model)
    batch, seqlen = sequences.shape
    actions = action_mask.shape[1]
    first = seqlen - actions - 1  # the row that predicts the first response token
    packed = bool(getattr(actor, "packing_samples", False))
    keep: torch.Tensor | int
    if packed:
        from openrlhf.models.ring_attn_utils import unpad_and_slice_tensor

        inputs, position_ids, rolled, _, indices = unpad_and_slice_tensor(sequences, attention_mask, None)
        predicts = torch.zeros(batch, seqlen, dtype=torch.bool, device=sequences.device)
        predicts[:, first: seqlen - 1] = action_mask.bool()
        # the packed rows predicting a response token (one host sync, as OpenRLHF's own unpadding has)
        rows = predicts.reshape(-1)[indices].nonzero().squeeze(-1)
        labels, forward_mask, mask, keep = rolled[0, rows], None, None, rows
    else:
        inputs = sequences
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        labels, forward_mask, mask, keep = sequences[:, -actions:], attention_mask, action_mask, actions + 1
    takes_keep = _takes_logits_to_keep(type(hf))
    kwargs = {"logits_to_keep": keep} if takes_keep else {}
    head = _output_layer(hf)
    if path == "hidden" and not isinstance(head, nn.Linear):  # use_flowrl_logprobs refuses such models
        raise ValueError(f"the hidden path needs an nn.Linear lm_head, got {type(head).__name__}")
    bypass = lm_head_passthrough(head) if isinstance(head, nn.Linear) and path == "hidden" else contextlib.nullcontext()
    with bypass:
        output = model(inputs, attention_mask=forward_mask, position_ids=position_ids, **kwargs)
    out = output["logits"]  # [B, A+1, V or H] / [1, K, V or H]
    if not takes_keep:  # every position came back: the rows logits_to_keep would have kept
        out = out[:, rows] if packed else out[:, first:]
    x = out[0] if packed else out[:, :-1]
    temperature = float(getattr(actor, "temperature", 1.0))
    entropy: torch.Tensor | None = None
    if isinstance(head, nn.Linear) and path == "hidden":
        w, b = head.weight, head.bias
        if return_entropy:
            logp, entropy = token_logprobs_from_hidden(x, w, labels, bias=b, temperature=temperature, mask=mask,
                                                       return_entropy=True)
        else:
            logp = token_logprobs_from_hidden(x, w, labels, bias=b, temperature=temperature, mask=mask)
    elif return_entropy:
        logp, entropy = token_logprobs(x, labels, temperature=temperature, mask=mask, return_entropy=True)
    else:
        logp = token_logprobs(x, labels, temperature=temperature, mask=mask)
    if packed:
        positions = indices[rows]
        logp = _unpack(logp, positions, (batch, seqlen), first)
        entropy = None if entropy is None else _unpack(entropy, positions, (batch, seqlen), first)
    output["logits"] = None
    return logp, entropy, output


class FlowRLActor(Actor):
    """OpenRLHF's ``Actor`` whose action log-probs come from the path ``flowrl_logprobs`` (`use_flowrl_logprobs`).

    Calls with an ``action_mask`` (the training forward, the old-policy and reference forwards) take the flowloss
    path; any other call (``return_logprobs``, ``allgather_logits``, ring attention, multimodal inputs) and the
    ``"framework"`` path run OpenRLHF's own ``Actor.forward``.
    """

    flowrl_logprobs: str = "framework"

    def forward(  # same parameters as openrlhf's Actor.forward
        self,
        sequences: torch.LongTensor,
        action_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_output: bool = False,
        allgather_logits: bool = False,
        return_logprobs: bool = False,
        ring_attn_group: Any = None,
        packed_seq_lens: list[int] | None = None,
        return_entropy: bool = False,
        **mm_inputs: Any,
    ) -> Any:
        path = self.flowrl_logprobs
        if (path == "framework" or action_mask is None or attention_mask is None or return_logprobs
                or allgather_logits or ring_attn_group is not None or mm_inputs):
            return super().forward(sequences, action_mask, attention_mask, return_output, allgather_logits,
                                   return_logprobs, ring_attn_group, packed_seq_lens, return_entropy, **mm_inputs)
        if return_entropy and not return_output:
            raise ValueError("return_entropy=True needs return_output=True (as in OpenRLHF's Actor.forward)")
        logp, entropy, output = action_log_probs(self, sequences, action_mask, attention_mask, path=path,
                                                 return_entropy=return_entropy)
        if return_entropy:
            output.entropy = entropy  # [B, A]; OpenRLHF reads output.entropy[:, -A:]
        return (logp, output) if return_output else logp


_FLOWRL_CLASSES: dict[type, type] = {Actor: FlowRLActor}


def _flowrl_class(cls: type) -> type:
    """``FlowRLActor`` for OpenRLHF's ``Actor``, a subclass of both for a subclass of it (made once)."""
    if issubclass(cls, FlowRLActor):
        return cls
    if cls not in _FLOWRL_CLASSES:
        _FLOWRL_CLASSES[cls] = type(f"FlowRL{cls.__name__}", (FlowRLActor, cls), {"__module__": cls.__module__})
    return _FLOWRL_CLASSES[cls]


def use_flowrl_logprobs(actor: Actor, choice: str = "auto") -> str:
    """Make ``actor`` (an OpenRLHF ``Actor``, in place) compute its action log-probs on ``choice``; returns the
    path taken.

    ``"auto"`` resolves by the device of the actor's parameters (`resolve_logprobs`); where its choice cannot
    run exactly on this model (`logprobs_path_problem`) it falls back to ``"logits"``, then ``"framework"``.
    An explicit ``"logits"``/``"hidden"`` that cannot is refused with the reason (ValueError).
    """
    if not isinstance(actor, Actor):
        raise TypeError(f"`actor` must be an openrlhf Actor, got {type(actor).__name__}")
    param = next(actor.parameters(), None)
    path = resolve_logprobs(choice, param.device if param is not None else torch.device("cpu"))
    problem = logprobs_path_problem(actor, path)
    if problem is not None and choice == "auto":
        for fallback in ("logits", "framework"):
            if fallback != path and logprobs_path_problem(actor, fallback) is None:
                path, problem = fallback, None
                break
    if problem is not None:
        raise ValueError(f"--flowrl.logprobs {path} cannot run on this model: {problem}; use --flowrl.logprobs "
                         "framework (OpenRLHF's own path)" + (" or logits" if path == "hidden" else ""))
    actor.__class__ = _flowrl_class(type(actor))
    actor.flowrl_logprobs = path
    return path

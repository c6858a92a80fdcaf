"""The log-prob call: token log-probs of verl's packed micro-batch with flowloss's ops.

In verl's remove-padding layout a micro-batch is one packed row of ``N`` tokens (its sequences back to back, a
static pad suffix possibly appended); the label of row ``n`` is the next token, ``input_ids_rmpad_rolled[n]``.
With ``z_n = W h_n + b`` the lm_head's logits and ``T`` the rollout temperature::

    logp_n = log softmax(z_n / T)[label_n]        H_n = entropy of softmax(z_n / T)   (when verl asks for it)

* ``"logits"``: `flowloss.token_logprobs` on the model's ``[N, V]`` logits (no fp32 or temperature-scaled copy,
  backward written into the logits' own storage);
* ``"hidden"``: `flowloss.token_logprobs_from_hidden` on the lm_head's input ``h [N, H]`` with its weight and bias,
  from inside the lm_head's forward (`LMHeadLogprobs`), so the ``[N, V]`` logits are never built and FSDP has the
  weight gathered; tied embeddings get their gradient from both uses;
* ``"framework"``: verl's own path (``logprobs_from_logits``, or its fused kernels with ``use_fused_kernels``).

``"auto"`` resolves per device (`resolve_logprobs`): ``"hidden"`` on CPU, verl's own path elsewhere (see
docs/adapters/verl.md for the measurements and for what has not run on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowloss import token_logprobs, token_logprobs_from_hidden

__all__ = [
    "DEFAULT_LOGPROBS",
    "LMHeadLogprobs",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "output_linear",
    "resolve_logprobs",
]

# What "auto" means per verl device: measured on CPU (docs/adapters/verl.md); elsewhere verl keeps its own path
# until a device run confirms a flowloss path inside verl.
DEFAULT_LOGPROBS: dict[str, str] = {"cpu": "hidden"}


def resolve_logprobs(choice: str, device: str) -> str:
    """``"framework"``, ``"logits"`` or ``"hidden"``: ``choice`` itself, or for ``"auto"`` the device's default."""
    if choice != "auto":
        return choice
    return DEFAULT_LOGPROBS.get(device, "framework")


def _scalar_temperature(temperature: Any) -> float:
    if isinstance(temperature, torch.Tensor):
        raise ValueError(
            "flowloss's log-prob paths take one rollout temperature per micro-batch, got a per-sample temperature "
            f"tensor of shape {tuple(temperature.shape)}: set actor_rollout_ref.flowrl.logprobs=framework"
        )
    return float(temperature)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: Any, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp [N], H [N] or None)`` from packed logits ``[N, V]`` (or ``[1, N, V]``) and labels ``[N]``.

    The backward writes ``dlogits`` into the logits' storage when they need a gradient (nothing else in verl's
    forward reads them afterwards; autograd's version counter would refuse it otherwise).
    """
    z = logits.squeeze(0) if logits.dim() == 3 else logits
    inplace = z.requires_grad and torch.is_grad_enabled()
    out = token_logprobs(z, labels, temperature=_scalar_temperature(temperature), return_entropy=entropy,
                         inplace_backward=inplace)
    if entropy:
        return out[0], out[1]
    assert isinstance(out, torch.Tensor)  # return_entropy is a run-time bool here: narrow the union
    return out, None


def logprobs_from_hidden(
    hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, *, temperature: Any, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp [N], H [N] or None)`` from the lm_head's input ``[..., N, H]``, its weight ``[V, H]`` and bias."""
    h = hidden.reshape(-1, hidden.shape[-1])
    out = token_logprobs_from_hidden(h, lm_head.weight, labels, bias=lm_head.bias,
                                     temperature=_scalar_temperature(temperature), return_entropy=entropy)
    if entropy:
        return out[0], out[1]
    assert isinstance(out, torch.Tensor)  # return_entropy is a run-time bool here: narrow the union
    return out, None


# Config fields of Hugging Face models that change the logits after the lm_head: the hidden path cannot see them.
_LOGIT_TRANSFORMS = (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))


def output_linear(model: nn.Module) -> nn.Linear:
    """The model's lm_head as a plain ``nn.Linear`` (what the hidden path computes with), or a ``ValueError``
    saying why not: a LoRA-adapted or wrapped lm_head, or a model that transforms its logits after it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"actor_rollout_ref.flowrl.logprobs=hidden needs the model's lm_head as a plain nn.Linear, got "
            f"{type(head).__name__} (e.g. a LoRA-adapted lm_head): use logprobs=logits or framework"
        )
    config: Any = getattr(model, "config", None)  # a transformers PretrainedConfig, or None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in _LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value is not None and value != neutral:
            raise ValueError(
                f"actor_rollout_ref.flowrl.logprobs=hidden cannot apply the model's {name}={value} (it changes the "
                "logits after the lm_head): use logprobs=logits or framework"
            )
    return head


class LMHeadLogprobs:
    """The lm_head computes log-probs instead of logits for one armed forward (the ``"hidden"`` path).

    Installed on the (unwrapped) lm_head before FSDP wraps the model: its ``forward`` becomes this object's. An
    armed call (`arm`: labels ``[N]``, temperature, entropy) returns ``[..., N, 1]`` log-probs (``[..., N, 2]``:
    log-probs, entropies) *as the logits*; any other call is the plain ``Linear`` forward. Running inside the
    lm_head's own forward means FSDP (1 or 2) has gathered its weight, whichever unit holds it; returning the
    log-probs as the module's output keeps them on the path FSDP hooks for backward (it gathers the weight
    again there), which a side channel would not. `split` reads them back from the model's ``logits``.
    """

    def __init__(self, lm_head: nn.Linear) -> None:
        self.lm_head = lm_head
        self._request: tuple[torch.Tensor, Any, bool] | None = None
        self._served = False
        # replacing this instance's forward is the point (mypy refuses method assignment; the parameter names
        # differ: Linear's `input`, `hidden` here)
        lm_head.forward = self._forward  # type: ignore[method-assign, assignment]

    def arm(self, labels: torch.Tensor, temperature: Any, entropy: bool) -> None:
        self._request, self._served = (labels, _scalar_temperature(temperature), bool(entropy)), False

    def disarm(self) -> None:
        self._request, self._served = None, False

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request, self._request = self._request, None
        if request is None:
            return type(self.lm_head).forward(self.lm_head, hidden)
        labels, temperature, entropy = request
        logp, ent = logprobs_from_hidden(hidden, self.lm_head, labels, temperature=temperature, entropy=entropy)
        self._served = True
        columns = [logp, ent] if ent is not None else [logp]
        return torch.stack(columns, dim=-1).reshape(*hidden.shape[:-1], len(columns))

    def split(self, logits: torch.Tensor, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logp [N], H [N] or None)`` from the model output an armed forward produced."""
        served, self._served = self._served, False
        self._request = None
        if not served:
            raise RuntimeError("the model's forward did not call its lm_head: no log-probs for logprobs=hidden")
        z = logits.reshape(-1, logits.shape[-1])
        return z[:, 0], (z[:, 1] if entropy else None)

"""FlowRL in OpenRLHF (``openrlhf>=0.11``, tested with 0.11.2): a ``PolicyLoss`` twin, a trainer subclass, the
actor's log-prob paths, Ray workers and a launcher. See ``docs/adapters/openrlhf.md``.

OpenRLHF has no loss registry. ``ActorPPOTrainer.training_step`` runs the actor forward and calls its
``actor_loss_fn``; this package translates that call into `flowloss.trajectory_balance_loss`::

    delta_i = log Z_phi(x_i) + mean_t log pi_theta(y_it) - beta * r_hat_i - mean_t log pi_ref(y_it)
    loss    = sum_i w_i delta_i^2 / (global_batch_size / dp_size)

One job per module:

* `config` - `FlowRLConfig` (the loss's, the head's and four OpenRLHF options);
* `loss` - `FlowRLPolicyLoss`: the loss call (OpenRLHF's ``PolicyLoss`` signature);
* `logprobs` - the log-prob call: ``--flowrl.logprobs`` ``framework`` / ``logits`` / ``hidden`` in the actor;
* `trainer` - `FlowRLActorPPOTrainer`, `enable_flowrl`: log Z from the decoder's hidden states;
* `worker` - `FlowRLPolicyModelActor`, `FlowRLReferenceModelActor` (Ray, one GPU each);
* `launcher` - `main`: ``python -m flowloss.adapters.openrlhf`` (OpenRLHF's ``train_ppo_ray``);
* `_compat` - every patch of OpenRLHF's internals, with the versions it was written for.

`FlowRLConfig` and `FlowRLPolicyLoss` import without OpenRLHF's GPU-only dependencies; the other names import
their module on first use (and raise an ImportError naming the missing package when it cannot).
"""

from __future__ import annotations

import importlib
from typing import Any

from flowloss.adapters.openrlhf import _compat

if _compat.openrlhf_version() is None:
    raise ImportError(_compat.missing_package_message("openrlhf"), name="openrlhf")

from flowloss.adapters.common import (
    AdapterConfig,
    Extra,
    HiddenStateCapture,
    attach_log_z_head,
    find_log_z_head,
    global_normalizer,
    log_z_head_detached,
)
from flowloss.adapters.openrlhf.config import ENTROPY_ERROR, FlowRLConfig, LogProbsPath, RewardSource
from flowloss.adapters.openrlhf.loss import FlowRLPolicyLoss, _MicroBatch

__all__ = [
    "FlowRLActor",
    "FlowRLActorPPOTrainer",
    "FlowRLConfig",
    "FlowRLPolicyLoss",
    "FlowRLPolicyModelActor",
    "FlowRLReferenceModelActor",
    "attach_log_z_head",
    "enable_flowrl",
    "find_log_z_head",
    "flowrl_on_prepare",
    "log_z_head_detached",
    "main",
    "use_flowrl_logprobs",
]

# name -> (module, attribute): imported on first use (these modules import OpenRLHF's trainer, and with it
# flash-attn and vllm). The underscored names are those of the single-module adapter of 0.1.
_LAZY: dict[str, tuple[str, str]] = {
    "FlowRLActor": ("logprobs", "FlowRLActor"),
    "use_flowrl_logprobs": ("logprobs", "use_flowrl_logprobs"),
    "FlowRLActorPPOTrainer": ("trainer", "FlowRLActorPPOTrainer"),
    "enable_flowrl": ("trainer", "enable_flowrl"),
    "_setup": ("trainer", "_setup"),
    "FlowRLPolicyModelActor": ("worker", "FlowRLPolicyModelActor"),
    "FlowRLPolicyModelActorImpl": ("worker", "FlowRLPolicyModelActorImpl"),
    "FlowRLReferenceModelActor": ("worker", "FlowRLReferenceModelActor"),
    "FlowRLReferenceModelActorImpl": ("worker", "FlowRLReferenceModelActorImpl"),
    "main": ("launcher", "main"),
    "_check_openrlhf_args": ("launcher", "check_openrlhf_args"),
    "_FLAG_PREFIX": ("launcher", "FLAG_PREFIX"),
    "flowrl_on_prepare": ("_compat", "flowrl_on_prepare"),
    "_head_attached_on_prepare": ("_compat", "head_attached_on_prepare"),
    "_hf_exports_without_head": ("_compat", "hf_exports_without_head"),
    "_instance_override": ("_compat", "instance_override"),
    "_KL_ADVICE": ("_compat", "_KL_ADVICE"),
    "_KL_NOTE": ("_compat", "_KL_NOTE"),
}
_ENTROPY_ERROR = ENTROPY_ERROR
_EAGER = (AdapterConfig, Extra, HiddenStateCapture, global_normalizer, LogProbsPath, RewardSource, _MicroBatch)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    except ImportError as exc:
        if (exc.name or "").startswith("flowloss"):
            raise
        raise ImportError(_compat.missing_package_message(exc.name, f"{__name__}.{name}"), name=exc.name) from exc


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

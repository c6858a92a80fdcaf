"""OpenRLHF's Ray workers with FlowRL: the policy (head, optimizer groups, trainer, exports) and the reference
(its log-prob path). GPU only: each asks Ray for one GPU, as OpenRLHF's own. Options come from
``strategy.args.flowrl`` (set by the launcher, `flowloss.adapters.openrlhf.launcher.main`)."""

from __future__ import annotations

from typing import Any

import ray
from openrlhf.trainer.ray.launcher import ReferenceModelActor
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

from flowloss.adapters.openrlhf._compat import flowrl_on_prepare, hf_exports_without_head
from flowloss.adapters.openrlhf.config import FlowRLConfig
from flowloss.adapters.openrlhf.logprobs import use_flowrl_logprobs
from flowloss.adapters.openrlhf.trainer import enable_flowrl

__all__ = [
    "FlowRLPolicyModelActor",
    "FlowRLPolicyModelActorImpl",
    "FlowRLReferenceModelActor",
    "FlowRLReferenceModelActorImpl",
]


def _config(strategy: Any) -> FlowRLConfig:
    return FlowRLConfig.from_any(getattr(strategy.args, "flowrl", None))


class FlowRLPolicyModelActorImpl(PolicyModelActor.__ray_metadata__.modified_class):
    """OpenRLHF's policy worker with the head attached before DeepSpeed (in its own optimizer groups with
    ``--flowrl.log_z_lr``) and the trainer swapped for FlowRL's.

    The head is in the DeepSpeed checkpoints and left out of every HF export (``save_model`` and
    ``save_checkpoint``'s ``--ckpt.save_hf``).
    """

    def init_model_from_pretrained(self, strategy: Any, pretrain: str, max_steps: Any = None,
                                   vllm_engines: Any = None) -> None:
        config = _config(strategy)
        with flowrl_on_prepare(strategy, config):
            super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        enable_flowrl(self.trainer, config)

    def save_model(self) -> None:
        with hf_exports_without_head(self.strategy):
            super().save_model()

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """OpenRLHF's checkpoint: the DeepSpeed state keeps the head (``--ckpt.load_enable`` resumes it), the
        ``{tag}_hf`` export of ``--ckpt.save_hf`` (``strategy.save_model`` called directly) leaves it out."""
        with hf_exports_without_head(self.strategy):
            super().save_checkpoint(*args, **kwargs)


class FlowRLReferenceModelActorImpl(ReferenceModelActor.__ray_metadata__.modified_class):
    """OpenRLHF's reference worker whose log-probs take the path ``--flowrl.logprobs`` (no gradient)."""

    def init_model_from_pretrained(self, strategy: Any, pretrain: str) -> None:
        super().init_model_from_pretrained(strategy, pretrain)
        use_flowrl_logprobs(self.model, _config(strategy).logprobs)


FlowRLPolicyModelActor = ray.remote(num_gpus=1)(FlowRLPolicyModelActorImpl)
FlowRLReferenceModelActor = ray.remote(num_gpus=1)(FlowRLReferenceModelActorImpl)

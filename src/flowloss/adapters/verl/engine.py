"""`FlowRLFSDPEngine`: verl's FSDP language-model engine with the log-Z head and flowloss's log-prob paths.

It overrides these steps of verl's ``FSDPEngineWithLMHead`` (0.9.1; see `_compat`):

* ``_build_module``: verl's Hugging Face model, plus the head (`attach_log_z_head`) before FSDP wrapping, so the
  optimizer and the checkpoint manager see it; resolves ``logprobs`` for the device;
* ``_build_lora_module``: verl's LoRA step (``get_peft_model``) runs with the head detached, so PEFT neither
  freezes the head nor puts adapters into its Linear layers; the head stays fully trainable;
* ``_build_fsdp_module``: for ``logprobs="hidden"``, the lm_head computes log-probs (`LMHeadLogprobs`) before
  FSDP wraps the model;
* ``_build_optimizer``: with ``log_z_lr``, the head's parameters in their own group at that learning rate
  (`flowloss.adapters.common.log_z_param_groups`, then verl's ``build_optimizer``);
* ``prepare_model_inputs`` / ``prepare_model_outputs``: the prompt layout for the head, ``model_output["log_z"]``,
  and for ``"logits"`` / ``"hidden"`` the log-probs (and entropy when verl computes it) from flowloss's ops in
  verl's packed layout, gathered and unpadded as verl's own;
* ``get_per_tensor_param`` / ``get_per_tensor_param_shard``: the head is left out of the weight sync to the
  rollout engine (full and delta: ``get_per_tensor_param_delta_shard`` and ``prime_delta_snapshots`` read the
  shard export).
"""

from __future__ import annotations

import functools
from typing import Any

from flowloss.adapters.common import log_z_head_detached, log_z_param_groups, without_log_z_head
from flowloss.adapters.verl import _compat
from flowloss.adapters.verl.config import FLOWRL_NODE, FlowRLConfig
from flowloss.adapters.verl.head import attach_log_z_head, prompt_and_sequence_lengths
from flowloss.adapters.verl.logprobs import (
    LMHeadLogprobs,
    logprobs_from_logits,
    output_linear,
    resolve_logprobs,
)

__all__ = ["FlowRLEngineMixin", "engine_class"]


# verl's engine class is chosen at run time (`engine_class`): to a type checker the mixin's base is Any, so that its
# super() calls and verl's attributes (model_config, engine_config, ...) type-check; at run time it is object.
_VerlEngine: Any = object


class FlowRLEngineMixin(_VerlEngine):
    """Adds the log-Z head and flowloss's log-prob paths to verl's FSDP language-model engine (module docs)."""

    flowrl_config: FlowRLConfig = FlowRLConfig()

    # -- build ------------------------------------------------------------------------------------------------

    def _build_module(self):
        module = super()._build_module()
        flowrl = self.flowrl_config
        fused = bool(getattr(self.model_config, "use_fused_kernels", False))
        path = resolve_logprobs(flowrl.logprobs, _compat.device_type())
        if flowrl.logprobs == "auto" and (fused or not getattr(self, "use_remove_padding", True)):
            path = "framework"  # the user chose verl's fused kernels, or the padded layout: verl's own path
        if path != "framework" and fused:
            raise ValueError(
                f"{FLOWRL_NODE}.logprobs={path} with actor_rollout_ref.model.use_fused_kernels=True: the model would "
                "return verl's fused log-probs, not logits; choose one"
            )
        if path == "hidden" and flowrl.logprobs == "auto":
            try:
                output_linear(module)
            except ValueError:
                path = "logits"  # the model's lm_head is not a plain Linear: the logits path serves it
        self._flowrl_logprobs = path
        if flowrl.log_z == "head":
            self._flowrl_head, self._flowrl_ctx = attach_log_z_head(module, flowrl)
        return module

    def _build_lora_module(self, module):
        # get_peft_model freezes every parameter that is not an adapter and, with target_modules="all-linear",
        # adds adapters to the head's Linear layers: build the PEFT model without the head, then put it back.
        if getattr(self, "_flowrl_head", None) is None:
            return super()._build_lora_module(module)
        with log_z_head_detached(module):
            return super()._build_lora_module(module)

    def _build_fsdp_module(self, module):
        if getattr(self, "_flowrl_logprobs", "framework") == "hidden":
            self._flowrl_lm_head = LMHeadLogprobs(output_linear(module))
        return super()._build_fsdp_module(module)

    def _build_optimizer(self, module):
        lr = self.flowrl_config.log_z_head.lr
        if lr is None or getattr(self, "_flowrl_head", None) is None:
            return super()._build_optimizer(module)
        if _compat.is_fsdp1(module) and not getattr(self.engine_config, "use_orig_params", False):
            raise ValueError(
                f"{FLOWRL_NODE}.log_z_lr={lr}: FSDP1 flattens the head's parameters into the model's, so they "
                "cannot get their own learning rate; set actor_rollout_ref.actor.fsdp_config.use_orig_params=True "
                "or actor_rollout_ref.actor.strategy=fsdp2"
            )
        return _compat.build_optimizer(log_z_param_groups(module, lr), self.optimizer_config)

    # -- forward ----------------------------------------------------------------------------------------------

    def prepare_model_inputs(self, micro_batch):
        ctx = getattr(self, "_flowrl_ctx", None)
        path = getattr(self, "_flowrl_logprobs", "framework")
        if ctx is not None or path != "framework":
            what = "the log-Z head" if path == "framework" else f"{FLOWRL_NODE}.logprobs={path}"
            if not _compat.non_tensor(micro_batch, "use_remove_padding", True):
                raise ValueError(f"FlowRLFSDPEngine: {what} needs use_remove_padding=True (the packed layout)")
            if getattr(self, "use_ulysses_sp", False):
                raise ValueError(
                    f"FlowRLFSDPEngine does not support Ulysses sequence parallelism with {what} (the head would "
                    "pool only each rank's slice of the prompt); set ulysses_sequence_parallel_size=1"
                )
        if path != "framework":
            for key in ("use_fused_kernels", "distillation_use_topk", "distillation_only",
                        "calculate_sum_pi_squared"):
                if _compat.non_tensor(micro_batch, key, False):
                    raise ValueError(
                        f"FlowRLFSDPEngine: {key}=True needs verl's own log-prob path; set "
                        f"{FLOWRL_NODE}.logprobs=framework"
                    )
        if ctx is not None:
            ctx.set_layout(*prompt_and_sequence_lengths(micro_batch))
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        if path == "hidden":
            self._flowrl_lm_head.arm(output_args["input_ids_rmpad_rolled"], micro_batch["temperature"],
                                     _compat.non_tensor(micro_batch, "calculate_entropy", False))
        return model_inputs, output_args

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        path = getattr(self, "_flowrl_logprobs", "framework")
        if path == "framework":
            model_output = super().prepare_model_outputs(
                output, output_args, micro_batch, logits_processor_func
            )
        else:
            model_output = self._flowrl_model_outputs(path, output, output_args, micro_batch)
        ctx = getattr(self, "_flowrl_ctx", None)
        if ctx is not None:
            # One layout per forward: any other forward of the module (generation, a probe) runs no head.
            log_z = ctx.take_log_z()
            if log_z is not None:
                model_output["log_z"] = log_z
        return model_output

    def forward_step(self, micro_batch, loss_function, forward_only):
        loss, output = super().forward_step(micro_batch, loss_function, forward_only)
        # log_z [B] is for the loss only: verl's postprocess_batch_func concatenates every model output as a
        # nested [B, j] tensor (compute_log_prob, compute_ref_log_prob) and cannot take a [B] one.
        model_output = output.get("model_output") if isinstance(output, dict) else None
        if isinstance(model_output, dict):
            model_output.pop("log_z", None)
        return loss, output

    def _flowrl_model_outputs(self, path: str, output: Any, output_args: dict, micro_batch: Any) -> dict:
        """``log_probs`` (and ``entropy``) as nested ``[B, j]`` tensors, the layout verl's outputs have."""
        import torch
        from torch.distributed.tensor import DTensor

        entropy = bool(_compat.non_tensor(micro_batch, "calculate_entropy", False))
        logits = output.logits
        if path == "hidden":  # the lm_head returned [1, N, 1 or 2]: log-probs (and entropies)
            log_probs, entropy_rmpad = self._flowrl_lm_head.split(logits, entropy)
        else:
            if isinstance(logits, DTensor):  # tensor parallelism shards the vocabulary
                logits = logits.full_tensor()
            log_probs, entropy_rmpad = logprobs_from_logits(logits, output_args["input_ids_rmpad_rolled"],
                                                            temperature=micro_batch["temperature"], entropy=entropy)
        pad_size = output_args["pad_size"]
        cu_seqlens = micro_batch["input_ids"].offsets()
        log_probs = _compat.gather_and_unpad(self, log_probs, pad_size)
        out = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, cu_seqlens)}
        if entropy:
            assert entropy_rmpad is not None
            entropy_rmpad = _compat.gather_and_unpad(self, entropy_rmpad, pad_size)
            out["entropy"] = torch.nested.nested_tensor_from_jagged(entropy_rmpad, cu_seqlens)
        return out

    # -- weight sync --------------------------------------------------------------------------------------------

    def get_per_tensor_param(self, *args, **kwargs):
        params, peft_config = super().get_per_tensor_param(*args, **kwargs)
        return without_log_z_head(params), peft_config

    def get_per_tensor_param_shard(self, *args, **kwargs):
        # The delta checkpoint engine's export: verl's get_per_tensor_param_delta_shard and
        # prime_delta_snapshots both read their shards from this method, so filtering here covers them.
        params, peft_config = super().get_per_tensor_param_shard(*args, **kwargs)
        return without_log_z_head(params), peft_config


@functools.lru_cache(maxsize=1)
def engine_class() -> type:
    """``FlowRLFSDPEngine``: `FlowRLEngineMixin` on verl's ``FSDPEngineWithLMHead`` (built on first use, so that
    importing the adapter does not import verl's engine)."""
    cls = type("FlowRLFSDPEngine", (FlowRLEngineMixin, _compat.engine_base()), {"__module__": "flowloss.adapters.verl"})
    cls.__doc__ = FlowRLEngineMixin.__doc__
    return cls

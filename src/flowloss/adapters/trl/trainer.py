"""``FlowRLTrainer``: ``GRPOTrainer`` with FlowRL's loss, the log-Z head and flowloss's log-prob paths.

The reference log-probs: TRL loads a reference model (a frozen copy of the initial policy; with PEFT, the base
model with adapters disabled) and computes ``ref_per_token_logps`` only when its KL coefficient ``beta`` is
non-zero. FlowRL needs ``pi_ref`` but has no separate KL term, so ``FlowRLConfig`` requires TRL's ``beta = 0``
and ``FlowRLTrainer`` reports a non-zero ``beta`` to TRL's reference-model code only (it overrides the loss,
where TRL would have added ``beta * KL``). Set the reward temperature with ``flowrl_beta``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from trl import GRPOTrainer

from flowloss import count_valid_sequences, pool_prompt_hidden_states
from flowloss.adapters.common import (
    HiddenStateCapture,
    attach_log_z_head,
    global_normalizer,
    load_log_z_head,
    save_log_z_head,
    split_log_z_head_groups,
    split_log_z_head_state,
    unwrap_model,
)
from flowloss.adapters.trl import _compat
from flowloss.adapters.trl.config import FlowRLConfig
from flowloss.adapters.trl.logprobs import FlowlossLMHead, hidden_path_problem, resolve_logprob_path
from flowloss.adapters.trl.loss import NUM_SEQUENCES_KEY, flowrl_loss_from_grpo_inputs

__all__ = ["FlowRLTrainer"]

# Stats of `trajectory_balance_loss` logged as `flowrl/<name>`.
_LOGGED_STATS = ("residual_mean", "residual_abs_mean", "log_z_mean", "logprobs_mean", "ref_logprobs_mean",
                 "weight_mean", "clip_frac", "token_clip_frac")
# Multimodal inputs TRL's batch may carry, passed through to the policy's forward unchanged.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _checkpoint_dir(model: Any) -> str | None:
    import os

    if isinstance(model, str):
        return model if os.path.isdir(model) else None
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return path if isinstance(path, str) and os.path.isdir(path) else None


def _give_head_its_own_group(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float | None) -> None:
    """Move the log-Z head's parameters out of ``optimizer``'s groups into groups of their own at ``lr``.

    Each group that held head parameters gives them to a new group with the same options (weight decay, betas,
    ...) and ``lr`` (`flowloss.adapters.common.split_log_z_head_groups`). A head that is in no group yet (an
    optimizer built before the head existed) gets one group with the optimizer's defaults.
    """
    rest, head = split_log_z_head_groups(optimizer.param_groups, model, lr)
    for group, kept in zip(optimizer.param_groups, rest):
        group["params"] = kept["params"]
    if not head:  # the head's trainable parameters, split off a group of every parameter without options
        head = split_log_z_head_groups([{"params": model.parameters()}], model, lr)[1]
    for group in head:
        optimizer.add_param_group(group)


class FlowRLTrainer(GRPOTrainer):
    """``GRPOTrainer`` with FlowRL's trajectory-balance loss and a learned ``log Z`` head.

    Arguments are ``GRPOTrainer``'s; ``args`` must be a `FlowRLConfig`. ``model`` is a path (or hub id) or a
    model object (``Qwen2ForCausalLM(config)``, a checkpoint changed in memory, a ``PeftModel``).

    The reference ``pi_ref`` is a frozen copy of the policy as given to the trainer, taken before training;
    with ``peft_config`` it is the base model with the adapter disabled (the policy as given: LoRA starts at
    zero), and for a ``PeftModel`` with a trained adapter a frozen copy of that adapter. ``ref_model`` (a model
    or a path) replaces it.

    The head (`flowloss.LogZHead` on the policy's mean last hidden state over the prompt tokens; gradients
    flow into the policy) is attached to the policy as ``model.flowrl_log_z_head`` so the optimizer trains it:
    with the policy's learning rate, as the authors do, or in its own group at ``flowrl_log_z_lr``. Checkpoints
    hold it as ``flowrl_log_z_head.safetensors`` beside the model files; it is reloaded on
    ``train(resume_from_checkpoint=...)`` (a checkpoint without it is refused) and when the model is loaded from
    a directory holding that file. It is never sent to vLLM.

    Every log-prob (policy, old policy, reference) goes through ``args.flowrl_logprobs``
    (`flowloss.adapters.trl.logprobs`); ``self.logprob_path`` is the resolved path.
    """

    _name = "FlowRL"
    _tag_names: ClassVar[list[str]] = ["trl", "flowrl", "flowloss"]
    # What TRL's Trainer declares more widely (TrainingArguments; a model or None): __init__ refuses other
    # `args`, and GRPOTrainer always holds a model (it loads one given by name).
    args: FlowRLConfig
    model: nn.Module

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: FlowRLConfig | None = None,
        *,
        ref_model: nn.Module | str | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            from transformers.utils import is_torch_bf16_gpu_available

            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            # TRL's default is bf16=True, which TrainingArguments refuses without a bf16 GPU: float32 there.
            bf16: dict[str, Any] = {} if is_torch_bf16_gpu_available() else {"bf16": False}
            args = FlowRLConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-FlowRL", **bf16)
        if not isinstance(args, FlowRLConfig):
            raise TypeError(f"`args` must be a FlowRLConfig (FlowRL's options), got {type(args).__name__}")
        if ref_model is not None and (_compat.is_peft_model(model) or kwargs.get("peft_config") is not None):
            raise ValueError("`ref_model` cannot be combined with PEFT: the reference is the adapter-free model")
        path = resolve_logprob_path(args.flowrl_logprobs, args.device)
        if not isinstance(model, str) and _compat.is_peft_model(model):
            _compat.copy_peft_adapter_as_reference(model)
        # The logits path runs lm_head's own forward, so a PEFT adapter there is exact (TRL refuses it because its
        # fused head reads lm_head.weight); the hidden path refuses it below, naming the logits path. TRL's own
        # refusal stays for its head and for cast_lm_head_to_fp32, which cannot carry an adapter either way.
        lift = path in ("logits", "hidden") and not args.cast_lm_head_to_fp32
        with _compat.reference_policy(self, model, ref_model), _compat.allow_adapter_on_lm_head(lift):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)

        models = [unwrap_model(m) for m in (self.model, self.ref_model) if m is not None]
        if path == "hidden" and (problem := next(filter(None, map(hidden_path_problem, models)), None)):
            if args.flowrl_logprobs != "auto":
                raise ValueError(f"flowrl_logprobs='hidden' cannot be used: {problem}. Use 'logits' or 'framework'.")
            # "auto": the exact path next in line -- the model's own lm_head forward for an adapter on lm_head
            # (TRL's head would drop it), TRL's head otherwise (softcapping, ZeRO-3).
            policy_hf: Any = models[0]  # a transformers PreTrainedModel (nn.Module types attributes Tensor | Module)
            path = "logits" if _compat.is_adapter_layer(policy_hf.get_output_embeddings()) else "framework"
        self.logprob_path = path
        self.logprob_head = FlowlossLMHead(path, temperature=self.temperature,
                                           cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        for hf in models:
            self.logprob_head.install(hf)

        policy = self.model
        head = attach_log_z_head(policy, args.flowrl_log_z_head)
        source = _checkpoint_dir(model)
        if source is not None:
            load_log_z_head(head, source)
        self.log_z_head = head
        self._hidden_states = HiddenStateCapture(policy)
        if self.optimizer is not None:  # passed in `optimizers=`: built before the head existed
            _give_head_its_own_group(self.optimizer, self.model, args.flowrl_log_z_lr)
        _compat.headless_sync_ref_callbacks(self)
        if self.accelerator.num_processes > 1:
            _compat.destroy_process_group_at_exit()
        if self.use_vllm:
            _compat.exclude_from_weight_sync(self.vllm_generation)

    # TRL loads the reference model and computes `ref_per_token_logps` only when its KL coefficient
    # `self.beta` is non-zero, and adds `beta * KL` only in `_compute_loss`, which FlowRL replaces.
    # FlowRLConfig pins `args.beta = 0`; TRL's code sees 1.0 here so it provides pi_ref.
    @property
    def beta(self) -> float:
        return 1.0

    @beta.setter
    def beta(self, value: float) -> None:
        if value != 0.0:
            raise ValueError(f"TRL's KL `beta` must be 0.0 with FlowRL, got {value!r}")

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer``, then the log-Z head in groups of its own at ``flowrl_log_z_lr`` (if set)."""
        built = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if built and self.args.flowrl_log_z_lr is not None:
            _give_head_its_own_group(optimizer, self.model if model is None else model, self.args.flowrl_log_z_lr)
        return optimizer

    def _get_per_token_logps_and_entropies(self, model: nn.Module, input_ids: torch.Tensor,
                                           attention_mask: torch.Tensor, logits_to_keep: int,
                                           batch_size: int | None = None, compute_entropy: bool = False,
                                           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        # TRL's own method (chunking, multimodal inputs, the fused-head call); the log-prob path learns how many
        # completion tokens it keeps and whether it reads entropies.
        with self.logprob_head.request(logits_to_keep, compute_entropy):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, **kwargs,
            )

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mask = output["completion_mask"]
        if output.get("tool_mask") is not None:
            mask = mask * output["tool_mask"]
        local = count_valid_sequences(mask).reshape(1)
        # 0-dim: TRL's shuffle and split hand it unchanged to every micro-batch of this generation batch.
        output[NUM_SEQUENCES_KEY] = self.accelerator.gather(local).sum()
        return output

    def _log_z(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool_prompt_hidden_states(
            hidden_states, prompt_mask, drop_last_token=self.args.flowrl_log_z_drop_last_prompt_token
        )
        return self.log_z_head(pooled)

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # One forward: the log-probs (through the chosen path) and, by the decoder's hook, the hidden states.
        with self._hidden_states.capturing():
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{key: inputs.get(key) for key in _MULTIMODAL_KEYS},
            )
        hidden = self._hidden_states.pop()
        log_z = self._log_z(hidden[:, : prompt_ids.size(1)], prompt_mask)

        mode = "train" if self.model.training else "eval"
        mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        total = inputs.get(NUM_SEQUENCES_KEY)
        if total is None:  # a batch not built by this trainer: the local count, as if every rank held as many
            total = count_valid_sequences(mask) * self.accelerator.num_processes
            total = total * self.args.steps_per_generation
        scale = self.current_gradient_accumulation_steps / self.args.steps_per_generation if mode == "train" else 1
        normalizer = global_normalizer(total, self.accelerator.num_processes, accumulation_scale=scale)
        rollout = None
        sampling = inputs.get("sampling_per_token_logps")
        old = inputs.get("old_per_token_logps")
        tis = self.use_vllm and self.vllm_importance_sampling_correction
        if tis and sampling is not None and old is not None:
            # Tokens vLLM could not score (NaN) get ratio 1.
            rollout = torch.where(torch.isnan(sampling), old, sampling)
        loss, stats = flowrl_loss_from_grpo_inputs(
            per_token_logps, log_z, inputs, self.args.flowrl_options, normalizer=normalizer, rollout_logprobs=rollout
        )
        if self.aux_loss_enabled:
            aux_scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / aux_scale
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        metrics = self._metrics[mode]
        totals = torch.stack([(entropies * mask).sum(), mask.sum()]).detach().float()
        totals = self.accelerator.reduce(totals, reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        for key in _LOGGED_STATS:
            if key in stats:
                value = stats[key].detach().float().reshape(1)
                metrics[f"flowrl/{key}"].append(self.accelerator.gather(value).mean().item())
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.model.state_dict()
        model_state, head_state = split_log_z_head_state(state_dict)
        super()._save(output_dir, state_dict=model_state)
        save_log_z_head(head_state or self.log_z_head.state_dict(), output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        _compat.reload_top_level_adapter(model if model is not None else self.model, resume_from_checkpoint)
        # Resuming without the head would go on with a fresh head and the old optimizer state: refuse, naming the file.
        load_log_z_head(self.log_z_head, resume_from_checkpoint, required=True)

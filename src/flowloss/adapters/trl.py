"""FlowRL in TRL: ``FlowRLTrainer`` (a ``GRPOTrainer`` subclass) and ``FlowRLConfig`` (a ``GRPOConfig``).

A GRPO script switches to FlowRL by changing the trainer and config classes::

    from flowloss.adapters.trl import FlowRLConfig, FlowRLTrainer
    args = FlowRLConfig(output_dir="out", num_generations=8, flowrl_beta=15.0)
    trainer = FlowRLTrainer(model="Qwen/Qwen2.5-0.5B", reward_funcs=my_reward, args=args, train_dataset=ds)

TRL generates, scores and batches exactly as for GRPO; only the loss is replaced. For each micro-batch
(``B`` completions of ``T`` tokens, prompts of ``P`` tokens) the trainer computes::

    delta_i = log Z_phi(x_i) + mean_t log pi_theta(y_it) - flowrl_beta * r_hat_i - mean_t log pi_ref(y_it)
    loss    = sum_i w_i * delta_i^2 / (N / W)          (x G / S when training)

with everything taken from TRL's batch: ``log pi_theta [B, T]`` from the policy's forward,
``log pi_ref [B, T]`` = ``ref_per_token_logps``, ``r_hat [B]`` = ``advantages`` (TRL's group z-score of the
summed rewards), ``w [B]`` from ``old_per_token_logps`` when TRL keeps them (off-policy; ``w = 1``
on-policy), and ``log Z_phi(x) [B]`` from a `LogZHead` on the prompt's mean last hidden
state. ``N`` is the number of valid sequences in the whole generation batch over all ``W`` processes,
``G`` the gradient accumulation steps and ``S`` TRL's ``steps_per_generation``: with the default ``S = G``
the gradients of an optimizer step are those of the mean over every sequence of the step (data-parallel
ranks average their gradients). The math is `flowloss.trajectory_balance_loss`; this module only
translates.

Reference log-probs: TRL loads a reference model (a frozen copy of the initial policy; with PEFT, the base
model with adapters disabled) and computes ``ref_per_token_logps`` only when its KL coefficient ``beta`` is
non-zero.
FlowRL needs ``pi_ref`` but has no separate KL term, so ``FlowRLConfig`` requires TRL's ``beta = 0`` and
``FlowRLTrainer`` reports a non-zero ``beta`` to TRL's reference-model code only (it overrides the loss, where
TRL would have added ``beta * KL``). Set the reward temperature with ``flowrl_beta``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from flowloss import FlowRLOptions, count_valid_sequences, pool_prompt_hidden_states, trajectory_balance_loss
from flowloss.adapters.common import (
    LOG_Z_HEAD_FILE,
    LOG_Z_HEAD_NAME,
    HiddenStateCapture,
    LogZHeadOptions,
    attach_log_z_head,
    check_adapter_options,
    global_normalizer,
    load_log_z_head,
    save_log_z_head,
    split_log_z_head_state,
)

__all__ = [
    "LOG_Z_HEAD_FILE",
    "LOG_Z_HEAD_NAME",
    "NUM_SEQUENCES_KEY",
    "FlowRLConfig",
    "FlowRLTrainer",
    "exclude_from_weight_sync",
    "flowrl_loss_from_grpo_inputs",
]

# Valid sequences in the whole generation batch, over all processes (a 0-dim tensor added to TRL's batch).
NUM_SEQUENCES_KEY = "flowrl_num_sequences"

# Stats of `trajectory_balance_loss` logged as `flowrl/<name>`.
_LOGGED_STATS = ("residual_mean", "residual_abs_mean", "log_z_mean", "logprobs_mean", "ref_logprobs_mean",
                 "weight_mean", "clip_frac", "token_clip_frac")
_LOSS = FlowRLOptions()
_HEAD = LogZHeadOptions()
# GRPO options FlowRL's loss never reads: refused unless left at GRPOConfig's default (name, default, why).
_GRPO_ONLY = (
    ("loss_type", "dapo", "FlowRL replaces the GRPO loss and its aggregation (a mean over sequences)"),
    ("importance_sampling_level", "token",
     "FlowRL's importance weight is set by `flowrl_importance_weights` (sequence-level by default)"),
    ("delta", None, "two-sided GRPO clipping does not apply to FlowRL's weight"),
    ("entropy_coef", 0.0, "an entropy bonus would change FlowRL's objective"),
    ("use_adaptive_entropy", False, "an entropy bonus would change FlowRL's objective"),
    ("top_entropy_quantile", 1.0, "FlowRL's residual uses every completion token"),
    ("off_policy_mask_threshold", None, "FlowRL does not mask off-policy sequences; it clips their weight"),
)


_TRL_NAMES = {"eps_low": "epsilon", "eps_high": "epsilon_high"}


def _trl_names(message: str) -> str:
    """A core error message with TRL's field names: `eps_low` -> `epsilon`, `beta` -> `flowrl_beta`, ..."""
    return re.sub(r"`([a-z_]+)`", lambda m: f"`{_TRL_NAMES.get(m.group(1), 'flowrl_' + m.group(1))}`", message)


@dataclass
class FlowRLConfig(GRPOConfig):
    """``GRPOConfig`` plus FlowRL's options (every TRL option keeps its meaning unless listed here).

    The loss options are those of `flowloss.FlowRLOptions` with TRL's ``flowrl_`` prefix, the clip range is
    TRL's own ``epsilon`` (0.2) / ``epsilon_high`` (0.28 here, the authors' value); ``flowrl_options`` returns
    them as one ``FlowRLOptions`` (the one translation from TRL's names), ``flowrl_log_z_head`` the head's
    `flowloss.adapters.common.LogZHeadOptions`:

    * ``flowrl_beta`` (15): reward temperature, > 0 (a negative beta prefers low rewards, zero ignores them).
    * ``flowrl_importance_weights`` (None: ``"sequence_clipped"``, the paper's ``clip(pi/pi_old, 1 - eps,
      1 + eps)``): used when TRL keeps ``old_per_token_logps`` (off-policy: ``num_iterations > 1`` or
      ``steps_per_generation > gradient_accumulation_steps``, or vLLM); on-policy the weight is exactly 1.
    * ``flowrl_max_weight`` (10), ``flowrl_tis_cap`` (2, truncated IS against vLLM's sampling log-probs when
      ``use_vllm`` and ``vllm_importance_sampling_correction``), ``flowrl_token_clip_mask`` (False),
      ``flowrl_length_normalization`` (True), ``flowrl_penalty`` (``"squared"``), ``flowrl_linex_alpha``,
      ``flowrl_huber_delta``.
    * ``flowrl_log_z_num_layers`` (3), ``flowrl_log_z_dropout`` (0.1), ``flowrl_log_z_init`` (0.0),
      ``flowrl_log_z_drop_last_prompt_token`` (False), ``flowrl_log_z_dtype`` (``"float32"``; None: the
      policy's dtype).

    Refused because FlowRL would silently ignore them: TRL's KL ``beta != 0`` (the reference is part of the
    residual) and, when changed from GRPOConfig's default, ``loss_type``, ``importance_sampling_level``,
    ``delta``, ``entropy_coef`` / ``use_adaptive_entropy``, ``top_entropy_quantile`` and
    ``off_policy_mask_threshold``.
    """

    epsilon_high: float | None = field(
        default=_LOSS.eps_high,
        metadata={"help": "Upper clip of FlowRL's importance weight, 1 + epsilon_high (authors: 0.28)."},
    )
    flowrl_beta: float = field(default=_LOSS.beta, metadata={"help": "FlowRL's reward temperature, > 0 (15)."})
    flowrl_importance_weights: str | None = field(
        default=_LOSS.importance_weights,
        metadata={"help": "Importance-weight mode off-policy (None: 'sequence_clipped', the paper)."},
    )
    flowrl_max_weight: float = field(default=_LOSS.max_weight, metadata={"help": "'sequence_capped' cap (10)."})
    flowrl_tis_cap: float = field(default=_LOSS.tis_cap, metadata={"help": "Truncated-IS cap with vLLM (2)."})
    flowrl_token_clip_mask: bool = field(default=_LOSS.token_clip_mask, metadata={"help": "CISPO-style mask."})
    flowrl_length_normalization: bool = field(
        default=_LOSS.length_normalization, metadata={"help": "Token-mean log-likelihoods (the paper)."}
    )
    flowrl_penalty: str = field(default=_LOSS.penalty, metadata={"help": "Penalty g(delta) ('squared')."})
    flowrl_linex_alpha: float = field(default=_LOSS.linex_alpha, metadata={"help": "a of the linex penalty."})
    flowrl_huber_delta: float = field(default=_LOSS.huber_delta, metadata={"help": "k of the huber penalty."})
    flowrl_log_z_num_layers: int = field(default=_HEAD.num_layers, metadata={"help": "Layers of the log-Z head."})
    flowrl_log_z_dropout: float = field(default=_HEAD.dropout, metadata={"help": "Dropout of the log-Z head."})
    flowrl_log_z_init: float = field(default=_HEAD.init, metadata={"help": "Initial output bias of the head."})
    flowrl_log_z_drop_last_prompt_token: bool = field(
        default=_HEAD.drop_last_prompt_token,
        metadata={"help": "Leave each prompt's last token out of the pooled hidden state."},
    )
    flowrl_log_z_dtype: str | None = field(
        default=_HEAD.dtype, metadata={"help": "dtype of the log-Z head's parameters (None: the policy's)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta != 0.0:
            raise ValueError(
                f"`beta` is TRL's KL coefficient and must stay 0.0 with FlowRL (got {self.beta!r}): the "
                "reference policy enters FlowRL's residual directly. Set the reward temperature with "
                "`flowrl_beta`."
            )
        for name, default, why in _GRPO_ONLY:
            value = getattr(self, name)
            if value != default:
                raise ValueError(
                    f"`{name}={value!r}` is a GRPO loss option that FlowRLTrainer does not apply ({why}); "
                    f"remove it (default {default!r})"
                )
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        self.flowrl_options  # noqa: B018 (validates)
        self.flowrl_log_z_head  # noqa: B018

    @property
    def flowrl_options(self) -> FlowRLOptions:
        """The loss options as one `flowloss.FlowRLOptions`: TRL's names translated, here only."""
        try:
            options = FlowRLOptions(
                beta=self.flowrl_beta,
                importance_weights=self.flowrl_importance_weights,
                eps_low=self.epsilon,
                eps_high=self.epsilon_high,
                max_weight=self.flowrl_max_weight,
                tis_cap=self.flowrl_tis_cap,
                token_clip_mask=self.flowrl_token_clip_mask,
                length_normalization=self.flowrl_length_normalization,
                penalty=self.flowrl_penalty,
                linex_alpha=self.flowrl_linex_alpha,
                huber_delta=self.flowrl_huber_delta,
            )
            return check_adapter_options(options)
        except (TypeError, ValueError) as exc:  # name the field as the user wrote it
            raise type(exc)(_trl_names(str(exc))) from None

    @property
    def flowrl_log_z_head(self) -> LogZHeadOptions:
        """The head's options as one `flowloss.adapters.common.LogZHeadOptions`."""
        try:
            return LogZHeadOptions(
                num_layers=self.flowrl_log_z_num_layers,
                dropout=self.flowrl_log_z_dropout,
                init=self.flowrl_log_z_init,
                drop_last_prompt_token=self.flowrl_log_z_drop_last_prompt_token,
                dtype=self.flowrl_log_z_dtype,
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(_trl_names(str(exc))) from None


def flowrl_loss_from_grpo_inputs(
    per_token_logps: torch.Tensor,
    log_z: torch.Tensor,
    inputs: dict[str, Any],
    options: FlowRLOptions | FlowRLConfig,
    *,
    normalizer: torch.Tensor | float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FlowRL's loss on one TRL GRPO micro-batch: a direct call of `flowloss.trajectory_balance_loss`.

    ``per_token_logps [B, T]`` (the policy's completion log-probs, with gradient), ``log_z [B]`` (with
    gradient), ``inputs`` TRL's batch: ``completion_mask [B, T]`` (times ``tool_mask`` when present),
    ``advantages [B]`` (= ``r_hat``), ``ref_per_token_logps [B, T]``, optionally
    ``old_per_token_logps [B, T]``. ``options``: the loss options (or a `FlowRLConfig`). Returns
    ``(loss, stats)``.
    """
    if isinstance(options, FlowRLConfig):
        options = options.flowrl_options
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
    ref = inputs.get("ref_per_token_logps")
    if ref is None:
        raise KeyError(
            "TRL's batch has no `ref_per_token_logps`: FlowRL needs the reference policy's log-probs. "
            "Use FlowRLTrainer (it makes TRL compute them) or add them to the batch."
        )
    advantages = inputs["advantages"]
    if advantages.dim() != 1:
        raise ValueError(
            f"`advantages` must be one value per completion ([B]) for FlowRL's r_hat, got shape "
            f"{tuple(advantages.shape)}"
        )
    old = inputs.get("old_per_token_logps")
    values = options.to_dict()
    if old is None:  # on-policy: w = 1 exactly, nothing to clip or mask
        values.update(importance_weights="none", token_clip_mask=False)
    return trajectory_balance_loss(
        per_token_logps,
        ref,
        advantages if advantages.is_floating_point() else advantages.float(),
        log_z,
        mask,
        old_logprobs=old,
        rollout_logprobs=rollout_logprobs if old is not None else None,
        normalizer=normalizer,
        return_stats=True,
        **values,
    )


def exclude_from_weight_sync(vllm_generation: Any, name_fragment: str = LOG_Z_HEAD_NAME) -> None:
    """Keep every parameter whose name contains ``name_fragment`` out of TRL's policy -> vLLM weight sync.

    TRL's ``VLLMGeneration.sync_weights`` (server and colocate modes, FSDP, DeepSpeed, PEFT) walks
    ``_iter_named_params()``; this filters that walk on the instance (the gathers still run on every rank).
    """
    original: Callable[[], Iterator[tuple[str, torch.Tensor]]] = vllm_generation._iter_named_params

    def _iter_named_params() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in original():
            if name_fragment not in name:
                yield name, param

    vllm_generation._iter_named_params = _iter_named_params


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _checkpoint_dir(model: Any) -> str | None:
    if isinstance(model, str):
        return model if os.path.isdir(model) else None
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return path if isinstance(path, str) and os.path.isdir(path) else None


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _copy_peft_adapter_as_reference(model: nn.Module) -> None:
    """A pretrained PEFT adapter: add a frozen copy named ``"ref"``, which TRL uses for ``ref_per_token_logps``.

    TRL 1.16 makes this copy only when ``args.beta != 0``, and FlowRL keeps ``args.beta = 0``: without it the
    reference would be the base model with the adapter disabled, not the policy the trainer was given.
    """
    if "ref" in model.peft_config:
        return
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)


def _reload_top_level_adapter(model: nn.Module, checkpoint_dir: str) -> None:
    """Load a PEFT checkpoint's top-level adapter into ``model``'s active adapter when sub-folders hold others.

    A run that starts from a trained adapter saves it at the top level and its frozen ``"ref"`` copy in
    ``ref/``; transformers' ``Trainer._load_from_checkpoint`` then loads only the sub-folder adapters, and a
    resumed run would silently go on from the adapter the new trainer was built with.
    """
    if not _is_peft_model(model) or not os.path.isdir(checkpoint_dir):
        return
    names = ("adapter_model.safetensors", "adapter_model.bin")
    top = any(os.path.isfile(os.path.join(checkpoint_dir, n)) for n in names)
    subfolders = any(os.path.isfile(os.path.join(checkpoint_dir, d, n)) for d in os.listdir(checkpoint_dir)
                     for n in names)
    if top and subfolders:
        model.load_adapter(checkpoint_dir, model.active_adapter, is_trainable=True)


@contextlib.contextmanager
def _reference_policy(trainer: FlowRLTrainer, model: Any, ref_model: nn.Module | str | None) -> Iterator[None]:
    """While TRL's ``__init__`` runs, hand it our reference instead of a model reloaded from the policy's path.

    TRL 1.16 builds the reference with ``create_model_from_path(config._name_or_path)``: it fails for a model
    built in memory (``_name_or_path == ""``) and silently reloads the file on disk for a model whose weights
    were changed in memory. The reference is instead a frozen copy of ``trainer.model`` taken when TRL asks
    for it (the policy as given, after ``Trainer.__init__``, before any step, head or patch), or ``ref_model``.
    """
    import trl.trainer.grpo_trainer as grpo

    original = grpo.create_model_from_path
    policy_pending = isinstance(model, str)  # TRL's first call loads the policy itself

    def create_model_from_path(model_id: str, *args: Any, **kwargs: Any) -> nn.Module:
        nonlocal policy_pending
        if policy_pending:
            policy_pending = False
            return original(model_id, *args, **kwargs)
        if isinstance(ref_model, str):
            return _frozen(original(ref_model, *args, **kwargs))
        if ref_model is not None:
            return _frozen(ref_model)
        return _frozen(copy.deepcopy(trainer.model))

    grpo.create_model_from_path = create_model_from_path
    try:
        yield
    finally:
        grpo.create_model_from_path = original


_EXIT_HOOK: list[bool] = []


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits (once per process).

    Neither ``Trainer.train`` nor accelerate destroys it (``accelerator.end_training()`` would, if the script
    called it): its gloo/TCPStore threads are then torn down by the C++ runtime after Python has finalized,
    which can abort a rank that has finished training ("terminate called without an active exception").
    Destroying the group in an ``atexit`` hook joins them while the interpreter is still alive; a script
    that destroys it itself is unaffected.
    """
    if not _EXIT_HOOK:
        _EXIT_HOOK.append(True)
        atexit.register(_destroy_process_group)


class FlowRLTrainer(GRPOTrainer):
    """``GRPOTrainer`` with FlowRL's trajectory-balance loss and a learned ``log Z`` head.

    Arguments are ``GRPOTrainer``'s; ``args`` must be a `FlowRLConfig`. ``model`` is a path (or hub id) or a
    model object (``Qwen2ForCausalLM(config)``, a checkpoint changed in memory, a ``PeftModel``).

    The reference ``pi_ref`` is a frozen copy of the policy as given to the trainer, taken before training;
    with ``peft_config`` it is the base model with the adapter disabled (the policy as given: LoRA starts at
    zero), and for a ``PeftModel`` with a trained adapter a frozen copy of that adapter. ``ref_model`` (a model
    or a path) replaces it.

    The head (`flowloss.LogZHead` on the policy's mean last hidden state over the prompt tokens; gradients
    flow into the policy) is attached to the policy as ``model.flowrl_log_z_head`` so the optimizer trains it
    with the policy's learning rate, as the authors do. Checkpoints hold it as ``flowrl_log_z_head.safetensors``
    beside the model files; it is reloaded on ``train(resume_from_checkpoint=...)`` and when the model is
    loaded from a directory holding that file. It is never sent to vLLM.
    """

    _name = "FlowRL"
    _tag_names: ClassVar[list[str]] = ["trl", "flowrl", "flowloss"]

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
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = FlowRLConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-FlowRL")
        if not isinstance(args, FlowRLConfig):
            raise TypeError(f"`args` must be a FlowRLConfig (FlowRL's options), got {type(args).__name__}")
        if ref_model is not None and (_is_peft_model(model) or kwargs.get("peft_config") is not None):
            raise ValueError("`ref_model` cannot be combined with PEFT: the reference is the adapter-free model")
        if not isinstance(model, str) and _is_peft_model(model):
            _copy_peft_adapter_as_reference(model)
        with _reference_policy(self, model, ref_model):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)

        policy = self.model
        head = attach_log_z_head(policy, args.flowrl_log_z_head)
        source = _checkpoint_dir(model)
        if source is not None:
            load_log_z_head(head, source)
        self.log_z_head = head
        self._hidden_states = HiddenStateCapture(policy)
        if self.accelerator.num_processes > 1:
            _destroy_process_group_at_exit()
        if self.use_vllm:
            exclude_from_weight_sync(self.vllm_generation)

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
        with self._hidden_states.capturing():
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{
                    key: inputs.get(key)
                    for key in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                "mm_token_type_ids", "image_position_ids")
                },
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
        _reload_top_level_adapter(model if model is not None else self.model, resume_from_checkpoint)
        if not load_log_z_head(self.log_z_head, resume_from_checkpoint):
            warnings.warn(
                f"{resume_from_checkpoint} has no {LOG_Z_HEAD_FILE}: the log-Z head starts fresh",
                stacklevel=2,
            )

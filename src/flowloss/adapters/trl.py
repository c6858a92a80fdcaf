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

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from flowloss.importance import (
    DEFAULT_EPS_HIGH,
    DEFAULT_MAX_WEIGHT,
    DEFAULT_TIS_CAP,
    IMPORTANCE_MODES,
)
from flowloss.log_partition import LogZHead, pool_prompt_hidden_states
from flowloss.losses import DEFAULT_BETA, trajectory_balance_loss
from flowloss.reductions import count_valid_sequences

__all__ = [
    "LOG_Z_HEAD_ATTR",
    "LOG_Z_HEAD_FILE",
    "NUM_SEQUENCES_KEY",
    "FlowRLConfig",
    "FlowRLTrainer",
    "exclude_from_weight_sync",
    "flowrl_loss_from_grpo_inputs",
    "load_log_z_head",
    "save_log_z_head",
    "sequence_normalizer",
]

# The head is a submodule of the policy under this name (so the optimizer, DDP and DeepSpeed see it) ...
LOG_Z_HEAD_ATTR = "flowrl_log_z_head"
# ... but is saved beside the model's weights: the checkpoint's model files stay a plain HF/PEFT checkpoint.
LOG_Z_HEAD_FILE = "flowrl_log_z_head.safetensors"
# Valid sequences in the whole generation batch, over all processes (a 0-dim tensor added to TRL's batch).
NUM_SEQUENCES_KEY = "flowrl_num_sequences"

_HEAD_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
# Stats of `trajectory_balance_loss` logged as `flowrl/<name>`.
_LOGGED_STATS = ("residual_mean", "residual_abs_mean", "log_z_mean", "logprobs_mean", "ref_logprobs_mean",
                 "weight_mean", "clip_frac", "token_clip_frac")


@dataclass
class FlowRLConfig(GRPOConfig):
    """``GRPOConfig`` plus FlowRL's options (every TRL option keeps its meaning unless listed here).

    FlowRL options (defaults: the paper / the authors' code, see ``flowloss.losses``/``flowloss.importance``):

    * ``flowrl_beta`` (15): reward temperature ``beta`` in the residual.
    * ``flowrl_importance_weights`` (``"sequence_clipped"``, the paper's
      ``clip(pi/pi_old, 1 - eps, 1 + eps)``): weight mode when TRL keeps ``old_per_token_logps`` (off-policy:
      ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps``, or vLLM); on-policy
      the weight is exactly 1.
      The clip range is TRL's ``epsilon`` (0.2) / ``epsilon_high`` (0.28 here, the authors' value).
    * ``flowrl_max_weight`` (10): cap of ``"sequence_capped"``; ``flowrl_tis_cap`` (2): truncated IS against
      vLLM's sampling log-probs (used when ``use_vllm`` and ``vllm_importance_sampling_correction``).
    * ``flowrl_token_clip_mask`` (False): the CISPO-style token mask of verl PR #3924.
    * ``flowrl_length_normalization`` (True): token-mean log-likelihoods, as the paper.
    * ``flowrl_log_z_num_layers`` (3), ``flowrl_log_z_dropout`` (0.1), ``flowrl_log_z_init`` (0.0),
      ``flowrl_log_z_drop_last_prompt_token`` (False), ``flowrl_log_z_dtype`` (``"float32"``; None = the
      policy's dtype): the `LogZHead` on the prompt's mean last hidden state.

    Rejected because the FlowRL loss would silently ignore them: TRL's KL ``beta != 0`` (the reference is part
    of the residual), ``entropy_coef != 0`` / ``use_adaptive_entropy``, ``top_entropy_quantile < 1``,
    ``off_policy_mask_threshold``. ``loss_type``, ``importance_sampling_level`` and ``delta`` do not apply.
    """

    epsilon_high: float | None = field(
        default=DEFAULT_EPS_HIGH,
        metadata={"help": "Upper clip of FlowRL's importance weight, 1 + epsilon_high (authors: 0.28)."},
    )
    flowrl_beta: float = field(default=DEFAULT_BETA, metadata={"help": "FlowRL's reward temperature (15)."})
    flowrl_importance_weights: str = field(
        default="sequence_clipped", metadata={"help": f"Importance-weight mode, one of {IMPORTANCE_MODES}."}
    )
    flowrl_max_weight: float = field(default=DEFAULT_MAX_WEIGHT, metadata={"help": "'sequence_capped' cap."})
    flowrl_tis_cap: float = field(default=DEFAULT_TIS_CAP, metadata={"help": "Truncated-IS cap (vLLM)."})
    flowrl_token_clip_mask: bool = field(default=False, metadata={"help": "CISPO-style token mask."})
    flowrl_length_normalization: bool = field(default=True, metadata={"help": "Token-mean log-likelihoods."})
    flowrl_log_z_num_layers: int = field(default=3, metadata={"help": "Layers of the log-Z MLP head."})
    flowrl_log_z_dropout: float = field(default=0.1, metadata={"help": "Dropout of the log-Z head."})
    flowrl_log_z_init: float = field(default=0.0, metadata={"help": "Initial output bias of the head."})
    flowrl_log_z_drop_last_prompt_token: bool = field(
        default=False, metadata={"help": "Leave each prompt's last token out of the pooled hidden state."}
    )
    flowrl_log_z_dtype: str | None = field(
        default="float32", metadata={"help": "dtype of the log-Z head's parameters (None: the policy's)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta != 0.0:
            raise ValueError(
                f"`beta` is TRL's KL coefficient and must stay 0.0 with FlowRL (got {self.beta!r}): the "
                "reference policy enters FlowRL's residual directly. Set the reward temperature with "
                "`flowrl_beta`."
            )
        for name, bad in (
            ("entropy_coef", self.entropy_coef != 0.0 or self.use_adaptive_entropy),
            ("top_entropy_quantile", self.top_entropy_quantile < 1.0),
            ("off_policy_mask_threshold", self.off_policy_mask_threshold is not None),
        ):
            if bad:
                raise ValueError(f"`{name}` is a GRPO loss option FlowRLTrainer does not apply; unset it")
        if not (isinstance(self.flowrl_beta, (int, float)) and math.isfinite(self.flowrl_beta)):
            raise ValueError(f"`flowrl_beta` must be a finite number, got {self.flowrl_beta!r}")
        if self.flowrl_importance_weights not in IMPORTANCE_MODES:
            raise ValueError(
                f"`flowrl_importance_weights` must be one of {IMPORTANCE_MODES}, "
                f"got {self.flowrl_importance_weights!r}"
            )
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"`epsilon` (FlowRL's eps_low) must be in [0, 1), got {self.epsilon!r}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not 0.0 <= self.epsilon_high < math.inf:
            raise ValueError(f"`epsilon_high` must be a finite number >= 0, got {self.epsilon_high!r}")
        for name in ("flowrl_max_weight", "flowrl_tis_cap"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < math.inf):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if self.flowrl_log_z_dtype is not None and self.flowrl_log_z_dtype not in _HEAD_DTYPES:
            raise ValueError(
                f"`flowrl_log_z_dtype` must be None or one of {tuple(_HEAD_DTYPES)}, "
                f"got {self.flowrl_log_z_dtype!r}"
            )


def sequence_normalizer(
    num_sequences: torch.Tensor | int,
    *,
    num_processes: int,
    gradient_accumulation_steps: int,
    steps_per_generation: int,
    training: bool,
) -> torch.Tensor:
    """The ``normalizer=`` that makes micro-batch losses add up to the mean over one optimizer step.

    ``num_sequences`` is ``N``, the valid sequences in the generation batch over all ``W`` processes.
    Each process's micro-batch loss is ``sum_i w_i g(delta_i) / (N / W)``; ranks average their gradients, so a
    step's gradient is that of ``(1/N) sum`` over the generation batch. When training, the generation batch
    spans ``S = steps_per_generation`` micro-batches and an optimizer step ``G = gradient_accumulation_steps``
    of them: the normalizer is scaled by ``G / S`` (exact for TRL's default ``S = G``; with ``S != G``, ``N``
    is prorated, as TRL does for its token-level losses). ``N = 0`` (nothing valid anywhere) is taken as 1.
    """
    n = torch.as_tensor(num_sequences, dtype=torch.float64).clamp_min(1.0)
    norm = n / num_processes
    if training:
        norm = norm * gradient_accumulation_steps / steps_per_generation
    return norm


def flowrl_loss_from_grpo_inputs(
    per_token_logps: torch.Tensor,
    log_z: torch.Tensor,
    inputs: dict[str, Any],
    args: FlowRLConfig,
    *,
    normalizer: torch.Tensor | float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FlowRL's loss on one TRL GRPO micro-batch: a direct call of `flowloss.trajectory_balance_loss`.

    ``per_token_logps [B, T]`` (the policy's completion log-probs, with gradient), ``log_z [B]`` (with
    gradient), ``inputs`` TRL's batch: ``completion_mask [B, T]`` (times ``tool_mask`` when present),
    ``advantages [B]`` (= ``r_hat``), ``ref_per_token_logps [B, T]``, optionally
    ``old_per_token_logps [B, T]``. Returns ``(loss, stats)``.
    """
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
    return trajectory_balance_loss(
        per_token_logps,
        ref,
        advantages if advantages.is_floating_point() else advantages.float(),
        log_z,
        mask,
        beta=args.flowrl_beta,
        old_logprobs=old,
        rollout_logprobs=rollout_logprobs if old is not None else None,
        importance_weights=args.flowrl_importance_weights if old is not None else "none",
        eps_low=args.epsilon,
        eps_high=args.epsilon_high,
        max_weight=args.flowrl_max_weight,
        tis_cap=args.flowrl_tis_cap,
        token_clip_mask=args.flowrl_token_clip_mask and old is not None,
        length_normalization=args.flowrl_length_normalization,
        normalizer=normalizer,
        return_stats=True,
    )


def save_log_z_head(state_dict: dict[str, torch.Tensor], output_dir: str) -> str:
    """Write the head's ``state_dict`` to ``output_dir/flowrl_log_z_head.safetensors``; return the path."""
    path = os.path.join(output_dir, LOG_Z_HEAD_FILE)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, path)
    return path


def load_log_z_head(head: nn.Module, checkpoint_dir: str) -> bool:
    """Load ``checkpoint_dir/flowrl_log_z_head.safetensors`` into ``head`` (strict); False if absent."""
    path = os.path.join(checkpoint_dir, LOG_Z_HEAD_FILE)
    if not os.path.isfile(path):
        return False
    head.load_state_dict(load_file(path, device="cpu"), strict=True)
    return True


def exclude_from_weight_sync(vllm_generation: Any, name_fragment: str = LOG_Z_HEAD_ATTR) -> None:
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


class _BackboneHiddenStates:
    """Forward hook on the decoder backbone: keeps ``last_hidden_state [B, P + T, H]`` while capturing."""

    def __init__(self, backbone: nn.Module) -> None:
        self._active = False
        self._states: list[torch.Tensor] = []
        self.handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active:
            hidden = getattr(output, "last_hidden_state", None)
            self._states.append(hidden if hidden is not None else output[0])

    @contextmanager
    def capture(self) -> Iterator[None]:
        self._states, self._active = [], True
        try:
            yield
        finally:
            self._active = False

    def pop(self) -> torch.Tensor:
        if not self._states:
            raise RuntimeError("the policy's backbone did not run while capturing hidden states for log Z")
        states, self._states = self._states, []
        return torch.cat(states, dim=0)


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _checkpoint_dir(model: Any) -> str | None:
    if isinstance(model, str):
        return model if os.path.isdir(model) else None
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return path if isinstance(path, str) and os.path.isdir(path) else None


class FlowRLTrainer(GRPOTrainer):
    """``GRPOTrainer`` with FlowRL's trajectory-balance loss and a learned ``log Z`` head.

    Arguments are ``GRPOTrainer``'s; ``args`` must be a `FlowRLConfig`. The head
    (`LogZHead` on the policy's mean last hidden state over the prompt tokens; gradients flow
    into the policy) is attached to the policy as ``model.flowrl_log_z_head`` so the optimizer trains it with
    the policy's learning rate, as the authors do. Checkpoints hold it as ``flowrl_log_z_head.safetensors``
    beside the model files; it is reloaded on ``train(resume_from_checkpoint=...)`` and when the model is
    loaded from a directory holding that file. It is never sent to vLLM.
    """

    _name = "FlowRL"
    _tag_names: ClassVar[list[str]] = ["trl", "flowrl", "flowloss"]

    def __init__(
        self, model: Any, reward_funcs: Any, args: FlowRLConfig | None = None, **kwargs: Any
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = FlowRLConfig(output_dir=f"{str(name).split('/')[-1]}-FlowRL")
        if not isinstance(args, FlowRLConfig):
            raise TypeError(f"`args` must be a FlowRLConfig (FlowRL's options), got {type(args).__name__}")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)

        policy = self.model
        hf_model = policy.get_base_model() if _is_peft_model(policy) else policy
        # The backbone TRL's fused log-prob forward runs (`getattr(model, "base_model")`).
        backbone = hf_model.base_model
        hidden_size = hf_model.config.get_text_config().hidden_size
        head = LogZHead(
            hidden_size,
            num_layers=args.flowrl_log_z_num_layers,
            dropout=args.flowrl_log_z_dropout,
            init_log_z=args.flowrl_log_z_init,
        )
        param = next(hf_model.parameters())
        dtype = _HEAD_DTYPES[args.flowrl_log_z_dtype] if args.flowrl_log_z_dtype else param.dtype
        head.to(device=param.device, dtype=dtype)
        source = _checkpoint_dir(model)
        if source is not None:
            load_log_z_head(head, source)
        policy.add_module(LOG_Z_HEAD_ATTR, head)
        self.log_z_head = head
        self._hidden_states = _BackboneHiddenStates(backbone)
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
        with self._hidden_states.capture():
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
        normalizer = sequence_normalizer(
            total,
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            training=mode == "train",
        )
        rollout = None
        sampling = inputs.get("sampling_per_token_logps")
        old = inputs.get("old_per_token_logps")
        tis = self.use_vllm and self.vllm_importance_sampling_correction
        if tis and sampling is not None and old is not None:
            # Tokens vLLM could not score (NaN) get ratio 1.
            rollout = torch.where(torch.isnan(sampling), old, sampling)
        loss, stats = flowrl_loss_from_grpo_inputs(
            per_token_logps, log_z, inputs, self.args, normalizer=normalizer, rollout_logprobs=rollout
        )
        if self.aux_loss_enabled:
            scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / scale
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
        marker = LOG_Z_HEAD_ATTR + "."
        head_state = {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}
        model_state = {k: v for k, v in state_dict.items() if marker not in k}
        super()._save(output_dir, state_dict=model_state)
        save_log_z_head(head_state or self.log_z_head.state_dict(), output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not load_log_z_head(self.log_z_head, resume_from_checkpoint):
            warnings.warn(
                f"{resume_from_checkpoint} has no {LOG_Z_HEAD_FILE}: the log-Z head starts fresh",
                stacklevel=2,
            )

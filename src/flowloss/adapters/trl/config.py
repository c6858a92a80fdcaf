"""``FlowRLConfig``: ``GRPOConfig`` plus FlowRL's options, translated to flowloss's option objects in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from flowloss import FlowRLOptions
from flowloss.adapters.common import LogZHeadOptions, check_adapter_options
from flowloss.adapters.trl.logprobs import LOGPROB_PATHS

__all__ = ["GRPO_ONLY_OPTIONS", "FlowRLConfig"]

_LOSS = FlowRLOptions()
_HEAD = LogZHeadOptions()
# GRPO options FlowRL never reads: refused unless left at their default here (name, default, why). FlowRLConfig
# sets `use_bias_correction_kl` to False (TRL: True), since FlowRL has no KL term to correct.
GRPO_ONLY_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("loss_type", "dapo", "FlowRL replaces the GRPO loss and its aggregation (a mean over sequences)"),
    ("importance_sampling_level", "token",
     "FlowRL's importance weight is set by `flowrl_importance_weights` (sequence-level by default)"),
    ("delta", None, "two-sided GRPO clipping does not apply to FlowRL's weight"),
    ("entropy_coef", 0.0, "an entropy bonus would change FlowRL's objective"),
    ("use_adaptive_entropy", False, "an entropy bonus would change FlowRL's objective"),
    ("top_entropy_quantile", 1.0, "FlowRL's residual uses every completion token"),
    ("off_policy_mask_threshold", None, "FlowRL does not mask off-policy sequences; it clips their weight"),
    ("use_bias_correction_kl", False, "FlowRL has no KL term to correct (the reference is part of the residual)"),
    ("vllm_importance_sampling_mode", "sequence_mask",
     "FlowRL's correction against vLLM is its truncated IS weight, capped by `flowrl_tis_cap`"),
    ("vllm_importance_sampling_clip_min", None, "FlowRL's truncated IS weight is capped by `flowrl_tis_cap`"),
    ("vllm_importance_sampling_clip_max", 3.0, "FlowRL's truncated IS weight is capped by `flowrl_tis_cap`"),
)

_TRL_NAMES = {"eps_low": "epsilon", "eps_high": "epsilon_high"}


def _trl_names(message: str) -> str:
    """A core error message with TRL's field names: `eps_low` -> `epsilon`, `beta` -> `flowrl_beta`, ..."""
    return re.sub(r"`([a-z_]+)`", lambda m: f"`{_TRL_NAMES.get(m.group(1), 'flowrl_' + m.group(1))}`", message)


def _none_from_text(value: Any) -> Any:
    """A command line (``TrlParser``/``HfArgumentParser``) writes None as the string "none"/"None"."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "null") else value


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
    * ``flowrl_log_z_num_layers`` (3), ``flowrl_log_z_dropout`` (0.1), ``flowrl_log_z_init`` (0.0: the bias of
      the head's output layer; the starting log Z is exactly this value only with ``flowrl_log_z_zero_init``,
      otherwise it is this plus a random term of the pooled prompt state, about +-0.6),
      ``flowrl_log_z_zero_init`` (False: the authors' random output weight), ``flowrl_log_z_lr`` (None: the
      policy's learning rate; a number: the head's own optimizer group at that rate),
      ``flowrl_log_z_drop_last_prompt_token`` (False), ``flowrl_log_z_dtype`` (``"float32"``; None or "none":
      the policy's dtype).
    * ``flowrl_logprobs`` (``"auto"``): how every log-prob is computed -- ``"framework"`` (TRL's fused head),
      ``"logits"`` (the model's logits through `flowloss.token_logprobs`), ``"hidden"`` (the last hidden state
      through `flowloss.token_logprobs_from_hidden`; logits never built); ``"auto"`` is ``"hidden"`` on CPU and
      ``"framework"`` on accelerators (`flowloss.adapters.trl.logprobs`).

    Refused, all at once in one error, because FlowRL would silently ignore them: TRL's KL ``beta != 0`` (the
    reference is part of the residual) and, when changed from their default, the options of
    ``GRPO_ONLY_OPTIONS`` (``loss_type``, ``importance_sampling_level``, ``delta``, ``entropy_coef`` /
    ``use_adaptive_entropy``, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
    ``use_bias_correction_kl``, ``vllm_importance_sampling_mode`` and its clip bounds).
    """

    epsilon_high: float | None = field(
        default=_LOSS.eps_high,
        metadata={"help": "Upper clip of FlowRL's importance weight, 1 + epsilon_high (authors: 0.28)."},
    )
    use_bias_correction_kl: bool = field(
        default=False, metadata={"help": "GRPO's KL bias correction: FlowRL has no KL term (must stay False)."}
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
    flowrl_log_z_init: float = field(
        default=_HEAD.init,
        metadata={"help": "Bias of the head's output layer; the starting log Z exactly with flowrl_log_z_zero_init."},
    )
    flowrl_log_z_zero_init: bool = field(
        default=_HEAD.zero_init,
        metadata={"help": "Start the head's output weight at 0, so log Z starts at exactly flowrl_log_z_init."},
    )
    flowrl_log_z_lr: float | None = field(
        default=_HEAD.lr,
        metadata={"help": "Learning rate of the head's own optimizer group (None: the policy's learning rate)."},
    )
    flowrl_log_z_drop_last_prompt_token: bool = field(
        default=_HEAD.drop_last_prompt_token,
        metadata={"help": "Leave each prompt's last token out of the pooled hidden state."},
    )
    flowrl_log_z_dtype: str | None = field(
        default=_HEAD.dtype,
        metadata={"help": "dtype of the log-Z head's parameters: float32, float64, bfloat16, float16 or none "
                          "(the policy's)."},
    )
    flowrl_logprobs: str = field(
        default="auto",
        metadata={"help": "Log-prob path: auto, framework (TRL's fused head), logits or hidden (flowloss's ops).",
                  "choices": list(LOGPROB_PATHS)},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.flowrl_log_z_dtype = _none_from_text(self.flowrl_log_z_dtype)
        self.flowrl_log_z_lr = _none_from_text(self.flowrl_log_z_lr)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        problems: list[Exception] = []
        if self.beta != 0.0:
            problems.append(ValueError(
                f"`beta` is TRL's KL coefficient and must stay 0.0 with FlowRL (got {self.beta!r}): the reference "
                "policy enters FlowRL's residual directly. Set the reward temperature with `flowrl_beta`."
            ))
        for name, default, why in GRPO_ONLY_OPTIONS:
            value = getattr(self, name)
            if value != default:
                problems.append(ValueError(
                    f"`{name}={value!r}` is a GRPO loss option that FlowRLTrainer does not apply ({why}); "
                    f"remove it (default {default!r})"
                ))
        if self.flowrl_logprobs not in LOGPROB_PATHS:
            problems.append(ValueError(
                f"`flowrl_logprobs` must be one of {LOGPROB_PATHS}, got {self.flowrl_logprobs!r}"
            ))
        for check in (lambda: self.flowrl_options, lambda: self.flowrl_log_z_head):
            try:
                check()
            except (TypeError, ValueError) as exc:
                problems.append(exc)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise ValueError(f"{len(problems)} options conflict with FlowRL; change them all:\n{listed}")

    @property
    def flowrl_options(self) -> FlowRLOptions:
        """The loss options as one `flowloss.FlowRLOptions`: TRL's names translated, here only."""
        try:  # from_any: these fields hold the user's values as TRL parsed them (str, float | None), checked here
            options = FlowRLOptions.from_any(
                None,
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
                zero_init=self.flowrl_log_z_zero_init,
                lr=self.flowrl_log_z_lr,
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(_trl_names(str(exc))) from None

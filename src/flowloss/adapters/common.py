"""What the TRL, verl and OpenRLHF adapters share: one config, the log-Z head, the hidden-state hook, the normalizer.

Each framework file (``flowloss.adapters.{trl,verl,openrlhf}``) only translates that framework's tensors and
config into calls of these pieces and of `flowloss.trajectory_balance_loss`. Nothing here imports a framework.

The public API::

    # options: the loss's FlowRLOptions + the head's LogZHeadOptions + a framework's own extras
    AdapterConfig   LogZHeadOptions   Extra   check_adapter_options   OPTION_HELP
    AdapterConfig.from_any(dict | namespace | config | None, **overrides)      # unknown keys: TypeError
    AdapterConfig.add_arguments(parser, prefix="--flowrl.")                    # argparse: --help lists them
    AdapterConfig.parse_flags(argv, prefix="--flowrl.", prog=...)             # (config, the other args)
    # the log-Z head on a Hugging Face model
    LOG_Z_HEAD_NAME   LOG_Z_HEAD_FILE   attach_log_z_head   find_log_z_head   decoder_of   log_z_param_groups
    unwrap_model
    save_log_z_head   load_log_z_head   split_log_z_head_state   log_z_head_detached   without_log_z_head
    # the decoder's last hidden states during a forward
    HiddenStateCapture   last_hidden_state
    # micro-batch losses that add up to the mean over an optimizer step
    global_normalizer

Flat names, one per concept, in every adapter: the loss options are the fields of `flowloss.FlowRLOptions`
(``beta``, ``importance_weights``, ``eps_low``, ...), the head options are ``log_z_num_layers``,
``log_z_dropout``, ``log_z_init``, ``log_z_zero_init``, ``log_z_drop_last_prompt_token``, ``log_z_dtype``,
``log_z_lr``. TRL's ``GRPOConfig``
prefixes them with ``flowrl_`` and names the clip range ``epsilon``/``epsilon_high`` (TRL's own fields): the
TRL adapter translates those in one place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from flowloss import FlowRLOptions, LogZHead
from flowloss._deprecation import warn_deprecated

__all__ = [
    "LOG_Z_HEAD_FILE",
    "LOG_Z_HEAD_NAME",
    "OPTION_HELP",
    "AdapterConfig",
    "Extra",
    "HiddenStateCapture",
    "LogZHeadOptions",
    "attach_log_z_head",
    "check_adapter_options",
    "decoder_of",
    "find_log_z_head",
    "global_normalizer",
    "last_hidden_state",
    "load_log_z_head",
    "log_z_head_detached",
    "log_z_param_groups",
    "save_log_z_head",
    "split_log_z_head_groups",
    "split_log_z_head_state",
    "unwrap_model",
    "without_log_z_head",
]

# The head is a submodule of the policy under this name (so optimizers, DDP, FSDP and DeepSpeed see it).
LOG_Z_HEAD_NAME = "flowrl_log_z_head"
# Where adapters that keep the model files a plain HF checkpoint (TRL) save the head, beside them.
LOG_Z_HEAD_FILE = "flowrl_log_z_head.safetensors"

_HEAD_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
_IMPORTANCE_MODES = ("sequence_clipped", "sequence_capped", "sequence", "geometric_clipped", "none")

# One line per option, shown by `--help` and in error messages.
OPTION_HELP: dict[str, str] = {
    "beta": "reward temperature beta > 0 in delta = log Z + l - beta r_hat - l_ref (15, the paper)",
    "importance_weights": "weight mode w_i when old log-probs exist (default: sequence_clipped, the paper)",
    "eps_low": "clip range low side, w >= 1 - eps_low, in [0, 1) (0.2, the authors)",
    "eps_high": "clip range high side, w <= 1 + eps_high, >= 0 (0.28, the authors)",
    "max_weight": "cap of the sequence_capped mode, > 0 (10, verl recipe/flowrl)",
    "tis_cap": "truncated IS cap against the rollout engine's log-probs, > 0 (2, verl)",
    "token_clip_mask": "CISPO-style token mask of verl PR #3924 (false)",
    "length_normalization": "token-mean log-likelihoods (true, the paper) or token sums (false)",
    "penalty": "penalty g(delta) (squared: trajectory balance)",
    "linex_alpha": "a of the linex penalty, non-zero (1.0)",
    "huber_delta": "k of the huber penalty, > 0 (1.0)",
    "reduction": "only mean: an adapter divides the micro-batch sum by the step's sequence count",
    "log_z_num_layers": "layers of the log-Z MLP head, >= 1 (3, the authors)",
    "log_z_dropout": "dropout in the log-Z head, in [0, 1) (0.1, the authors)",
    "log_z_init": "initial output bias of the log-Z head (0.0); the starting log Z exactly with log_z_zero_init",
    "log_z_zero_init": "start the head's output weight at 0, so log Z starts at exactly log_z_init (false)",
    "log_z_lr": "learning rate of the log-Z head's own optimizer group, > 0 (none: the policy's)",
    "log_z_drop_last_prompt_token": "leave each prompt's last token out of the pooled state (false)",
    "log_z_dtype": "parameter dtype of the head: float32, float64, bfloat16, float16 or none (the policy's)",
}
# Options whose default is None and whose value is a number (a command line writes None as "none").
_OPTIONAL_NUMBERS = ("log_z_lr",)
_CHOICES: dict[str, tuple[str, ...]] = {
    "importance_weights": _IMPORTANCE_MODES,
    "penalty": ("squared", "shifted_cosh", "linex", "huber"),
    "reduction": ("mean",),
    "log_z_dtype": (*_HEAD_DTYPES, "none"),
}


@dataclass(frozen=True)
class LogZHeadOptions:
    """Options of the `flowloss.LogZHead` an adapter attaches (flat names: ``log_z_<field>``).

    ``num_layers`` (3) and ``dropout`` (0.1) are the authors'; ``init`` is the output layer's bias: with
    ``zero_init`` (the output weight starts at 0) the starting ``log Z`` is exactly ``init``, without it (the
    authors' random output weight) it starts at ``init`` plus a random term of the pooled state (about +-0.6 at
    hidden size 64, up to +-1 at 4096); ``drop_last_prompt_token`` reproduces the authors' slicing of the pooled
    prompt; ``dtype`` is the head's parameter dtype (``"float32"``; None: the policy's dtype, e.g. to keep one
    dtype per FSDP unit); ``lr`` is the learning rate of the head's own optimizer group (None: the policy's, as
    the authors train it; see `log_z_param_groups`).
    """

    num_layers: int = 3
    dropout: float = 0.1
    init: float = 0.0
    drop_last_prompt_token: bool = False
    dtype: str | None = "float32"
    zero_init: bool = False
    lr: float | None = None

    def __post_init__(self) -> None:
        n = self.num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`log_z_num_layers` must be an int >= 1, got {n!r}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"`log_z_dropout` must be a number in [0, 1), got {d!r}")
        if isinstance(self.init, bool) or not isinstance(self.init, (int, float)) or not math.isfinite(self.init):
            raise ValueError(f"`log_z_init` must be a finite number, got {self.init!r}")
        if not isinstance(self.drop_last_prompt_token, bool):
            raise TypeError(f"`log_z_drop_last_prompt_token` must be a bool, got {self.drop_last_prompt_token!r}")
        if not isinstance(self.zero_init, bool):
            raise TypeError(f"`log_z_zero_init` must be a bool, got {self.zero_init!r}")
        lr = self.lr
        if lr is not None and (
            isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0
        ):
            raise ValueError(f"`log_z_lr` must be None or a finite number > 0, got {lr!r}")
        if lr is not None:
            object.__setattr__(self, "lr", float(lr))
        if self.dtype is not None and self.dtype not in _HEAD_DTYPES:
            raise ValueError(f"`log_z_dtype` must be None or one of {tuple(_HEAD_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dropout", float(d))
        object.__setattr__(self, "init", float(self.init))

    def torch_dtype(self, like: torch.dtype) -> torch.dtype:
        return _HEAD_DTYPES[self.dtype] if self.dtype is not None else like


@dataclass(frozen=True)
class Extra:
    """A framework's own option (not a loss or head option): its default, allowed choices and help line."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


def check_adapter_options(options: FlowRLOptions, *, beta_name: str = "beta") -> FlowRLOptions:
    """Refuse what the core accepts but an RL trainer's config almost surely got wrong.

    * ``beta <= 0``: a negative temperature turns the target into ``pi_ref exp(-|beta| r)``, which prefers
      *low* rewards; zero makes the reward vanish from the loss (the policy is only pulled to ``pi_ref``).
      The core function takes any finite beta for research use; an adapter's config does not.
    * ``reduction != "mean"``: the adapters divide each micro-batch sum by the step's sequence count.
    """
    if not options.beta > 0:
        raise ValueError(
            f"`{beta_name}` must be > 0, got {options.beta!r}: FlowRL's target is pi_ref * exp(beta * r) / Z, so "
            "beta < 0 prefers low rewards and beta = 0 ignores the reward (the authors use 15). For such "
            "experiments call flowloss.trajectory_balance_loss directly."
        )
    if options.reduction != "mean":
        raise ValueError(
            f"`reduction` must be 'mean' in a trainer adapter, got {options.reduction!r}: micro-batch losses are "
            "divided by the number of sequences in the optimizer step so that they add up to one mean"
        )
    return options


_HEAD_FIELDS = {f"log_z_{f.name}": f.name for f in dataclasses.fields(LogZHeadOptions)}
_LOSS_FIELDS = FlowRLOptions.field_names()
_Config = TypeVar("_Config", bound="AdapterConfig")


class AdapterConfig:
    """A framework adapter's options: ``loss`` (`flowloss.FlowRLOptions`), ``log_z_head``
    (`LogZHeadOptions`) and the framework's extras (class attribute ``EXTRAS``, each an attribute).

    Build it from flat keyword names (``FlowRLConfig(beta=10.0, log_z_dropout=0.0)``), from the two objects
    (``FlowRLConfig(loss=FlowRLOptions(...))``), or with `from_any` from a dict, an OmegaConf node, a namespace
    or None. Unknown names raise ``TypeError`` listing the known ones. Immutable; compare with ``==``.
    """

    EXTRAS: ClassVar[dict[str, Extra]] = {}
    # 0.1 names of this framework's config: ``{old: new}`` (accepted with a DeprecationWarning), and names that
    # no longer exist, ``{old: why}`` (refused with that reason).
    RENAMED: ClassVar[dict[str, str]] = {}
    REMOVED: ClassVar[dict[str, str]] = {}

    loss: FlowRLOptions
    log_z_head: LogZHeadOptions

    def __init__(
        self,
        loss: FlowRLOptions | Mapping[str, Any] | None = None,
        log_z_head: LogZHeadOptions | Mapping[str, Any] | None = None,
        **flat: Any,
    ) -> None:
        for old, why in self.REMOVED.items():
            if old in flat:
                raise TypeError(f"`{old}` is no longer a {type(self).__name__} option: {why}")
        for old, new in self.RENAMED.items():
            if old in flat:
                warn_deprecated(f"the option `{old}`", f"use `{new}`", stacklevel=4)
                if new in flat:
                    raise TypeError(f"both `{old}` and its new name `{new}` were given")
                flat[new] = flat.pop(old)
        known = self.flat_names()
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise TypeError(f"unknown FlowRL option(s) {unknown} for {type(self).__name__}; known: {sorted(known)}")
        loss_values = {k: v for k, v in flat.items() if k in _LOSS_FIELDS}
        head_values = {_HEAD_FIELDS[k]: v for k, v in flat.items() if k in _HEAD_FIELDS}
        for key in ("dtype", "lr"):  # None from a command line or a YAML string
            if isinstance(head_values.get(key), str) and head_values[key].strip().lower() == "none":
                head_values[key] = None
        if isinstance(log_z_head, LogZHeadOptions):
            head = dataclasses.replace(log_z_head, **head_values)
        else:
            head = LogZHeadOptions(**{**dict(log_z_head or {}), **head_values})
        object.__setattr__(self, "loss", check_adapter_options(FlowRLOptions.from_any(loss, **loss_values)))
        object.__setattr__(self, "log_z_head", head)
        for name, extra in self.EXTRAS.items():
            value = flat.get(name, extra.default)
            if extra.choices is not None and value not in extra.choices:
                raise ValueError(f"`{name}` must be one of {extra.choices}, got {value!r}")
            if isinstance(extra.default, bool) and not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r}")
            object.__setattr__(self, name, value)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def flat_names(cls) -> tuple[str, ...]:
        """Every option's flat name: the loss's, ``log_z_*`` for the head, then the framework's extras."""
        return (*_LOSS_FIELDS, *_HEAD_FIELDS, *cls.EXTRAS)

    @classmethod
    def from_any(cls: type[_Config], value: Any = None, **overrides: Any) -> _Config:
        """From an instance, a flat mapping (dict, OmegaConf node), a namespace (``args.flowrl``) or None."""
        if value is None:
            items: dict[str, Any] = {}
        elif isinstance(value, cls):
            items = value.to_flat_dict()
        elif isinstance(value, AdapterConfig):
            raise TypeError(f"expected a {cls.__name__} or its options, got a {type(value).__name__}")
        elif isinstance(value, Mapping) or hasattr(value, "items"):
            items = dict(value.items())
        elif hasattr(value, "__dict__"):
            items = dict(vars(value))
        else:
            raise TypeError(f"FlowRL options must be a mapping, a namespace or a {cls.__name__}, got {value!r}")
        items.update(overrides)
        return cls(**items)

    def to_flat_dict(self) -> dict[str, Any]:
        out = self.loss.to_dict()
        out.update({flat: getattr(self.log_z_head, name) for flat, name in _HEAD_FIELDS.items()})
        out.update({name: getattr(self, name) for name in self.EXTRAS})
        return out

    def replace(self: _Config, **changes: Any) -> _Config:
        return type(self)(**{**self.to_flat_dict(), **changes})

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_flat_dict() == other.to_flat_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_flat_dict().items()))

    def __repr__(self) -> str:
        extras = "".join(f", {name}={getattr(self, name)!r}" for name in self.EXTRAS)
        return f"{type(self).__name__}(loss={self.loss!r}, log_z_head={self.log_z_head!r}{extras})"

    # -- command line --------------------------------------------------------------------------------------

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        defaults = FlowRLOptions().to_dict()
        head = LogZHeadOptions()
        defaults.update({flat: getattr(head, name) for flat, name in _HEAD_FIELDS.items()})
        defaults.update({name: extra.default for name, extra in cls.EXTRAS.items()})
        return defaults

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, prefix: str = "--flowrl.", *, dest_prefix: str = ""
    ) -> None:
        """Add one ``<prefix><name>`` argument per option (type, choices, help) to ``parser``, stored under
        ``<dest_prefix><name>`` when given on the command line (absent otherwise: the config's default)."""
        group = parser.add_argument_group("FlowRL (flowloss)", "options of the FlowRL loss and its log-Z head")
        for name, default in cls._defaults().items():
            help_line = cls.EXTRAS[name].help if name in cls.EXTRAS else OPTION_HELP[name]
            choices = cls.EXTRAS[name].choices if name in cls.EXTRAS else _CHOICES.get(name)
            shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
            suffix = "" if name == "importance_weights" else f" [default: {shown}]"
            kwargs: dict[str, Any] = {"dest": dest_prefix + name, "default": argparse.SUPPRESS,
                                      "help": help_line + suffix}
            if isinstance(default, bool):
                kwargs.update(type=_parse_bool(prefix + name), metavar="{true,false}")
            elif name in _OPTIONAL_NUMBERS:
                kwargs.update(type=_parse_optional_float(prefix + name), metavar="{FLOAT,none}")
            elif choices is not None:
                kwargs.update(choices=choices)
            elif isinstance(default, int):
                kwargs.update(type=int, metavar="INT")
            elif isinstance(default, float):
                kwargs.update(type=float, metavar="FLOAT")
            group.add_argument(prefix + name, **kwargs)

    @classmethod
    def parse_flags(cls, argv: Sequence[str], prefix: str = "--flowrl.", *, prog: str | None = None):
        """``(config, rest)``: the ``<prefix>*`` flags of ``argv`` (``--x v`` or ``--x=v``) and the other args.

        A bad value or an unknown ``<prefix>`` flag exits with status 2 and a message naming the flag and the
        allowed values, as argparse does.
        """
        parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
        cls.add_arguments(parser, prefix)
        cls.refuse_unknown_flags(argv, prefix, parser)
        namespace, rest = parser.parse_known_args(list(argv))
        values = vars(namespace)
        try:
            return cls(**values), rest
        except (TypeError, ValueError) as exc:
            parser.error(_flag_message(str(exc), prefix))


    @classmethod
    def refuse_unknown_flags(cls, argv: Sequence[str], prefix: str, parser: argparse.ArgumentParser) -> None:
        """``parser.error`` (exit 2) on a ``<prefix>`` flag that names no option, listing the known ones."""
        known = {prefix + name for name in cls.flat_names()}
        for arg in argv:
            flag = arg.split("=", 1)[0]
            if flag.startswith(prefix) and flag not in known:
                parser.error(f"unknown option {flag}; FlowRL options: {', '.join(sorted(known))}")

    @classmethod
    def from_parsed(cls, namespace: argparse.Namespace, parser: argparse.ArgumentParser, *, dest_prefix: str,
                    prefix: str = "--flowrl."):
        """The config from the ``<dest_prefix>*`` attributes of a parsed namespace (removed from it); a value
        the config refuses ends in ``parser.error`` (exit 2) naming the flag."""
        values = {k[len(dest_prefix):]: v for k, v in vars(namespace).items() if k.startswith(dest_prefix)}
        for key in values:
            delattr(namespace, dest_prefix + key)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            parser.error(_flag_message(str(exc), prefix))


def _flag_message(message: str, prefix: str) -> str:
    """Rewrite ```name``` in a config error as the command-line flag ``<prefix>name``."""
    import re

    return re.sub(r"`([a-z_]+)`", lambda m: prefix + m.group(1), message)


def _parse_optional_float(flag: str) -> Callable[[str], float | None]:
    def parse(raw: str) -> float | None:
        if raw.strip().lower() == "none":
            return None
        try:
            return float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number or none, got {raw!r}") from None

    return parse


def _parse_bool(flag: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in ("true", "1", "yes"):
            return True
        if value in ("false", "0", "no"):
            return False
        raise argparse.ArgumentTypeError(f"{flag} takes true or false, got {raw!r}")

    parse.__name__ = "bool"
    return parse


# ----------------------------------------------------------------------------------------------------------
# The log-Z head on a Hugging Face causal LM.


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside wrappers: OpenRLHF's ``Actor`` (``.model``), DeepSpeed/DDP (``.module``),
    PEFT (``get_base_model()``)."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            peft_model: Any = model  # a PEFT PeftModel (peft is optional)
            model = peft_model.get_base_model()
            continue
        inner = getattr(model, "module", None)  # DeepSpeed/DDP
        if not isinstance(inner, nn.Module) and not hasattr(model, "config"):
            inner = getattr(model, "model", None)  # OpenRLHF's Actor (a Hugging Face model has a config)
        if isinstance(inner, nn.Module):
            model = inner
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model``'s wrappers (OpenRLHF's ``Actor``, DeepSpeed/DDP, PEFT)."""
    return _unwrap(model)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack whose output is the last hidden state (``Qwen2ForCausalLM.model``, ...)."""
    hf: Any = _unwrap(model)  # a transformers PreTrainedModel (nn.Module types its attributes as Tensor | Module)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if not isinstance(decoder, nn.Module) or decoder is hf:
        prefix = getattr(hf, "base_model_prefix", None)
        decoder = getattr(hf, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(decoder, nn.Module) or decoder is hf:
        raise ValueError(
            f"cannot find the decoder of {type(hf).__name__} (get_decoder() / base_model_prefix): the log-Z head "
            "reads the last hidden state of the decoder (e.g. Qwen2ForCausalLM.model)"
        )
    return decoder


def attach_log_z_head(model: nn.Module, options: LogZHeadOptions | AdapterConfig | None = None) -> LogZHead:
    """Add a `flowloss.LogZHead` to the Hugging Face model inside ``model`` as ``flowrl_log_z_head`` (idempotent).

    Do it before the optimizer and any FSDP/DeepSpeed wrapping are built, so that the head is trained with the
    policy's optimizer (as the authors do), sharded and checkpointed with it. The head's input size is the
    model's hidden size; it goes to the model's device (not a meta device) in ``options.dtype``. ``options``:
    the head's options, or an adapter's config (its ``log_z_head``).
    """
    if isinstance(options, AdapterConfig):
        options = options.log_z_head
    options = options if options is not None else LogZHeadOptions()
    hf = _unwrap(model)
    existing = getattr(hf, LOG_Z_HEAD_NAME, None)
    if isinstance(existing, LogZHead):  # attaching twice (e.g. a retried set-up) keeps the first head
        return existing
    config: Any = getattr(hf, "config", None)  # a transformers PretrainedConfig, or None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(f"cannot read the hidden size of {type(hf).__name__} (config.hidden_size)")
    head = LogZHead(
        hidden,
        num_layers=options.num_layers,
        dropout=options.dropout,
        init_log_z=options.init,
        zero_init=options.zero_init,
    )
    ref = next(hf.parameters(), None)
    like = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    device = ref.device if ref is not None and ref.device.type != "meta" else None
    head = head.to(device=device, dtype=options.torch_dtype(like))
    hf.add_module(LOG_Z_HEAD_NAME, head)
    return head


def log_z_param_groups(
    model: nn.Module, log_z_lr: float | None, **group_options: Any
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the attached log-Z head in a group of its own at ``log_z_lr``.

    ``[{"params": the model's other trainable parameters, **group_options},
    {"params": the head's trainable parameters, **group_options, "lr": log_z_lr}]``; with ``log_z_lr=None``
    one group holding everything (the authors' set-up: the head shares the policy's optimizer and learning
    rate). For custom trainers: ``torch.optim.AdamW(log_z_param_groups(model, 1e-3), lr=1e-6)``. A separate,
    larger rate helps when log Z must travel far (raw rewards: the optimum is near ``beta * E[r]``); see
    ``docs/math.md``.
    """
    find_log_z_head(model)  # attached, whatever the rate
    trainable = [p for p in model.parameters() if p.requires_grad]
    if log_z_lr is None:
        return [{"params": trainable, **group_options}]
    if isinstance(log_z_lr, bool) or not isinstance(log_z_lr, (int, float)) or not math.isfinite(log_z_lr) \
            or log_z_lr <= 0:
        raise ValueError(f"`log_z_lr` must be None or a finite number > 0, got {log_z_lr!r}")
    rest, head = split_log_z_head_groups([{"params": trainable, **group_options}], model, log_z_lr)
    return rest + head


def split_log_z_head_groups(
    groups: Sequence[Mapping[str, Any]], model: nn.Module, log_z_lr: float | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Optimizer groups split around the attached log-Z head's trainable parameters: ``(rest, head)``.

    Each group ``{"params": ps, **options}`` gives, in order, ``{"params": ps without the head's, **options}`` in
    ``rest`` (possibly empty) and, when ``ps`` holds head parameters, ``{"params": those, **options, "lr":
    log_z_lr}`` in ``head`` (``log_z_lr=None``: the group's own rate; an LR scheduler's ``initial_lr`` is not
    copied). Raises when the head has no trainable parameter (nothing to put in a group of its own).
    """
    head_ids = {id(p) for p in find_log_z_head(model).parameters() if p.requires_grad}
    if not head_ids:
        raise ValueError("the log-Z head has no trainable parameter: nothing to put in its own group")
    lr = {} if log_z_lr is None else {"lr": float(log_z_lr)}
    rest: list[dict[str, Any]] = []
    head: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        options = {k: v for k, v in group.items() if k != "params"}
        rest.append({**options, "params": [p for p in params if id(p) not in head_ids]})
        mine = [p for p in params if id(p) in head_ids]
        if mine:
            options.pop("initial_lr", None)
            head.append({**options, "params": mine, **lr})
    return rest, head


def find_log_z_head(model: nn.Module) -> LogZHead:
    """The head `attach_log_z_head` registered on ``model`` (or on the HF model inside its wrappers)."""
    head = getattr(_unwrap(model), LOG_Z_HEAD_NAME, None)
    if not isinstance(head, LogZHead):
        raise ValueError(
            f"no LogZHead named {LOG_Z_HEAD_NAME!r} on {type(_unwrap(model)).__name__}: call "
            "flowloss.adapters.common.attach_log_z_head(model) before the optimizer is built"
        )
    return head


@contextlib.contextmanager
def log_z_head_detached(model: nn.Module) -> Iterator[None]:
    """Hide the head from ``named_parameters()``/``state_dict()`` inside the block (weight sync to an inference
    engine, HF exports: they know nothing of it)."""
    hf = _unwrap(model)
    head = hf._modules.pop(LOG_Z_HEAD_NAME, None)
    try:
        yield
    finally:
        if head is not None:
            hf._modules[LOG_Z_HEAD_NAME] = head


def without_log_z_head(params: Any) -> Any:
    """Drop the head's entries from a ``{name: tensor}`` dict, or from an iterable of tuples that start with the
    name (``(name, tensor)``, ``(name, shard, spec)``): the weight-sync filter."""
    if isinstance(params, Mapping):
        return {name: value for name, value in params.items() if LOG_Z_HEAD_NAME not in name}
    return (item for item in params if LOG_Z_HEAD_NAME not in item[0])


def split_log_z_head_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(model_state, head_state)``: the head's keys (prefix stripped) apart from the model's."""
    marker = LOG_Z_HEAD_NAME + "."
    head = {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}
    model = {k: v for k, v in state_dict.items() if marker not in k}
    return model, head


def save_log_z_head(head: nn.Module | Mapping[str, torch.Tensor], output_dir: str) -> str:
    """Write the head (or its state dict) to ``output_dir/flowrl_log_z_head.safetensors``; return the path.

    Written to a temporary file first and renamed, so an interrupted save never leaves a truncated head file.
    """
    from safetensors.torch import save_file

    state = head.state_dict() if isinstance(head, nn.Module) else head
    path = os.path.join(output_dir, LOG_Z_HEAD_FILE)
    partial = f"{path}.partial"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, partial)
    os.replace(partial, path)
    return path


def load_log_z_head(head: nn.Module, checkpoint_dir: str, *, required: bool = False) -> bool:
    """Load ``checkpoint_dir/flowrl_log_z_head.safetensors`` into ``head``; False if absent (unless ``required``).

    Strict: every key of the head and no other, each of the head's shape. ``required=True`` (resuming a run)
    raises ``FileNotFoundError`` naming the file when it is absent; an unreadable file or one that does not hold
    this head raises ``ValueError`` naming the file.
    """
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, LOG_Z_HEAD_FILE)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(
                f"{path} not found: the checkpoint has no log-Z head, and resuming with a fresh head but the saved "
                "optimizer state would silently change the run. Restore the file (it is written beside the model "
                "files of every checkpoint) or start a new run from the model files."
            )
        return False
    try:
        state = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"cannot read the log-Z head file {path}: {exc}") from exc
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not hold this log-Z head: {exc}") from exc
    return True


# ----------------------------------------------------------------------------------------------------------
# The decoder's last hidden states.


def last_hidden_state(output: Any) -> torch.Tensor:
    """The ``[B, S, H]`` (or packed ``[1, N, H]``) last hidden state in a decoder's forward output."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"no last hidden state in the decoder's output ({type(output).__name__})")
    return hidden


class HiddenStateCapture:
    """A forward hook on a model's decoder that keeps its last hidden states while capturing.

    ``with capture.capturing(): model(...)`` then ``capture.pop()`` returns them (concatenated along the batch
    when the decoder ran several times, e.g. in chunks). With ``transform``, the hook stores
    ``transform(hidden)`` instead, computed *inside* the model's forward: what a head whose parameters FSDP
    gathers only during that forward needs. Outside ``capturing()`` the hook does nothing.
    """

    def __init__(self, model: nn.Module, transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self._transform = transform
        self._active = False
        self._items: list[Any] = []
        self.handle = decoder_of(model).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active:
            hidden = last_hidden_state(output)
            self._items.append(self._transform(hidden) if self._transform is not None else hidden)

    def start(self) -> None:
        """Capture from now on (``stop()`` ends it); `capturing` is the same as a ``with`` block."""
        self._items, self._active = [], True

    def stop(self) -> None:
        self._active = False

    @contextlib.contextmanager
    def capturing(self) -> Iterator[HiddenStateCapture]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    @property
    def captured(self) -> bool:
        return bool(self._items)

    def pop(self) -> Any:
        """What the hook captured (cleared); raises if the decoder did not run while capturing."""
        if not self._items:
            raise RuntimeError("the decoder did not run while capturing hidden states for log Z")
        items, self._items = self._items, []
        if len(items) == 1:
            return items[0]
        return torch.cat(items, dim=0)

    def clear(self) -> None:
        self._items = []

    def remove(self) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------------------------------------
# The normalizer.


def global_normalizer(
    global_num_sequences: float | torch.Tensor, num_processes: int, *, accumulation_scale: float = 1.0
) -> torch.Tensor:
    """``max(N, 1) / W * accumulation_scale``: the ``normalizer=`` that makes micro-batch losses add up.

    ``N`` is the number of valid sequences in the optimizer step over all ``W`` data-parallel processes. Each
    process's micro-batch loss is its sum divided by ``N / W``; the processes average their gradients, so
    the step's gradient is that of ``(1/N) sum`` over every sequence of the step. ``accumulation_scale``
    corrects a framework that counts ``N`` over a different span (TRL: ``G / S``). A float64 0-dim tensor
    (never read on the host).
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"`num_processes` must be an int >= 1, got {num_processes!r}")
    n = torch.as_tensor(global_num_sequences).detach().to(torch.float64).clamp_min(1.0)
    return n / num_processes * accumulation_scale


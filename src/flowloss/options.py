"""The losses' options, validated once, carried as one object: `FlowRLOptions` and `ReverseKLOptions`.

The fields of `FlowRLOptions` are exactly the keyword options of
[`trajectory_balance_loss`][flowloss.trajectory_balance_loss] (same names; the function's defaults *are* these
defaults, read from this module), so ``trajectory_balance_loss(..., **options.to_dict())`` and
``TrajectoryBalanceLoss(options)`` are the same loss, and every layer above (modules, adapters, the CLI) holds
one object instead of re-listing the keywords. `ReverseKLOptions` does the same for
[`reverse_kl_surrogate`][flowloss.reverse_kl_surrogate]; both share the fields of the importance weights, with
one default each. Each default is written once, here: changing it here changes every layer. Per-call tensors
(``old_logprobs``, ``rollout_logprobs``, ``normalizer``, ``baseline``) and the implementation (``impl``) are not
options.

Defaults, with their sources (see ``docs/math.md``):

================================  ==========================  ==================================================
field                             default                     source
================================  ==========================  ==================================================
``beta``                          15.0                        authors' code and verl ``recipe/flowrl``
``importance_weights``            None: ``"sequence_clipped"`` the paper's ``clip(pi/pi_old, 1-eps, 1+eps)``
                                  with ``old_logprobs``, else
                                  ``"none"``
``eps_low`` / ``eps_high``        0.2 / 0.28                  verl recipe ``clip_ratio_low/high``
``max_weight``                    10.0                        verl PR #4397 ("pure" recipe)
``tis_cap``                       2.0                         verl ``tis_imp_ratio_cap``
``token_clip_mask``               False                       verl PR #3924 (CISPO-style mask)
``length_normalization``          True (reverse KL: False)    the paper (token-mean log-likelihoods); the exact
                                                              KL for the reverse-KL surrogate
``penalty``                       ``"squared"``               trajectory balance
``linex_alpha`` / ``huber_delta`` 1.0 / 1.0                   torchgfn's alternatives
``reduction``                     ``"mean"``                  mean over valid sequences
================================  ==========================  ==================================================
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from flowloss._validation import as_flag, as_number, require_choice

ImportanceMode = Literal["sequence_clipped", "sequence_capped", "sequence", "geometric_clipped", "none"]
IMPORTANCE_MODES: tuple[str, ...] = typing.get_args(ImportanceMode)
Penalty = Literal["squared", "shifted_cosh", "linex", "huber"]
PENALTIES: tuple[str, ...] = typing.get_args(Penalty)
SequenceReduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = typing.get_args(SequenceReduction)

# Largest float32: beta * r and the weights are computed in float32, so beta must at least be representable.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

_Options = TypeVar("_Options", bound="_WeightedOptions")


def check_importance_bounds(eps_low: object, eps_high: object, max_weight: object, tis_cap: object) -> tuple:
    """``(eps_low, eps_high, max_weight, tis_cap)`` as floats: ``eps_low`` in [0, 1), ``eps_high`` >= 0 finite,
    the caps finite and > 0."""
    return (
        as_number("eps_low", eps_low, low=0.0, high=1.0, high_inclusive=False),
        as_number("eps_high", eps_high, low=0.0),
        as_number("max_weight", max_weight, low=0.0, low_inclusive=False),
        as_number("tis_cap", tis_cap, low=0.0, low_inclusive=False),
    )


def check_beta(beta: object) -> float:
    """A finite reward temperature whose magnitude fits float32 (``|beta| <= 3.4e38``)."""
    value = as_number("beta", beta)
    if abs(value) > _FLOAT32_MAX:
        raise ValueError(f"`beta` must be a finite number representable in float32 (|beta| <= 3.4e38), got {beta!r}")
    return value


@dataclass(frozen=True)
class _WeightedOptions:
    """The fields both losses share (reward temperature, importance weights, reduction) and the methods of both
    options types. Not public: build a `FlowRLOptions` or a `ReverseKLOptions`."""

    beta: float = 15.0
    importance_weights: ImportanceMode | None = None
    eps_low: float = 0.2
    eps_high: float = 0.28
    max_weight: float = 10.0
    tis_cap: float = 2.0
    reduction: SequenceReduction = "mean"

    def __post_init__(self) -> None:
        if self.importance_weights is not None:
            require_choice("importance_weights", self.importance_weights, IMPORTANCE_MODES)
        require_choice("reduction", self.reduction, REDUCTIONS)
        eps_low, eps_high, max_weight, tis_cap = check_importance_bounds(
            self.eps_low, self.eps_high, self.max_weight, self.tis_cap
        )
        self._store(beta=check_beta(self.beta), eps_low=eps_low, eps_high=eps_high, max_weight=max_weight,
                    tis_cap=tis_cap)

    def _store(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_any(
        cls: type[_Options], value: _WeightedOptions | Mapping[str, Any] | Any | None = None, **overrides: Any
    ) -> _Options:
        """Options from an instance, a mapping (dict, OmegaConf node), a namespace or None, then ``overrides``.

        Unknown keys raise ``TypeError`` listing the known ones (a typo never passes silently). An instance with no
        overrides is returned as is (it is immutable and already validated).
        """
        if isinstance(value, cls) and not overrides:
            return value
        if value is None:
            items: dict[str, Any] = {}
        elif isinstance(value, cls):
            items = value.to_dict()
        elif isinstance(value, _WeightedOptions):
            raise TypeError(f"expected {cls.__name__} or a mapping of its fields, got a {type(value).__name__}")
        elif isinstance(value, Mapping):
            items = dict(value)
        elif hasattr(value, "__dict__"):
            items = dict(vars(value))
        else:
            raise TypeError(f"{cls.__name__} must be built from itself, a mapping or a namespace, got {value!r}")
        items.update(overrides)
        known = cls.field_names()
        unknown = sorted(set(items) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
        return cls(**items)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """``{name: value}`` of every field: ``trajectory_balance_loss(..., **options.to_dict())``."""
        return {name: getattr(self, name) for name in self.field_names()}

    def replace(self: _Options, **changes: Any) -> _Options:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def resolved_importance_weights(self, has_old_logprobs: bool) -> ImportanceMode:
        """The weight mode in effect: ``importance_weights``, or its default given whether ``old_logprobs`` exist."""
        if self.importance_weights is not None:
            return self.importance_weights
        return "sequence_clipped" if has_old_logprobs else "none"


@dataclass(frozen=True)
class FlowRLOptions(_WeightedOptions):
    """Options of FlowRL's trajectory-balance loss (see the module docstring for defaults and sources).

    Built from keyword arguments (``FlowRLOptions(beta=10.0)``), a mapping or a namespace
    (``FlowRLOptions.from_any(cfg)``, unknown keys refused); validated when built: numbers must be finite
    and in range (numpy scalars are accepted and stored as float), flags must be bools (``"false"`` is
    refused, not read as True), choices must be one of the listed strings.
    """

    token_clip_mask: bool = False
    length_normalization: bool = True
    penalty: Penalty = "squared"
    linex_alpha: float = 1.0
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("penalty", self.penalty, PENALTIES)
        linex_alpha = as_number("linex_alpha", self.linex_alpha)
        if linex_alpha == 0:
            raise ValueError("`linex_alpha` must be non-zero (linex with a = 0 is the squared penalty)")
        self._store(
            token_clip_mask=as_flag("token_clip_mask", self.token_clip_mask),
            length_normalization=as_flag("length_normalization", self.length_normalization),
            linex_alpha=linex_alpha,
            huber_delta=as_number("huber_delta", self.huber_delta, low=0.0, low_inclusive=False),
        )


@dataclass(frozen=True)
class ReverseKLOptions(_WeightedOptions):
    """Options of [`reverse_kl_surrogate`][flowloss.reverse_kl_surrogate]: the importance-weight and reduction
    fields of `FlowRLOptions` (same names, same defaults), and ``length_normalization`` off by default (the
    exact KL). Built and validated like `FlowRLOptions`."""

    length_normalization: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store(length_normalization=as_flag("length_normalization", self.length_normalization))


# The defaults, read by every function that takes these options as keywords (signature defaults come from here).
TB_DEFAULTS = FlowRLOptions()
REVERSE_KL_DEFAULTS = ReverseKLOptions()

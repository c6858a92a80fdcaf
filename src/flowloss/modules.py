"""``nn.Module`` twins of the losses: options fixed once at construction, tensors per call.

``TrajectoryBalanceLoss(beta=15.0, importance_weights="sequence_clipped")(logprobs, ref_logprobs, r_hat,
log_z, mask, old_logprobs=old)`` is exactly [`trajectory_balance_loss`][flowloss.trajectory_balance_loss] with
those options. The
options are checked when the module is built, so a typo in a config fails at start-up, not at the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flowloss._validation import require_choice, require_finite_number
from flowloss.importance import IMPORTANCE_MODES, check_importance_options
from flowloss.losses import reverse_kl_surrogate, trajectory_balance_loss
from flowloss.penalties import check_penalty

_PER_CALL = ("old_logprobs", "rollout_logprobs", "normalizer", "baseline")


def _check_common(options: dict[str, Any]) -> None:
    for name in _PER_CALL:
        if name in options:
            raise TypeError(f"`{name}` is a per-call tensor/value: pass it to forward(), not to the constructor")
    require_finite_number("beta", options.get("beta", 15.0))
    mode = options.get("importance_weights")
    if mode is not None:
        require_choice("importance_weights", mode, IMPORTANCE_MODES)
    check_importance_options(
        mode or "none",
        options.get("eps_low", 0.2),
        options.get("eps_high", 0.28),
        options.get("max_weight", 10.0),
        options.get("tis_cap", 2.0),
    )
    require_choice("reduction", options.get("reduction", "mean"), ("mean", "sum", "none"))


class _LossModule(nn.Module):
    """Options of ``function`` checked and fixed at construction; ``forward`` passes tensors and per-call values."""

    function: Callable[..., Any]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        _check_common(options)
        unknown = set(options) - set(self.function.__kwdefaults__)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for {self.function.__name__}")
        self.options = options

    def _call(self, *tensors: torch.Tensor, **per_call: Any) -> Any:
        return type(self).function(*tensors, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TrajectoryBalanceLoss(_LossModule):
    """Module form of [`trajectory_balance_loss`][flowloss.trajectory_balance_loss]; keyword options as there."""

    function = staticmethod(trajectory_balance_loss)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_penalty(
            options.get("penalty", "squared"), options.get("linex_alpha", 1.0), options.get("huber_delta", 1.0)
        )

    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        log_z: torch.Tensor,
        mask: torch.Tensor,
        **per_call: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``per_call``: ``old_logprobs``, ``rollout_logprobs``, ``normalizer`` (or any option to override)."""
        return self._call(logprobs, ref_logprobs, rewards, log_z, mask, **per_call)


class ReverseKLSurrogate(_LossModule):
    """Module form of [`reverse_kl_surrogate`][flowloss.reverse_kl_surrogate]; keyword options as there."""

    function = staticmethod(reverse_kl_surrogate)

    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        mask: torch.Tensor,
        **per_call: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``per_call``: ``baseline``, ``old_logprobs``, ``rollout_logprobs``, ``normalizer`` (or overrides)."""
        return self._call(logprobs, ref_logprobs, rewards, mask, **per_call)

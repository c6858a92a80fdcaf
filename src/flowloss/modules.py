"""``nn.Module`` twins of the losses: options fixed once at construction, tensors per call.

``TrajectoryBalanceLoss(FlowRLOptions(beta=15.0))(logprobs, ref_logprobs, r_hat, log_z, mask, old_logprobs=old)``
is exactly [`trajectory_balance_loss`][flowloss.trajectory_balance_loss] with those options (keyword options
work too: ``TrajectoryBalanceLoss(beta=15.0)``). The options are checked when the module is built, so a typo in
a config fails at start-up, not at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flowloss.losses import resolve_options, reverse_kl_surrogate, trajectory_balance_loss
from flowloss.options import FlowRLOptions

_PER_CALL = ("old_logprobs", "rollout_logprobs", "normalizer", "baseline", "return_stats", "strict")


def _refuse_per_call(options: Mapping[str, Any]) -> None:
    for name in _PER_CALL:
        if name in options:
            raise TypeError(f"`{name}` is a per-call tensor/value: pass it to forward(), not to the constructor")


class TrajectoryBalanceLoss(nn.Module):
    """Module form of [`trajectory_balance_loss`][flowloss.trajectory_balance_loss].

    Build it from a [`FlowRLOptions`][flowloss.FlowRLOptions], a mapping (e.g. a Hydra node) and/or keyword
    options; ``self.options`` holds the validated object. ``forward`` takes the tensors and the per-call
    values (``old_logprobs``, ``rollout_logprobs``, ``normalizer``, ``return_stats``, ``strict``).
    """

    def __init__(self, options: FlowRLOptions | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        _refuse_per_call(overrides)
        if isinstance(options, Mapping):
            _refuse_per_call(options)
        self.options = FlowRLOptions.from_any(options, **overrides)

    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        log_z: torch.Tensor,
        mask: torch.Tensor,
        *,
        old_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        return_stats: bool = False,
        strict: bool | None = None,
        **overrides: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss with ``self.options``; ``overrides`` replace options for this call only."""
        options = self.options.replace(**overrides) if overrides else self.options
        return trajectory_balance_loss(
            logprobs,
            ref_logprobs,
            rewards,
            log_z,
            mask,
            old_logprobs=old_logprobs,
            rollout_logprobs=rollout_logprobs,
            normalizer=normalizer,
            return_stats=return_stats,
            strict=strict,
            **options.to_dict(),
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.to_dict().items())


class ReverseKLSurrogate(nn.Module):
    """Module form of [`reverse_kl_surrogate`][flowloss.reverse_kl_surrogate]; keyword options as there."""

    _OPTIONS = (
        "beta",
        "importance_weights",
        "eps_low",
        "eps_high",
        "max_weight",
        "tis_cap",
        "length_normalization",
        "reduction",
    )

    def __init__(self, **options: Any) -> None:
        super().__init__()
        _refuse_per_call(options)
        unknown = sorted(set(options) - set(self._OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for reverse_kl_surrogate; known: {list(self._OPTIONS)}")
        options.setdefault("length_normalization", False)  # the function's default (the exact KL)
        resolve_options(**options)  # validated now, not at the first step
        self.options = options

    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        mask: torch.Tensor,
        **per_call: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``per_call``: ``baseline``, ``old_logprobs``, ``rollout_logprobs``, ``normalizer`` (or overrides)."""
        return reverse_kl_surrogate(logprobs, ref_logprobs, rewards, mask, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

"""``nn.Module`` twins of the losses: options fixed once at construction, tensors per call.

``TrajectoryBalanceLoss(FlowRLOptions(beta=15.0))(logprobs, ref_logprobs, r_hat, log_z, mask, old_logprobs=old)``
is exactly [`trajectory_balance_loss`][flowloss.trajectory_balance_loss] with those options (keyword options
work too: ``TrajectoryBalanceLoss(beta=15.0)``). The options are checked when the module is built, so a typo in
a config fails at start-up, not at the first step; each call then hands the validated object to the losses'
core as is (nothing is rebuilt or re-validated per step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn

from flowloss._validation import require_choice
from flowloss.losses import REVERSE_KL_IMPLS, LossImpl, Stats, _reverse_kl, _trajectory_balance
from flowloss.ops.dispatch import LOSS_IMPLS
from flowloss.options import FlowRLOptions, ReverseKLOptions

_PER_CALL = ("old_logprobs", "rollout_logprobs", "normalizer", "baseline", "return_stats", "strict")


def _refuse_per_call(options: Mapping[str, Any]) -> None:
    for name in _PER_CALL:
        if name in options:
            raise TypeError(f"`{name}` is a per-call tensor/value: pass it to forward(), not to the constructor")


class TrajectoryBalanceLoss(nn.Module):
    """Module form of [`trajectory_balance_loss`][flowloss.trajectory_balance_loss].

    Build it from a [`FlowRLOptions`][flowloss.FlowRLOptions], a mapping (e.g. a Hydra node) and/or keyword
    options; ``self.options`` holds the validated object, ``self.impl`` the implementation (``"auto"``,
    ``"triton"`` or ``"pytorch"``, as the function's ``impl``). ``forward`` takes the tensors and the per-call
    values (``old_logprobs``, ``rollout_logprobs``, ``normalizer``, ``return_stats``, ``strict``).
    """

    def __init__(
        self,
        options: FlowRLOptions | Mapping[str, Any] | None = None,
        *,
        impl: LossImpl = "auto",
        **overrides: Any,
    ) -> None:
        super().__init__()
        _refuse_per_call(overrides)
        if isinstance(options, Mapping):
            _refuse_per_call(options)
        require_choice("impl", impl, LOSS_IMPLS)
        self.options = FlowRLOptions.from_any(options, **overrides)
        self.impl = impl

    @overload
    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        log_z: torch.Tensor,
        mask: torch.Tensor,
        *,
        old_logprobs: torch.Tensor | None = ...,
        rollout_logprobs: torch.Tensor | None = ...,
        normalizer: float | torch.Tensor | None = ...,
        return_stats: Literal[False] = ...,
        strict: bool | None = ...,
        **overrides: Any,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        log_z: torch.Tensor,
        mask: torch.Tensor,
        *,
        old_logprobs: torch.Tensor | None = ...,
        rollout_logprobs: torch.Tensor | None = ...,
        normalizer: float | torch.Tensor | None = ...,
        return_stats: Literal[True],
        strict: bool | None = ...,
        **overrides: Any,
    ) -> tuple[torch.Tensor, Stats]: ...

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
    ) -> torch.Tensor | tuple[torch.Tensor, Stats]:
        """The loss with ``self.options``; ``overrides`` replace options for this call only."""
        options = self.options.replace(**overrides) if overrides else self.options
        return _trajectory_balance(
            options, logprobs, ref_logprobs, rewards, log_z, mask, old_logprobs=old_logprobs,
            rollout_logprobs=rollout_logprobs, normalizer=normalizer, return_stats=return_stats, strict=strict,
            impl=self.impl,
        )

    if TYPE_CHECKING:  # torch types nn.Module.__call__ as Callable[..., Any]: callers get forward's overloads
        __call__ = forward

    def extra_repr(self) -> str:
        items = [f"{k}={v!r}" for k, v in self.options.to_dict().items()]
        return ", ".join([*items, f"impl={self.impl!r}"])


class ReverseKLSurrogate(nn.Module):
    """Module form of [`reverse_kl_surrogate`][flowloss.reverse_kl_surrogate].

    Built like `TrajectoryBalanceLoss`, from a [`ReverseKLOptions`][flowloss.ReverseKLOptions], a mapping and/or
    keyword options (``ReverseKLSurrogate(beta=15.0)``); ``forward`` takes the tensors and the per-call values
    (``baseline``, ``old_logprobs``, ``rollout_logprobs``, ``normalizer``, ``return_stats``, ``strict``).
    """

    def __init__(
        self,
        options: ReverseKLOptions | Mapping[str, Any] | None = None,
        *,
        impl: Literal["auto", "pytorch"] = "auto",
        **overrides: Any,
    ) -> None:
        super().__init__()
        _refuse_per_call(overrides)
        if isinstance(options, Mapping):
            _refuse_per_call(options)
        require_choice("impl", impl, REVERSE_KL_IMPLS)
        self.options = ReverseKLOptions.from_any(options, **overrides)
        self.impl = impl

    def forward(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        mask: torch.Tensor,
        *,
        baseline: torch.Tensor | float | None = None,
        old_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        return_stats: bool = False,
        strict: bool | None = None,
        **overrides: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, Stats]:
        """The surrogate with ``self.options``; ``overrides`` replace options for this call only."""
        options = self.options.replace(**overrides) if overrides else self.options
        return _reverse_kl(
            options, logprobs, ref_logprobs, rewards, mask, baseline=baseline, old_logprobs=old_logprobs,
            rollout_logprobs=rollout_logprobs, normalizer=normalizer, return_stats=return_stats, strict=strict,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        items = [f"{k}={v!r}" for k, v in self.options.to_dict().items()]
        return ", ".join([*items, f"impl={self.impl!r}"])

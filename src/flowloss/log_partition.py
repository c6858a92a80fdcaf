"""Estimators of the log-partition ``log Z(x)`` of FlowRL's target ``pi_ref(y|x) exp(beta r(x, y)) / Z(x)``.

* `LogZHead`: the authors' learned MLP on the prompt's pooled last hidden states (trained jointly with the
  policy; gradients flow into the LLM).
* `pool_prompt_hidden_states`: ``[B, T, H]`` hidden states + prompt mask -> ``[B, H]`` mean over prompt tokens.
* `LogZTable`: one learnable scalar per prompt id, for small problems with a fixed prompt set.
* `vargrad_log_z`: the parameter-free VarGrad estimate from a group of K responses (TBA, arXiv 2503.18929).
"""

from __future__ import annotations

import torch
from torch import nn

from flowloss._validation import (
    accumulation_dtype,
    as_bool_mask,
    as_flag,
    check_finite_values,
    check_finite_where,
    describe,
    require_finite_number,
    require_float,
    require_float_tensor,
    require_ndim,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from flowloss.grouping import Groups, group_index
from flowloss.options import TB_DEFAULTS
from flowloss.reductions import masked_mean, masked_sum
from flowloss.strict import is_strict


class LogZHead(nn.Module):
    """``log Z_phi(x)`` from pooled prompt hidden states, as in the FlowRL reference code.

    ``(num_layers - 1) x [Linear(H, H) -> GELU -> LayerNorm(H) -> Dropout(p)]`` then ``Linear(H, 1)``;
    ``num_layers = 3`` and ``p = 0.1`` are the authors' values. Input ``[B, H]`` (see
    `pool_prompt_hidden_states`), output ``[B]``. The head runs in the dtype of its parameters; the input
    is cast to it. ``init_log_z`` sets the output layer's bias (its weight starts at zero when ``zero_init``), so
    training can start from a chosen constant.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_layers: int = 3,
        dropout: float = 0.1,
        init_log_z: float = 0.0,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"`hidden_size` must be an int >= 1, got {hidden_size!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"`num_layers` must be an int >= 1, got {num_layers!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        require_finite_number("init_log_z", init_log_z)
        self.hidden_size = hidden_size
        blocks: list[nn.Module] = []
        for _ in range(num_layers - 1):
            blocks += [
                nn.Linear(hidden_size, hidden_size),
                nn.GELU(),
                nn.LayerNorm(hidden_size),
                nn.Dropout(dropout),
            ]
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            if zero_init:
                self.out.weight.zero_()
            self.out.bias.fill_(float(init_log_z))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        require_tensor("pooled", pooled)
        require_float("pooled", pooled)
        if pooled.dim() != 2 or pooled.shape[-1] != self.hidden_size:
            raise ValueError(f"`pooled` must have shape [B, {self.hidden_size}], got {describe(pooled)}")
        x = pooled.to(self.out.weight.dtype)
        return self.out(self.body(x)).squeeze(-1)


def pool_prompt_hidden_states(
    hidden_states: torch.Tensor, prompt_mask: torch.Tensor, *, drop_last_token: bool = False
) -> torch.Tensor:
    """Mean of the hidden states over each prompt's tokens: ``[B, T, H], [B, T] -> [B, H]``.

    ``h_bar_i = (1/n_i) sum_t m_it h_it`` accumulated in float32 (float64 for float64 input) and returned in the
    input dtype. Works for left- or right-padded prompts. ``drop_last_token=True`` leaves out each prompt's last
    token as the authors' slicing does. A row with no prompt token pools to zeros (finite). Masked positions may
    hold anything (NaN/inf padding): they are selected away, never multiplied by 0.
    """
    require_tensor("hidden_states", hidden_states)
    require_float("hidden_states", hidden_states)
    require_ndim("hidden_states", hidden_states, (3,), "a [B, T, H] tensor of hidden states")
    require_tensor("prompt_mask", prompt_mask)
    if prompt_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"`prompt_mask` must have shape {tuple(hidden_states.shape[:2])} (the first two dims of "
            f"`hidden_states`), got {describe(prompt_mask)}"
        )
    m = as_bool_mask("prompt_mask", prompt_mask, "prompt_mask", prompt_mask)
    if m.device != hidden_states.device:
        raise ValueError(f"`prompt_mask` is on {m.device} but `hidden_states` is on {hidden_states.device}")
    if drop_last_token:
        positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
        last = torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
        m = m & (positions != last)
    dtype = accumulation_dtype(hidden_states)
    kept = m.unsqueeze(-1)
    total = torch.where(kept, hidden_states.to(dtype), hidden_states.new_zeros((), dtype=dtype)).sum(dim=1)
    count = m.sum(dim=1, keepdim=True).to(dtype).clamp_min(1.0)
    return (total / count).to(hidden_states.dtype)


class LogZTable(nn.Module):
    """A learnable ``log Z`` per prompt id: ``[B]`` int64 ids in ``[0, num_prompts)`` -> ``[B]`` log Z."""

    def __init__(self, num_prompts: int, *, init_log_z: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"`num_prompts` must be an int >= 1, got {num_prompts!r}")
        require_finite_number("init_log_z", init_log_z)
        self.log_z = nn.Parameter(torch.full((num_prompts,), float(init_log_z)))

    def forward(self, prompt_ids: torch.Tensor, *, strict: bool | None = None) -> torch.Tensor:
        """``[B]`` ids -> ``[B]`` log Z; an id outside ``[0, num_prompts)`` gives NaN (never an out-of-bounds
        read), or an error in strict mode."""
        require_tensor("prompt_ids", prompt_ids)
        if prompt_ids.dtype not in (torch.int32, torch.int64) or prompt_ids.dim() != 1:
            # uint8/bool would index as a mask, not as ids
            raise TypeError(f"`prompt_ids` must be a [B] int32/int64 tensor, got {describe(prompt_ids)}")
        n = self.log_z.shape[0]
        inside = (prompt_ids >= 0) & (prompt_ids < n)
        if is_strict(strict) and prompt_ids.numel() and not bool(inside.all()):
            raise ValueError(
                f"`prompt_ids` must lie in [0, {n}), got values in [{int(prompt_ids.min())}, {int(prompt_ids.max())}]"
            )
        values = self.log_z[prompt_ids.clamp(0, n - 1)]
        return torch.where(inside, values, values.new_full((), float("nan")))


def vargrad_log_z(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    groups: Groups,
    *,
    beta: float = TB_DEFAULTS.beta,
    length_normalization: bool = TB_DEFAULTS.length_normalization,
    strict: bool | None = None,
) -> torch.Tensor:
    """Parameter-free VarGrad estimate of ``log Z`` per group, broadcast to its members (detached).

    ``log Z_hat(x) = (1/K) sum_k [beta r_k - (l_k - l_ref_k)]`` over the ``K`` responses of a prompt, with ``l``
    the (length-normalized by default, as in the TB residual) log-likelihood. Plugged into
    [`trajectory_balance_loss`][flowloss.trajectory_balance_loss], its expected on-policy gradient is
    ``(K - 1)/K`` times the KL
    gradient (TBA, arXiv 2503.18929). Rows with no response token are left out of their group's mean.

    Args: ``logprobs, ref_logprobs [B, T]``, ``rewards [B]``, ``mask [B, T]``, ``groups`` a group size or ``[B]``
    group ids (see [`group_normalize_rewards`][flowloss.group_normalize_rewards]). Returns ``[B]`` without gradient.
    """
    beta = require_finite_number("beta", beta)
    length_normalization = as_flag("length_normalization", length_normalization)
    for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("rewards", rewards)):
        require_float_tensor(name, t)
    require_ndim("logprobs", logprobs, (2,), "a [B, T] tensor of token log-probs")
    require_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if rewards.shape != (logprobs.shape[0],):
        raise ValueError(f"`rewards` must have shape ({logprobs.shape[0]},), got {describe(rewards)}")
    strict = is_strict(strict)
    m = as_bool_mask("mask", mask, "logprobs", logprobs, strict=strict)
    require_same_device([("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("rewards", rewards), ("mask", m)])
    if strict:
        check_finite_values([("rewards", rewards)])
        check_finite_where(m, [("logprobs", logprobs), ("ref_logprobs", ref_logprobs)])
    reduce = masked_mean if length_normalization else masked_sum
    with torch.no_grad():
        lp = reduce(logprobs.detach(), m)
        ref = reduce(ref_logprobs.detach(), m)
        dtype = accumulation_dtype(logprobs, ref_logprobs, rewards)
        target = beta * rewards.to(dtype) - (lp.to(dtype) - ref.to(dtype))
        valid = m.any(dim=-1)
        index, num_groups = group_index(groups, logprobs.shape[0], logprobs.device)
        target = torch.where(valid, target, torch.zeros_like(target))
        sums = torch.zeros(num_groups, dtype=dtype, device=target.device).index_add(0, index, target)
        sizes = torch.zeros(num_groups, dtype=dtype, device=target.device).index_add(0, index, valid.to(dtype))
        return (sums / sizes.clamp_min(1.0))[index]

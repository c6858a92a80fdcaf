"""Groups of responses to the same prompt, and the reward z-score within each group.

A group is given either by an ``int`` group size ``K`` (the batch is ``B = P * K`` responses laid out prompt by
prompt, as GRPO/FlowRL rollouts are) or by a ``[B]`` integer tensor of group ids (any order, any group sizes).
"""

from __future__ import annotations

import torch

from flowloss._validation import (
    accumulation_dtype,
    as_flag,
    as_number,
    check_finite_values,
    describe,
    require_float_tensor,
    require_ndim,
)
from flowloss.strict import is_strict

Groups = int | torch.Tensor


def group_index(groups: Groups, batch_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Return ``(index [B] int64, G)``: ``index[i]`` in ``[0, G)`` is the group of row ``i``.

    For a group size ``K``, ``G = B / K`` exactly. For ``[B]`` group ids, ``G = B`` (an upper bound: slots no
    row maps to stay empty), so that counting the distinct ids never needs a host synchronisation; ids are
    numbered by sorting, so any integer ids in any order work.
    """
    if isinstance(groups, bool):
        raise TypeError("`groups` must be an int group size or a [B] tensor of group ids, got bool")
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"`groups` (group size) must be >= 1, got {groups}")
        if batch_size % groups != 0:
            raise ValueError(
                f"`groups` (group size) {groups} does not divide the batch size {batch_size}; pass a [B] tensor "
                "of group ids for ragged groups"
            )
        index = torch.arange(batch_size, device=device) // groups
        return index, batch_size // groups
    if isinstance(groups, torch.Tensor):
        if groups.dim() != 1 or groups.shape[0] != batch_size:
            raise ValueError(f"`groups` (group ids) must have shape ({batch_size},), got {describe(groups)}")
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise TypeError(f"`groups` (group ids) must be an integer tensor, got {describe(groups)}")
        if groups.device != device:
            raise ValueError(f"`groups` is on {groups.device} but the values are on {device}")
        sorted_ids, order = torch.sort(groups, stable=True)
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
        rank = torch.cumsum(starts, dim=0) - 1  # group number of each sorted row
        index = torch.empty_like(rank).scatter_(0, order, rank)
        return index, batch_size
    raise TypeError(f"`groups` must be an int group size or a [B] tensor of group ids, got {type(groups).__name__}")


def group_mean(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and size, each ``[G]``: ``mean_g = (1/n_g) sum_{i in g} v_i``."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, index, values)
    sizes = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(
        0, index, torch.ones_like(values)
    )
    return sums / sizes, sizes


def group_normalize_rewards(
    rewards: torch.Tensor, groups: Groups, *, eps: float = 1e-6, scale: bool = True, strict: bool | None = None
) -> torch.Tensor:
    """Z-score each reward within its prompt's group: ``r_hat_i = (r_i - mean_g) / (std_g + eps)``.

    ``rewards [B]`` (float), ``groups``: group size ``K`` (contiguous groups, ``K`` must divide ``B``) or ``[B]``
    integer group ids. ``std_g`` is the unbiased (``n_g - 1``) standard deviation, as verl's GRPO advantage that
    the FlowRL recipe feeds in as its reward; a group of one has mean 0 and std 1 (so ``r_hat = r / (1 + eps)``),
    as in verl. A group whose rewards are all equal gets ``r_hat = 0``. With ``scale=False`` only the mean is
    removed (Dr. GRPO style). Returns ``[B]`` in float32 (float64 for float64 input); no gradient is needed.
    A non-finite reward makes its group's values NaN; strict mode (`flowloss.strict`) refuses it instead.
    """
    require_float_tensor("rewards", rewards)
    require_ndim("rewards", rewards, (1,), "a [B] tensor of one reward per response")
    eps = as_number("eps", eps, low=0.0)
    scale = as_flag("scale", scale)
    if is_strict(strict):
        check_finite_values([("rewards", rewards)])
    index, num_groups = group_index(groups, rewards.shape[0], rewards.device)
    r = rewards.detach().to(accumulation_dtype(rewards))
    mean, sizes = group_mean(r, index, num_groups)
    centred = r - mean[index]
    sq = torch.zeros_like(mean).index_add(0, index, centred * centred)
    std = torch.sqrt(sq / (sizes - 1).clamp_min(1.0))
    singleton = sizes[index] < 2
    # A group of equal rewards is exactly 0: its rounded mean can leave a spread of a few ulps that
    # 1 / (std + eps) would blow up (16 x float32(0.7) gave 0.106, and NaN with eps = 0).
    group_max = torch.full_like(mean, -torch.inf).scatter_reduce(0, index, r, reduce="amax")
    group_min = torch.full_like(mean, torch.inf).scatter_reduce(0, index, r, reduce="amin")
    constant = (group_max == group_min)[index] & ~singleton
    centred = torch.where(singleton, r, torch.where(constant, torch.zeros_like(r), centred))
    if not scale:
        return centred
    std_i = torch.where(singleton | constant, torch.ones_like(r), std[index])
    return centred / (std_i + eps)

"""Reductions, group reward normalization, importance weights and log-Z estimators vs the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowloss import (
    LogZHead,
    LogZTable,
    clipped_importance_weights,
    count_valid_sequences,
    group_normalize_rewards,
    length_normalize,
    masked_mean,
    masked_sum,
    pool_prompt_hidden_states,
    ratio_clip_token_mask,
    sequence_logprobs,
    vargrad_log_z,
)
from flowloss import reference as ref
from tests.conftest import assert_close
from tests.strategies import batches, f64_leaf, leaf, masks


@given(batch=batches(), reduction=st.sampled_from(["mean", "sum"]))
def test_masked_reductions_match_reference(batch, reduction):
    """l_i = sum_t m_it lp_it (masked_sum) or that over |y_i| (masked_mean); 0 for an empty row; gradient
    m_it (/|y_i|)."""
    lp = leaf(batch.logprobs)
    out = (masked_mean if reduction == "mean" else masked_sum)(lp, batch.mask)
    lp64 = f64_leaf(batch.logprobs)
    expected = ref.sequence_logprob(lp64, batch.mask, normalize=reduction == "mean")
    assert_close(out, expected, dtype=batch.dtype, what=f"masked token-{reduction}", scale=batch.mask.shape[1])
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out * weights.to(out.dtype)).sum().backward()
    if expected.requires_grad:
        (expected * weights).sum().backward()
        assert_close(lp.grad, lp64.grad, dtype=batch.dtype, what="d(masked reduction)", grad=True)
    else:
        assert not lp.grad.any()


def test_deprecated_reduction_aliases_warn_and_equal_the_one_name():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 4, generator=g).masked_fill(torch.eye(3, 4, dtype=torch.bool), float("nan"))
    mask = ~torch.eye(3, 4, dtype=torch.bool)
    with pytest.warns(DeprecationWarning, match="since 0.2.0 and will be removed in 0.3.0: use `masked_mean`") as seen:
        assert torch.equal(length_normalize(lp, mask), masked_mean(lp, mask))
    assert seen[0].filename == __file__, "the warning points at the caller's line"
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert torch.equal(sequence_logprobs(lp, mask, reduction="sum"), masked_sum(lp, mask))
    with pytest.warns(DeprecationWarning):
        out = sequence_logprobs(lp, mask, reduction="none")
    assert torch.equal(out, torch.where(mask, lp, 0.0))
    with pytest.warns(DeprecationWarning, match="`mode=` is deprecated since 0.2.0") as seen:
        w = clipped_importance_weights(lp, torch.zeros(3, 4), mask, mode="sequence")
    assert seen[0].filename == __file__
    assert torch.equal(w, clipped_importance_weights(lp, torch.zeros(3, 4), mask, importance_weights="sequence"))
    assert count_valid_sequences(torch.tensor([[1, 0], [0, 0]])).item() == 1


@st.composite
def reward_groups(draw):
    contiguous = draw(st.booleans())
    if contiguous:
        k = draw(st.integers(1, 5))
        p = draw(st.integers(1, 4))
        ids = [i // k for i in range(p * k)]
        groups = k
    else:
        ids = draw(st.lists(st.integers(0, 4), min_size=1, max_size=12))
        groups = torch.tensor(ids)
    values = draw(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=len(ids), max_size=len(ids)))
    # exact ties inside a group are common with 0/1 rewards
    if draw(st.booleans()):
        values = [float(round(v) % 2) for v in values]
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    return torch.tensor(values, dtype=dtype), groups, ids


@given(data=reward_groups(), scale=st.booleans())
def test_group_normalize_rewards_matches_reference(data, scale):
    """r_hat = (r - mean_g) / (std_g + eps), unbiased std, singleton groups mean 0 std 1."""
    rewards, groups, ids = data
    out = group_normalize_rewards(rewards, groups, scale=scale)
    expected = ref.group_normalize_rewards(rewards.double(), ids, eps=1e-6, scale=scale)
    # float32 z-scores of values up to 100 with std down to ~1e-2 lose ~1e-4 relative
    assert_close(out, expected, dtype=rewards.dtype, what="group z-score", scale=1e3 if scale else 10)


@given(
    value=st.floats(-1e3, 1e3, allow_nan=False, width=32),
    k=st.integers(2, 17),
    eps=st.sampled_from([0.0, 1e-6]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_group_of_equal_rewards_normalizes_to_exactly_zero(value, k, eps, dtype):
    """A constant group has r_hat = 0 exactly, for any value (not only 0/1) and even with eps = 0."""
    rewards = torch.full((2 * k,), value, dtype=dtype)
    rewards[k:] = torch.linspace(-1, 1, k, dtype=dtype)  # a second, non-constant group
    out = group_normalize_rewards(rewards, k, eps=eps)
    assert torch.equal(out[:k], torch.zeros(k, dtype=out.dtype))
    assert torch.isfinite(out).all()


@given(data=reward_groups())
def test_group_normalized_rewards_have_zero_mean_and_unit_std(data):
    """Invariant: each group of >= 2 distinct rewards has mean 0 and (unbiased) std ~ 1 after normalization."""
    rewards, _, ids = data
    out = group_normalize_rewards(rewards.double(), torch.tensor(ids)).double()
    for g in set(ids):
        idx = [i for i, h in enumerate(ids) if h == g]
        vals = rewards.double()[idx]
        if len(idx) >= 2 and vals.std() > 1e-3:
            assert abs(out[idx].mean().item()) < 1e-9
            assert out[idx].std().item() == pytest.approx(1.0, rel=1e-4)


@given(
    batch=batches(),
    mode=st.sampled_from(["none", "sequence_clipped", "sequence_capped", "sequence", "geometric_clipped"]),
    with_rollout=st.booleans(),
    shift=st.sampled_from([0.0, 1000.0, -1000.0]),
)
def test_importance_weights_match_reference(batch, mode, with_rollout, shift):
    """Every mode of w computed in log space; log-ratios of +-1000 stay finite."""
    old = (batch.old_logprobs.double() + shift).to(batch.dtype)
    rollout = batch.rollout_logprobs if with_rollout else None
    w = clipped_importance_weights(batch.logprobs, old, batch.mask, importance_weights=mode, rollout_logprobs=rollout)
    expected = ref.importance_weights(batch.logprobs, old, batch.mask, mode=mode, rollout_logprobs=rollout)
    assert torch.isfinite(w).all()
    assert not w.requires_grad
    # exp of a log-ratio summed over up to 7 tokens in float32: relative error ~ |log w| * 1e-7
    assert_close(w, expected, dtype=batch.dtype, what=f"importance weight ({mode})", scale=10)
    if mode in ("sequence_clipped", "geometric_clipped") and not with_rollout:
        assert bool(((w >= 0.8 - 1e-6) & (w <= 1.28 + 1e-6)).all())


def test_importance_weights_are_detached_even_from_a_grad_leaf():
    lp = torch.zeros(2, 3, requires_grad=True)
    w = clipped_importance_weights(lp, torch.zeros(2, 3), torch.ones(2, 3))
    assert not w.requires_grad and w.tolist() == [1.0, 1.0]


def test_ratio_clip_token_mask():
    """Drop (A > 0, ratio > 1 + eps_high) and (A < 0, ratio < 1 - eps_low); keep the rest."""
    lp = torch.zeros(2, 3)
    old = torch.tensor([[0.0, -1.0, 1.0], [0.0, -1.0, 1.0]])  # ratios 1, e, 1/e
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = ratio_clip_token_mask(lp, old, torch.tensor([1.0, -1.0]), mask)
    assert out.tolist() == [[True, False, True], [True, True, False]]


@given(batch=batches(dtypes=(torch.float64, torch.float32)), k=st.integers(1, 3), normalize=st.booleans())
def test_vargrad_log_z_matches_reference(batch, k, normalize):
    """log Z_hat = mean_k (beta r_k - (l_k - l_ref_k)) over the non-empty members of the group."""
    b = batch.logprobs.shape[0]
    ids = [i // k for i in range(b)]
    out = vargrad_log_z(
        batch.logprobs,
        batch.ref_logprobs,
        batch.rewards,
        batch.mask,
        torch.tensor(ids),
        beta=3.0,
        length_normalization=normalize,
    )
    expected = ref.vargrad_log_z(
        batch.logprobs, batch.ref_logprobs, batch.rewards, batch.mask, ids, beta=3.0, normalize=normalize
    )
    assert not out.requires_grad
    assert_close(out, expected, dtype=batch.dtype, what="VarGrad log Z", scale=100)


@given(
    b=st.integers(1, 4),
    t=st.integers(1, 6),
    h=st.integers(1, 5),
    drop_last=st.booleans(),
    data=st.data(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_pool_prompt_hidden_states_matches_reference(b, t, h, drop_last, data, dtype):
    """h_bar_i = mean of h_it over the prompt tokens (left- or right-padded), zeros for an empty prompt."""
    hidden = torch.randn(b, t, h, generator=torch.Generator().manual_seed(b * 100 + t)).to(dtype)
    mask = data.draw(masks(b, t))
    out = pool_prompt_hidden_states(hidden, mask, drop_last_token=drop_last)
    expected = ref.pool_prompt_hidden_states(hidden, mask, drop_last_token=drop_last)
    assert out.dtype == dtype
    tol_dtype = torch.bfloat16 if dtype == torch.bfloat16 else dtype
    assert_close(
        out,
        expected,
        dtype=tol_dtype,
        what="prompt mean pooling",
        scale=1e2 if dtype == torch.bfloat16 else 1.0,
        grad=dtype == torch.bfloat16,
    )


def test_log_z_head_architecture_and_gradients():
    """(num_layers - 1) x [Linear, GELU, LayerNorm, Dropout] + Linear(H, 1); [B, H] -> [B]; grads reach input."""
    head = LogZHead(8, num_layers=3, dropout=0.1)
    kinds = [type(m).__name__ for m in head.body] + [type(head.out).__name__]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Dropout"] * 2 + ["Linear"]
    pooled = torch.randn(5, 8, requires_grad=True)
    out = head(pooled)
    assert out.shape == (5,)
    out.sum().backward()
    assert pooled.grad is not None and pooled.grad.abs().sum() > 0
    start = LogZHead(8, init_log_z=2.5, zero_init=True).eval()
    assert torch.allclose(start(torch.randn(3, 8)), torch.full((3,), 2.5))
    with pytest.raises(ValueError, match="pooled"):
        head(torch.randn(5, 7))


def test_log_z_table():
    table = LogZTable(3, init_log_z=1.0)
    out = table(torch.tensor([0, 2, 2]))
    out.sum().backward()
    assert out.tolist() == [1.0, 1.0, 1.0]
    assert table.log_z.grad.tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match=r"`prompt_ids` must lie in \[0, 3\)"):
        table(torch.tensor([3]), strict=True)
    outside = table(torch.tensor([3, -1, 1]))  # default: NaN, never an out-of-bounds read, no host sync
    assert outside[:2].isnan().all() and outside[2].item() == 1.0
    with pytest.raises(TypeError, match="prompt_ids"):
        table(torch.tensor([0.0]))


def test_clip_bounds_are_log1p():
    w = clipped_importance_weights(
        torch.tensor([[5.0], [-5.0]]), torch.zeros(2, 1), torch.ones(2, 1), eps_low=0.1, eps_high=0.5
    )
    assert w.tolist() == pytest.approx([1.5, 0.9])
    assert math.isclose(
        clipped_importance_weights(
            torch.tensor([[9.0]]),
            torch.zeros(1, 1),
            torch.ones(1, 1),
            importance_weights="sequence_capped",
            max_weight=3.0,
        ).item(),
        3.0,
        rel_tol=1e-6,
    )


def test_pooling_selects_the_prompt_tokens_so_nan_padding_cannot_leak():
    """0.1 multiplied by the mask: NaN/inf in padding made log Z NaN (and the loss blamed `log_z`)."""
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    clean = pool_prompt_hidden_states(hidden, mask)
    poisoned = hidden.clone()
    poisoned[0, 0] = float("nan")
    poisoned[1, 2:] = float("inf")
    leaf_h = poisoned.clone().requires_grad_()
    pooled = pool_prompt_hidden_states(leaf_h, mask)
    torch.testing.assert_close(pooled, clean)
    pooled.sum().backward()
    assert torch.isfinite(leaf_h.grad).all() and (leaf_h.grad[~mask] == 0).all()

"""Bad input gets a clear ValueError/TypeError naming the argument (and shapes/dtypes), never a NaN or a crash."""

from __future__ import annotations

import pytest
import torch

from flowloss import (
    FlowRLOptions,
    LogZHead,
    LogZTable,
    ReverseKLSurrogate,
    TrajectoryBalanceLoss,
    clipped_importance_weights,
    group_normalize_rewards,
    pool_prompt_hidden_states,
    ratio_clip_token_mask,
    reduce_sequences,
    reverse_kl_surrogate,
    strict_mode,
    token_logprobs,
    token_logprobs_from_hidden,
    trajectory_balance_loss,
    vargrad_log_z,
)

B, T = 3, 4


def good():
    return dict(
        logprobs=-torch.rand(B, T),
        ref_logprobs=-torch.rand(B, T),
        rewards=torch.randn(B),
        log_z=torch.zeros(B),
        mask=torch.ones(B, T, dtype=torch.bool),
    )


def call(**overrides):
    args = good()
    options = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return trajectory_balance_loss(
        args["logprobs"], args["ref_logprobs"], args["rewards"], args["log_z"], args["mask"], **options
    )


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        # shapes
        (dict(logprobs=-torch.rand(B)), ValueError, r"`logprobs` must be a \[B, T\].*shape=\(3,\)"),
        (dict(ref_logprobs=-torch.rand(B, T + 1)), ValueError, r"`ref_logprobs`.*\(3, 4\).*\(3, 5\)"),
        (dict(rewards=torch.randn(B + 1)), ValueError, r"`rewards` must have shape \(3,\).*shape=\(4,\)"),
        (dict(rewards=torch.randn(B, 1)), ValueError, r"`rewards`"),
        (dict(log_z=torch.zeros(B, 2)), ValueError, r"`log_z` must have shape \(3,\) or \(3, 1\)"),
        (dict(mask=torch.ones(B, T - 1)), ValueError, r"`mask` must have the same shape"),
        (dict(old_logprobs=torch.zeros(B, 1)), ValueError, r"`old_logprobs` must have the same shape"),
        # dtypes and types
        (
            dict(logprobs=torch.zeros(B, T, dtype=torch.int64)),
            TypeError,
            r"`logprobs`.*floating-point.*int64",
        ),
        (dict(rewards=torch.ones(B, dtype=torch.int32)), TypeError, r"`rewards`.*floating-point"),
        (dict(log_z=[0.0, 0.0, 0.0]), TypeError, r"`log_z` must be a torch.Tensor, got list"),
        # invalid options (checked even when unused, e.g. on-policy)
        (dict(eps_low=1.5), ValueError, r"`eps_low` must be a number in"),
        (dict(max_weight=-1.0), ValueError, r"`max_weight`"),
        (dict(beta=float("nan")), ValueError, r"`beta` must be a finite number"),
        (dict(penalty="cubic"), ValueError, r"`penalty` must be one of"),
        (dict(reduction="max"), ValueError, r"`reduction` must be one of"),
        (dict(importance_weights="ppo"), ValueError, r"`importance_weights` must be one of"),
        (dict(importance_weights="sequence_clipped"), ValueError, r"needs `old_logprobs`"),
        (
            dict(old_logprobs=torch.zeros(B, T), eps_low=1.5),
            ValueError,
            r"`eps_low` must be a number in \[0.0, 1.0\)",
        ),
        (dict(old_logprobs=torch.zeros(B, T), eps_high=-0.1), ValueError, r"`eps_high`"),
        (dict(old_logprobs=torch.zeros(B, T), max_weight=0.0), ValueError, r"`max_weight`"),
        (dict(token_clip_mask=True), ValueError, r"`token_clip_mask=True` needs `old_logprobs`"),
        (dict(rollout_logprobs=torch.zeros(B, T)), ValueError, r"`rollout_logprobs`.*needs `old_logprobs`"),
        (dict(normalizer=0), ValueError, r"`normalizer` must be a finite positive number"),
        (dict(normalizer=torch.zeros(2)), ValueError, r"`normalizer` must be a scalar"),
        (dict(penalty="linex", linex_alpha=0.0), ValueError, r"`linex_alpha` must be non-zero"),
    ],
)
def test_trajectory_balance_loss_rejects_bad_input(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**overrides)


# Value checks: they read device memory, so they run in strict mode only. Outside it the bad value is never
# hidden: the loss is non-finite ("nonfinite"), or a documented reading applies ("finite": a mask of 2 is True).
VALUE_CASES = [
    (dict(mask=torch.full((B, T), 2)), r"`mask` must hold only 0/1", "finite"),
    (dict(rewards=torch.tensor([0.0, float("nan"), 1.0])), r"`rewards` must be finite.*1 non-finite", "nonfinite"),
    (dict(log_z=torch.tensor([0.0, float("inf"), 1.0])), r"`log_z` must be finite", "nonfinite"),
    (dict(logprobs=torch.tensor([[float("-inf")] * T] * B)), r"`logprobs \(at unmasked positions\)`", "nonfinite"),
    (
        dict(old_logprobs=torch.tensor([[float("nan")] + [0.0] * (T - 1)] * B)),
        r"`old_logprobs \(at unmasked positions\)` must be finite",
        "nonfinite",
    ),
    (
        dict(old_logprobs=torch.zeros(B, T), rollout_logprobs=torch.full((B, T), float("nan"))),
        r"`rollout_logprobs \(at unmasked positions\)` must be finite",
        "nonfinite",
    ),
    # pi_rollout = 0: the truncated IS factor min(pi_old / pi_rollout, C) is exactly C, a finite loss
    (
        dict(old_logprobs=torch.zeros(B, T), rollout_logprobs=torch.full((B, T), float("-inf"))),
        r"`rollout_logprobs \(at unmasked positions\)` must be finite",
        "finite",
    ),
    (dict(normalizer=torch.tensor(0.0)), r"`normalizer` must be finite and > 0", "nonfinite"),
    # a negative count flipped the gradient (loss -91 for -4) and +inf zeroed it: both NaN now
    (dict(normalizer=torch.tensor(-4.0)), r"`normalizer` must be finite and > 0", "nonfinite"),
    (dict(normalizer=torch.tensor(float("inf"))), r"`normalizer` must be finite and > 0", "nonfinite"),
    (dict(normalizer=torch.tensor(float("nan"))), r"`normalizer` must be finite and > 0", "nonfinite"),
    (dict(normalizer=torch.tensor(-4.0), reduction="sum"), r"`normalizer` must be finite and > 0", "nonfinite"),
    (dict(normalizer=torch.tensor(-4.0), reduction="none"), r"`normalizer` must be finite and > 0", "nonfinite"),
    # pi_old = 0 or e^inf at a kept token: a clip or cap used to turn the infinite ratio into a finite weight
    *[
        (
            dict(old_logprobs=torch.tensor([[0.0, value, 0.0, 0.0]] * B), importance_weights=mode),
            r"`old_logprobs \(at unmasked positions\)` must be finite",
            "nonfinite",
        )
        for value in (float("-inf"), float("inf"))
        for mode in ("sequence_clipped", "sequence_capped", "sequence", "geometric_clipped")
    ],
    # pi_rollout = e^inf at a kept token used to give the row the weight 0 (exp(-inf)): NaN now
    (
        dict(old_logprobs=torch.zeros(B, T), rollout_logprobs=torch.tensor([[0.0, float("inf"), 0.0, 0.0]] * B)),
        r"`rollout_logprobs \(at unmasked positions\)` must be finite",
        "nonfinite",
    ),
]


@pytest.mark.parametrize(("overrides", "pattern", "default"), VALUE_CASES)
def test_value_checks_raise_in_strict_mode_and_show_as_nan_otherwise(overrides, pattern, default):
    with strict_mode(), pytest.raises(ValueError, match=pattern):
        call(**overrides)
    with pytest.raises(ValueError, match=pattern):
        call(strict=True, **overrides)
    loss = call(**overrides)  # default: no host synchronisation, no error
    assert bool(torch.isfinite(loss).all()) == (default == "finite"), loss
    with strict_mode():  # the per-call switch wins over the global one
        assert bool(torch.isfinite(call(strict=False, **overrides)).all()) == (default == "finite")


@pytest.mark.skipif(
    not torch.backends.mps.is_available() and not torch.cuda.is_available(), reason="needs a 2nd device"
)
def test_device_mismatch_is_refused():
    other = "cuda" if torch.cuda.is_available() else "mps"
    with pytest.raises(ValueError, match="is on"):
        call(rewards=torch.randn(B, device=other))


def test_device_mismatch_is_refused_on_meta_device():
    """A CPU-only stand-in for a device mismatch: the meta device."""
    with pytest.raises(ValueError, match=r"`ref_logprobs` is on meta but `logprobs` is on cpu"):
        call(ref_logprobs=torch.empty(B, T, device="meta"))


def test_group_normalize_rewards_rejects_bad_groups():
    with pytest.raises(ValueError, match=r"group size\) 4 does not divide the batch size 6"):
        group_normalize_rewards(torch.randn(6), 4)
    with pytest.raises(ValueError, match=r"`groups` \(group size\) must be >= 1"):
        group_normalize_rewards(torch.randn(6), 0)
    with pytest.raises(ValueError, match=r"`groups` \(group ids\) must have shape \(6,\)"):
        group_normalize_rewards(torch.randn(6), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"`groups` \(group ids\) must be an integer tensor"):
        group_normalize_rewards(torch.randn(6), torch.zeros(6))
    with pytest.raises(ValueError, match=r"`rewards` must be finite"):
        group_normalize_rewards(torch.tensor([1.0, float("inf")]), 2, strict=True)
    assert group_normalize_rewards(torch.tensor([1.0, float("inf"), 0.0, 1.0]), 2)[:2].isnan().all()
    with pytest.raises(ValueError, match=r"`eps` must be a number >= 0"):
        group_normalize_rewards(torch.randn(2), 2, eps=-1.0)


def test_other_functions_reject_bad_input():
    with pytest.raises(ValueError, match="`importance_weights` must be one of"):
        clipped_importance_weights(torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T), importance_weights="token")
    with pytest.raises(ValueError, match="`old_logprobs` must have the same shape"):
        clipped_importance_weights(torch.zeros(B, T), torch.zeros(B, T + 1), torch.ones(B, T))
    with pytest.raises(ValueError, match=r"`prompt_mask` must have shape \(3, 4\)"):
        pool_prompt_hidden_states(torch.zeros(B, T, 8), torch.ones(B, T + 1))
    with pytest.raises(ValueError, match=r"`hidden_states` must be a \[B, T, H\]"):
        pool_prompt_hidden_states(torch.zeros(B, 8), torch.ones(B, T))
    with pytest.raises(ValueError, match="`hidden_size` must be an int >= 1"):
        LogZHead(0)
    with pytest.raises(ValueError, match="`dropout` must be in"):
        LogZHead(4, dropout=1.0)
    with pytest.raises(ValueError, match="does not divide"):
        vargrad_log_z(torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B), torch.ones(B, T), 2)
    with pytest.raises(ValueError, match="`baseline` must have shape"):
        reverse_kl_surrogate(
            torch.zeros(B, T),
            torch.zeros(B, T),
            torch.zeros(B),
            torch.ones(B, T),
            baseline=torch.zeros(B + 1),
        )
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        reduce_sequences(torch.zeros(B), torch.ones(B, dtype=torch.bool), reduction="avg")
    with pytest.raises(ValueError, match=r"`valid` must have the same shape as `per_sequence` \(3,\)"):
        reduce_sequences(torch.zeros(B), torch.ones(B - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="`normalizer` must be a finite positive number"):
        reduce_sequences(torch.zeros(B), torch.ones(B, dtype=torch.bool), normalizer=float("inf"))
    with pytest.raises(TypeError, match=r"`per_sequence` must be a torch\.Tensor"):
        reduce_sequences([0.0, 1.0], torch.ones(2, dtype=torch.bool))
    assert reduce_sequences(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([1, 0, 1])).item() == 2.0  # 0/1 mask
    with pytest.raises(TypeError, match=r"`prompt_ids` must be a \[B\] int32/int64"):
        LogZTable(3)(torch.tensor([0, 1], dtype=torch.uint8))  # would index as a boolean mask
    with pytest.raises(ValueError, match=r"`ref_logprobs` must have the same shape as `logprobs`"):
        vargrad_log_z(torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(4), torch.ones(4, 2), 2)
    with strict_mode(), pytest.raises(ValueError, match=r"`rewards` must be finite"):
        vargrad_log_z(torch.zeros(4, 2), torch.zeros(4, 2), torch.tensor([0, float("nan"), 0, 0]), torch.ones(4, 2), 2)
    with strict_mode(), pytest.raises(ValueError, match=r"`ref_logprobs \(at unmasked positions\)` must be finite"):
        vargrad_log_z(torch.zeros(4, 2), torch.full((4, 2), float("nan")), torch.zeros(4), torch.ones(4, 2), 2)
    nan_ref = vargrad_log_z(torch.zeros(4, 2), torch.full((4, 2), float("nan")), torch.zeros(4), torch.ones(4, 2), 2)
    assert nan_ref.isnan().all()  # default: shows as NaN, no host synchronisation
    with pytest.raises(TypeError, match=r"`mask` must be a torch\.Tensor, got list"):
        token_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), mask=[1, 1, 1])


def test_masked_padding_may_hold_anything():
    """-inf/NaN padding outside the mask is legal: selected away, not multiplied by zero."""
    args = good()
    args["logprobs"][:, -1] = float("nan")
    args["ref_logprobs"][:, -1] = float("-inf")
    args["mask"][:, -1] = False
    lp = args["logprobs"].requires_grad_()
    loss = trajectory_balance_loss(lp, args["ref_logprobs"], args["rewards"], args["log_z"], args["mask"])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


# ------------------------------------------------------------------------------------------------------
# Options are read exactly: a flag must be a bool, a number a real number (numpy scalars welcome)


@pytest.mark.parametrize("name", ["length_normalization", "token_clip_mask"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_flags_are_bools_not_truthy(name, value):
    """`length_normalization="false"` used to mean True; now it is refused everywhere the option is taken."""
    with pytest.raises(TypeError, match=f"`{name}` must be a bool"):
        call(**{name: value})
    with pytest.raises(TypeError, match=f"`{name}` must be a bool"):
        TrajectoryBalanceLoss(**{name: value})
    with pytest.raises(TypeError, match=f"`{name}` must be a bool"):
        FlowRLOptions.from_any({name: value})


def test_other_flags_are_bools_too():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    for kwargs in (dict(return_entropy="yes"), dict(inplace_backward=1)):
        with pytest.raises(TypeError, match="must be a bool"):
            token_logprobs(x, y, **kwargs)
    with pytest.raises(TypeError, match="`return_stats` must be a bool"):
        call(return_stats="no")
    with pytest.raises(TypeError, match="`length_normalization` must be a bool"):
        ReverseKLSurrogate(length_normalization="false")
    with pytest.raises(TypeError, match="`strict` must be None or a bool"):
        call(strict="yes")


def test_numpy_scalars_are_numbers():
    """`temperature=np.float32(0.7)` was refused; numpy scalars now mean what their value says."""
    np = pytest.importorskip("numpy")
    x, y = torch.randn(3, 5), torch.randint(0, 5, (3,))
    torch.testing.assert_close(token_logprobs(x, y, temperature=np.float32(0.7)), token_logprobs(x, y, temperature=0.7))
    def seeded(**options):
        torch.manual_seed(0)
        return call(**options)

    torch.testing.assert_close(seeded(beta=np.float64(2.0), eps_low=np.float32(0.25)), seeded(beta=2.0, eps_low=0.25))
    assert FlowRLOptions(beta=np.int64(3)).beta == 3.0 and type(FlowRLOptions(beta=np.int64(3)).beta) is float
    assert call(token_clip_mask=np.bool_(False)).isfinite()


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        # 1e-45 rounds to 0 in float32: it used to give NaN
        (lambda: token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=1e-45),
         ValueError, "`temperature` must be a finite number > 0"),
        (lambda: token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long),
                                            temperature=1e-45), ValueError, "`temperature`"),
        # beta beyond float32: NaN before
        (lambda: reverse_kl_surrogate(torch.zeros(B, T), torch.zeros(B, T), torch.ones(B), torch.ones(B, T),
                                      beta=1e300), ValueError, "`beta` must be a finite number representable"),
        (lambda: call(beta=1e300), ValueError, "`beta`"),
        # a bad normalizer is refused whatever the reduction
        (lambda: call(reduction="none", normalizer=0), ValueError, "`normalizer` must be a finite positive"),
        (lambda: call(reduction="sum", normalizer=-1.0), ValueError, "`normalizer`"),
        # an int64-overflowing ignore_index: a clear error, not a raw OverflowError
        (lambda: token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ignore_index=2**70),
         ValueError, "`ignore_index` must fit in int64"),
        # ratio_clip_token_mask checks its types
        (lambda: ratio_clip_token_mask([[0.0]], torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1)),
         TypeError, "`logprobs` must be a torch.Tensor"),
        (lambda: ratio_clip_token_mask(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1),
                                       torch.ones(1, 1)), TypeError, "`old_logprobs` must be a floating-point"),
        (lambda: ratio_clip_token_mask(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long),
                                       torch.ones(1, 1)), TypeError, "`advantages` must be a floating-point"),
        (lambda: ratio_clip_token_mask(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1),
                                       eps_high=-1.0), ValueError, "`eps_high`"),
        (lambda: FlowRLOptions(beta=torch.tensor(1.0)), TypeError, "`beta` must be a Python number"),
    ],
)
def test_extreme_or_ill_typed_values_are_refused_clearly(fn, error, match):
    with pytest.raises(error, match=match):
        fn()

"""trajectory_balance_loss and reverse_kl_surrogate against the float64 reference (values and gradients)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flowloss import (
    TrajectoryBalanceLoss,
    count_valid_sequences,
    ratio_clip_token_mask,
    reverse_kl_surrogate,
    trajectory_balance_loss,
)
from flowloss import reference as ref
from tests.conftest import assert_close
from tests.strategies import batches, f64_leaf, leaf

MODES = ["none", "sequence_clipped", "sequence_capped", "sequence", "geometric_clipped"]


def _scale(batch, beta: float) -> float:
    """Magnitude of the terms that cancel inside delta (sets the absolute tolerance)."""
    terms = batch.logprobs.double().abs().sum() + batch.ref_logprobs.double().abs().sum()
    return float(1.0 + terms + beta * batch.rewards.double().abs().sum() + batch.log_z.double().abs().sum()) ** 2


@given(
    batch=batches(),
    mode=st.sampled_from(MODES),
    length_normalization=st.booleans(),
    penalty=st.sampled_from(["squared", "huber", "shifted_cosh", "linex"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    beta=st.sampled_from([15.0, 1.0, 0.0]),
    with_rollout=st.booleans(),
)
def test_trajectory_balance_matches_reference(
    batch, mode, length_normalization, penalty, reduction, beta, with_rollout
):
    """loss = (1/N) sum_i w_i g(log Z_i + l_i - beta r_i - l_ref_i); grads wrt logprobs and log Z."""
    if penalty in ("shifted_cosh", "linex"):
        beta = min(beta, 1.0)  # keep cosh/exp inside float32 range for the comparison
    old = None if mode == "none" else batch.old_logprobs
    rollout = batch.rollout_logprobs if (with_rollout and old is not None) else None
    lp, lz = leaf(batch.logprobs), leaf(batch.log_z)
    loss = trajectory_balance_loss(
        lp,
        batch.ref_logprobs,
        batch.rewards,
        lz,
        batch.mask,
        beta=beta,
        old_logprobs=old,
        rollout_logprobs=rollout,
        importance_weights=mode,
        length_normalization=length_normalization,
        penalty=penalty,
        reduction=reduction,
    )
    lp64, lz64 = f64_leaf(batch.logprobs), f64_leaf(batch.log_z)
    weights = None
    if old is not None:
        weights = ref.importance_weights(batch.logprobs, old, batch.mask, mode=mode, rollout_logprobs=rollout)
    expected = ref.trajectory_balance_loss(
        lp64,
        batch.ref_logprobs,
        batch.rewards,
        lz64,
        batch.mask,
        beta=beta,
        weights=weights,
        length_normalization=length_normalization,
        penalty_name=penalty,
        reduction=reduction,
    )
    scale = _scale(batch, beta)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if expected.requires_grad:
        (expected * upstream).sum().backward()
        # Inputs whose exact gradient does not fit the leaf's dtype (a float16 linex tail can reach 7e4 > 65504)
        # are outside what that dtype can represent: not a case to compare.
        biggest = max(lp64.grad.abs().max().item(), lz64.grad.abs().max().item())
        assume(biggest < torch.finfo(batch.dtype).max / 2)
    assert_close(loss, expected, dtype=batch.dtype, what="TB loss value", scale=scale * 1e-3)
    (loss * upstream.to(loss.dtype)).sum().backward()
    if not expected.requires_grad:  # every row empty: the loss is the constant 0
        assert not lp.grad.any() and not lz.grad.any()
        return
    assert_close(lp.grad, lp64.grad, dtype=batch.dtype, what="dloss/dlogprobs", scale=scale**0.5 * 1e-2, grad=True)
    assert_close(lz.grad, lz64.grad, dtype=batch.dtype, what="dloss/dlog_z", scale=scale**0.5 * 1e-2, grad=True)
    assert loss.dtype == (torch.float64 if batch.dtype == torch.float64 else torch.float32)


@given(batch=batches(), baseline=st.sampled_from([0.0, 1.5, -3.0]), length_normalization=st.booleans())
def test_reverse_kl_surrogate_matches_reference(batch, baseline, length_normalization):
    """grad = (1/N) sum_i (l_i - l_ref_i - beta r_i - b) grad l_i."""
    lp = leaf(batch.logprobs)
    loss = reverse_kl_surrogate(
        lp,
        batch.ref_logprobs,
        batch.rewards,
        batch.mask,
        beta=2.0,
        baseline=baseline,
        length_normalization=length_normalization,
    )
    lp64 = f64_leaf(batch.logprobs)
    expected = ref.reverse_kl_surrogate(
        lp64,
        batch.ref_logprobs,
        batch.rewards,
        batch.mask,
        beta=2.0,
        baseline=baseline,
        length_normalization=length_normalization,
    )
    scale = _scale(batch, 2.0)
    assert_close(loss, expected, dtype=batch.dtype, what="reverse-KL surrogate value", scale=scale * 1e-3)
    loss.backward()
    if not expected.requires_grad:
        assert not lp.grad.any()
        return
    expected.backward()
    assert_close(lp.grad, lp64.grad, dtype=batch.dtype, what="surrogate gradient", scale=scale**0.5 * 1e-2, grad=True)


@given(batch=batches(dtypes=(torch.float64,)))
def test_half_tb_gradient_equals_surrogate_with_log_z_baseline(batch):
    """Per sample, grad (1/2) delta^2 = (l - l_ref - beta r + log Z) grad l: the surrogate with b = -log Z."""
    lz = batch.log_z
    lp1, lp2 = leaf(batch.logprobs), leaf(batch.logprobs)
    tb = trajectory_balance_loss(
        lp1, batch.ref_logprobs, batch.rewards, lz, batch.mask, beta=3.0, length_normalization=False
    )
    (0.5 * tb).backward()
    sur = reverse_kl_surrogate(lp2, batch.ref_logprobs, batch.rewards, batch.mask, beta=3.0, baseline=-lz)
    sur.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-10, atol=1e-10)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the TB loss (every penalty) in float64, wrt logprobs and log Z."""
    g = torch.Generator().manual_seed(0)
    b, t = 4, 5
    lp = -torch.rand(b, t, dtype=torch.float64, generator=g).requires_grad_()
    lz = torch.randn(b, dtype=torch.float64, generator=g).requires_grad_()
    refl = -torch.rand(b, t, dtype=torch.float64, generator=g)
    r = torch.randn(b, dtype=torch.float64, generator=g) * 0.1
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0] = False
    # Importance weights are detached functions of `logprobs`, so finite differences would see them move:
    # gradcheck runs without them (their values are checked against the reference above).
    for penalty in ("squared", "huber", "shifted_cosh", "linex"):
        assert torch.autograd.gradcheck(
            lambda a, z, p=penalty: trajectory_balance_loss(a, refl, r, z, mask, beta=1.0, penalty=p, huber_delta=0.3),
            (lp, lz),
        )
    # The reverse-KL surrogate has a stop-gradient by design (its backward is not the derivative of its value),
    # so it is checked against its reference gradient instead.


@given(batch=batches(dtypes=(torch.float64,), max_batch=8), data=st.data())
def test_micro_batch_gradients_add_up_to_full_batch(batch, data):
    """With normalizer = global valid count, sum over a random split of micro-batch gradients == full gradient."""
    b = batch.logprobs.shape[0]
    perm = torch.tensor(data.draw(st.permutations(list(range(b)))))
    cuts = sorted(data.draw(st.lists(st.integers(1, max(b - 1, 1)), max_size=3, unique=True)))
    pieces = [p for p in torch.tensor_split(perm, [c for c in cuts if c < b]) if p.numel()]
    total = int((batch.mask.sum(-1) > 0).sum())

    def grads(index, normalizer):
        lp, lz = leaf(batch.logprobs), leaf(batch.log_z)
        loss = trajectory_balance_loss(
            lp[index],
            batch.ref_logprobs[index],
            batch.rewards[index],
            lz[index],
            batch.mask[index],
            old_logprobs=batch.old_logprobs[index],
            normalizer=normalizer,
        )
        loss.backward()
        return lp.grad, lz.grad, loss.detach()

    full_lp, full_lz, full_loss = grads(perm, None)
    parts = [grads(p, max(total, 1)) for p in pieces]
    torch.testing.assert_close(sum(p[0] for p in parts), full_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sum(p[1] for p in parts), full_lz, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sum(p[2] for p in parts), full_loss, rtol=1e-6, atol=1e-6)


def test_all_masked_rows_contribute_nothing_and_stay_finite():
    """An empty response: loss term 0, zero gradient, excluded from N; the whole-empty batch gives loss 0."""
    lp = leaf(torch.full((3, 4), float("nan")))
    lp.data[1] = -1.0
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, :2] = True
    lz = leaf(torch.zeros(3))
    loss, stats = trajectory_balance_loss(
        lp, torch.full((3, 4), -2.0), torch.zeros(3), lz, mask, beta=15.0, return_stats=True
    )
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1.0)  # delta = 0 + (-1) - 0 - (-2) = 1, N = 1
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0].abs().sum() == 0 and lp.grad[2].abs().sum() == 0
    assert stats["valid_sequences"].item() == 1
    empty = trajectory_balance_loss(lp, lp.detach(), torch.zeros(3), lz, torch.zeros(3, 4, dtype=torch.bool))
    assert empty.item() == 0.0


def test_length_one_response_and_extreme_values_are_finite():
    """|y| = 1 rows and log-ratios of +-1000 give finite loss and gradients in every weight mode."""
    lp = leaf(torch.tensor([[-0.5, 0.0], [-1e3, -2.0]]))
    mask = torch.tensor([[True, False], [True, True]])
    for mode in MODES[1:]:
        for old in (lp.detach() - 1000.0, lp.detach() + 1000.0):
            lz = leaf(torch.tensor([100.0, -100.0]))
            loss = trajectory_balance_loss(
                lp,
                torch.zeros(2, 2),
                torch.tensor([50.0, -50.0]),
                lz,
                mask,
                old_logprobs=old,
                importance_weights=mode,
            )
            loss.backward()
            assert torch.isfinite(loss), mode
            assert torch.isfinite(lp.grad).all() and torch.isfinite(lz.grad).all(), mode
            lp.grad = None


def test_stats_report_the_authors_diagnostics():
    """return_stats: means of l, l_ref, log Z, residual, weights before/after clipping, clip fractions."""
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.25]]))
    old = lp + torch.tensor([[1.0, 1.0], [-0.01, 0.0]])  # row 0: ratio e^-2 (clipped low); row 1: ~1
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = trajectory_balance_loss(
        lp, lp, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0]), mask, old_logprobs=old, return_stats=True
    )
    assert stats["logprobs_mean"].item() == pytest.approx(
        (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25))).item() / 2
    )
    assert stats["log_z_mean"].item() == pytest.approx(2.0)
    assert stats["residual_mean"].item() == pytest.approx(2.0)
    assert stats["clip_frac_low"].item() == pytest.approx(0.5)
    assert stats["clip_frac_high"].item() == 0.0
    assert stats["weight_unclipped_mean"].item() == pytest.approx(
        (torch.exp(torch.tensor(-2.0)).item() + torch.exp(torch.tensor(0.01)).item()) / 2
    )
    assert stats["weight_mean"].item() == pytest.approx((0.8 + torch.exp(torch.tensor(0.01)).item()) / 2)
    assert stats["loss"].item() == pytest.approx(loss.item())


def test_token_clip_mask_drops_tokens_from_means_and_weights():
    """verl PR #3924: with r_hat > 0, a token with ratio > 1 + eps_high leaves every mean."""
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    old = lp - torch.tensor([[0.0, 1.0, 0.0]])  # token 1 has ratio e > 1.28
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = trajectory_balance_loss(
        lp,
        torch.zeros(1, 3),
        torch.tensor([1.0]),
        torch.zeros(1),
        mask,
        beta=1.0,
        old_logprobs=old,
        token_clip_mask=True,
    )
    kept = torch.tensor([[True, False, True]])
    expected = trajectory_balance_loss(
        lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.zeros(1), kept, beta=1.0, old_logprobs=old
    )
    assert loss.item() == pytest.approx(expected.item())
    assert loss.item() == pytest.approx((-2.0 - 1.0) ** 2)  # mean(-1, -3) - beta * 1, w = 1


def test_module_twins_equal_the_functions_and_check_options_at_construction():
    """TrajectoryBalanceLoss(**options)(tensors) == trajectory_balance_loss(tensors, **options)."""
    from flowloss import ReverseKLSurrogate, TrajectoryBalanceLoss

    g = torch.Generator().manual_seed(3)
    lp, ref_lp, old = (-torch.rand(3, 4, generator=g) for _ in range(3))
    r, lz = torch.randn(3, generator=g), torch.randn(3, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    module = TrajectoryBalanceLoss(beta=2.0, importance_weights="sequence_capped", penalty="huber")
    expected = trajectory_balance_loss(
        lp, ref_lp, r, lz, mask, beta=2.0, old_logprobs=old, importance_weights="sequence_capped", penalty="huber"
    )
    assert torch.equal(module(lp, ref_lp, r, lz, mask, old_logprobs=old), expected)
    assert "sequence_capped" in repr(module)
    surrogate = ReverseKLSurrogate(beta=2.0)
    assert torch.equal(
        surrogate(lp, ref_lp, r, mask, baseline=0.5), reverse_kl_surrogate(lp, ref_lp, r, mask, beta=2.0, baseline=0.5)
    )
    with pytest.raises(ValueError, match="`importance_weights` must be one of"):
        TrajectoryBalanceLoss(importance_weights="ppo")
    with pytest.raises(ValueError, match="`eps_low`"):
        TrajectoryBalanceLoss(eps_low=2.0)
    with pytest.raises(ValueError, match="`penalty`"):
        TrajectoryBalanceLoss(penalty="cubic")
    with pytest.raises(TypeError, match="unknown option"):
        TrajectoryBalanceLoss(betta=15.0)
    with pytest.raises(TypeError, match="`old_logprobs` is a per-call"):
        TrajectoryBalanceLoss(old_logprobs=old)


@given(
    batch=batches(dtypes=(torch.float64, torch.float32)),
    mode=st.sampled_from(MODES[1:]),
    eps=st.sampled_from([(0.2, 0.28), (0.05, 0.5), (0.4, 0.1)]),
    length_normalization=st.booleans(),
)
def test_token_clip_mask_matches_reference(batch, mode, eps, length_normalization):
    """CISPO mask (verl PR #3924) against the float64 loop reference: kept tokens enter the means and the weight;
    N counts every row with a token in `mask` (a fully clipped row contributes 0 but is counted)."""
    eps_low, eps_high = eps
    lp, lz = leaf(batch.logprobs), leaf(batch.log_z)
    old = batch.old_logprobs
    loss = trajectory_balance_loss(
        lp, batch.ref_logprobs, batch.rewards, lz, batch.mask, beta=1.5, old_logprobs=old,
        importance_weights=mode, eps_low=eps_low, eps_high=eps_high, token_clip_mask=True,
        length_normalization=length_normalization,
    )
    kept = ref.ratio_clip_token_mask(batch.logprobs, old, batch.rewards, batch.mask, eps_low=eps_low, eps_high=eps_high)
    assert torch.equal(
        kept,
        ratio_clip_token_mask(batch.logprobs, old, batch.rewards, batch.mask, eps_low=eps_low, eps_high=eps_high),
    )
    weights = ref.importance_weights(batch.logprobs, old, kept, mode=mode, eps_low=eps_low, eps_high=eps_high)
    lp64, lz64 = f64_leaf(batch.logprobs), f64_leaf(batch.log_z)
    expected = ref.trajectory_balance_loss(
        lp64, batch.ref_logprobs, batch.rewards, lz64, batch.mask, beta=1.5, weights=weights,
        length_normalization=length_normalization, kept=kept,
    )
    scale = _scale(batch, 1.5)
    assert_close(loss, expected, dtype=batch.dtype, what="TB loss with the token clip mask", scale=scale * 1e-3)
    loss.backward()
    if expected.requires_grad:
        expected.backward()
        assert_close(lp.grad, lp64.grad, dtype=batch.dtype, what="d/dlogprobs (clip mask)", scale=scale**0.5 * 1e-2,
                     grad=True)
        assert_close(lz.grad, lz64.grad, dtype=batch.dtype, what="d/dlog_z (clip mask)", scale=scale**0.5 * 1e-2,
                     grad=True)


def test_token_clip_mask_keeps_micro_batches_additive():
    """Rows whose tokens are all clipped stay in N: micro-batches with normalizer=count_valid_sequences(mask) of
    the whole batch add up to the whole batch (0.1 counted them out: 288.0 vs 144.0 on this example)."""
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-1.0, -3.0], [-2.0, -1.0]], dtype=torch.float64)
    old = lp - torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # ratio e
    r = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)  # rows 0 and 2: every token clipped
    mask = torch.ones(4, 2, dtype=torch.bool)
    zeros = torch.zeros(4, 2, dtype=torch.float64)
    lz = torch.zeros(4, dtype=torch.float64, requires_grad=True)

    def loss(rows, normalizer=None):
        return trajectory_balance_loss(
            lp[rows], zeros[rows], r[rows], lz[rows], mask[rows], old_logprobs=old[rows], token_clip_mask=True,
            normalizer=normalizer,
        )

    full = loss(slice(0, 4))
    (g_full,) = torch.autograd.grad(full, lz)
    n = count_valid_sequences(mask)
    parts = loss(slice(0, 2), n) + loss(slice(2, 4), n)
    (g_parts,) = torch.autograd.grad(parts, lz)
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(g_parts, g_full)
    assert full.item() == pytest.approx((15 + 2) ** 2 / 4 + (-15 + 1.5) ** 2 / 4)  # rows 1 and 3 over N = 4


def test_ratio_clip_token_mask_at_and_between_the_thresholds():
    """eps_low != eps_high, ratios exactly on, just past and between the bounds (float64): kills the mutants
    that swap eps_low/eps_high or turn `>` into `>=`."""
    eps_low, eps_high = 0.1, 0.5
    hi, lo = math.log1p(eps_high), math.log1p(-eps_low)
    log_ratio = torch.tensor(
        [[hi, math.nextafter(hi, 1.0), 0.3, lo, math.nextafter(lo, -1.0), -0.2, 0.2]], dtype=torch.float64
    ).repeat(2, 1)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones_like(log_ratio, dtype=torch.bool)
    kept = ratio_clip_token_mask(log_ratio, torch.zeros_like(log_ratio), advantages, mask, eps_low=eps_low,
                                 eps_high=eps_high)
    # A > 0 drops only ratios above 1 + eps_high; A < 0 drops only ratios below 1 - eps_low
    assert kept[0].tolist() == [True, False, True, True, True, True, True]
    assert kept[1].tolist() == [True, True, True, True, False, False, True]
    expected = ref.ratio_clip_token_mask(log_ratio, torch.zeros_like(log_ratio), advantages, mask,
                                         eps_low=eps_low, eps_high=eps_high)
    assert torch.equal(kept, expected)
    # A = 0 keeps everything; masked tokens stay out
    none = ratio_clip_token_mask(log_ratio[:1] * 100, torch.zeros(1, 7, dtype=torch.float64),
                                 torch.zeros(1, dtype=torch.float64), mask[:1].clone().fill_(True))
    assert none.all()


@pytest.mark.triton_interpreter
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    batch=batches(dtypes=(torch.float32, torch.bfloat16)),
    mode=st.sampled_from(MODES),
    token_clip=st.booleans(),
    with_rollout=st.booleans(),
    length_normalization=st.booleans(),
    penalty=st.sampled_from(["squared", "huber", "linex"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_fused_loss_path_equals_the_pytorch_path(
    batch, mode, token_clip, with_rollout, length_normalization, penalty, reduction
):
    """`impl="triton"` (CUDA, here: CPU under Triton's interpreter) runs the fused Triton kernels: same loss,
    same stats, same gradients as `impl="pytorch"` (float32 accumulation both)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the fused loss runs on CUDA, or on CPU under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old = batch.old_logprobs.to(device) if (mode != "none" or token_clip) else None
    kwargs = dict(
        beta=2.0, old_logprobs=old, importance_weights=mode,
        rollout_logprobs=batch.rollout_logprobs.to(device) if (with_rollout and old is not None) else None,
        token_clip_mask=token_clip and old is not None, length_normalization=length_normalization,
        penalty=penalty, reduction=reduction, return_stats=True,
    )
    results = []
    for impl in ("triton", "pytorch"):
        lp, lz = leaf(batch.logprobs.to(device)), leaf(batch.log_z.to(device))
        loss, stats = trajectory_balance_loss(
            lp, batch.ref_logprobs.to(device), batch.rewards.to(device), lz, batch.mask.to(device), impl=impl,
            **kwargs,
        )
        (loss * torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape)).sum().backward()
        results.append((loss.detach(), stats, lp.grad, lz.grad))
    (f_loss, f_stats, f_lp, f_lz), (t_loss, t_stats, t_lp, t_lz) = results
    scale = _scale(batch, 2.0)
    assert_close(f_loss, t_loss, dtype=torch.float32, what="fused loss", scale=scale * 1e-3)
    assert set(f_stats) == set(t_stats)
    for key in t_stats:
        assert_close(f_stats[key].double(), t_stats[key].double(), dtype=torch.float32, what=f"stat {key}",
                     scale=scale * 1e-3)
    assert_close(f_lp, t_lp, dtype=batch.dtype, what="fused dloss/dlogprobs", scale=scale**0.5 * 1e-2, grad=True)
    assert_close(f_lz, t_lz, dtype=batch.dtype, what="fused dloss/dlog_z", scale=scale**0.5 * 1e-2, grad=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["rewards", "log_z"])
def test_a_bad_value_on_an_all_masked_row_reaches_neither_loss_nor_gradient(bad, where):
    """An all-masked row takes no part: a NaN/inf reward or log Z there leaves the loss and every gradient finite
    (the gradient used to be 0 * NaN = NaN for log Z, and one optimizer step turned the whole head NaN)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 1)
    pooled = torch.randn(3, 4)
    values = {"rewards": torch.randn(3), "log_z": None}
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    logprobs = leaf(-torch.rand(3, 3))
    if where == "rewards":
        values["rewards"][1] = bad
        log_z = head(pooled).squeeze(-1)
    else:
        log_z = torch.where(torch.arange(3) == 1, torch.tensor(bad), head(pooled).squeeze(-1))
    loss = trajectory_balance_loss(logprobs, -torch.rand(3, 3), values["rewards"], log_z, mask, impl="pytorch")
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logprobs.grad).all() and torch.isfinite(head.weight.grad).all()
    assert torch.isfinite(head.bias.grad).all()
    # the row's own contribution is exactly zero
    assert float(logprobs.grad[1].abs().sum()) == 0.0


def test_impl_selects_the_implementation_and_refuses_what_cannot_run():
    lp, ref_lp, rewards, log_z = -torch.rand(2, 3), -torch.rand(2, 3), torch.randn(2), torch.zeros(2)
    mask = torch.ones(2, 3, dtype=torch.bool)
    expected = trajectory_balance_loss(lp, ref_lp, rewards, log_z, mask)
    assert torch.equal(trajectory_balance_loss(lp, ref_lp, rewards, log_z, mask, impl="pytorch"), expected)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match=r"impl='triton'.*not a CUDA tensor.*impl='pytorch'"):
            trajectory_balance_loss(lp, ref_lp, rewards, log_z, mask, impl="triton")
    with pytest.raises(TypeError, match=r"impl='triton'.*float64"):
        trajectory_balance_loss(lp.double(), ref_lp, rewards, log_z, mask, impl="triton")
    with pytest.raises(ValueError, match=r"`impl` must be one of \('auto', 'triton', 'pytorch'\)"):
        trajectory_balance_loss(lp, ref_lp, rewards, log_z, mask, impl="fused")
    with pytest.raises(ValueError, match="reverse_kl_surrogate has no Triton kernel"):
        reverse_kl_surrogate(lp, ref_lp, rewards, mask, impl="triton")
    with pytest.raises(ValueError, match="`impl` must be one of"):
        TrajectoryBalanceLoss(impl="chunked")
    module = TrajectoryBalanceLoss(impl="pytorch")
    assert module.impl == "pytorch" and "impl='pytorch'" in repr(module)
    assert torch.equal(module(lp, ref_lp, rewards, log_z, mask), expected)


def test_auto_sends_the_loss_to_its_fused_kernel_only_once_that_kernel_has_run_on_a_gpu(monkeypatch):
    """`impl="auto"` on tensors the kernels take: the PyTorch path while `GPU_VERIFIED["tb_loss"]` is None."""
    from flowloss.ops import dispatch

    monkeypatch.setattr(dispatch, "unsupported_reason", lambda tensors, cpu_ok: None)  # as for CUDA fp32
    monkeypatch.setattr(dispatch, "triton_available", lambda kind="logits": True)
    x = [("logprobs", torch.zeros(2, 3))]
    assert dispatch.GPU_VERIFIED["tb_loss"] is None
    assert dispatch.choose("tb_loss", "auto", x) == "pytorch"
    assert dispatch.choose("logits", "auto", x) == "triton"  # ran on an H200
    monkeypatch.setitem(dispatch.GPU_VERIFIED, "tb_loss", "a device run")
    assert dispatch.choose("tb_loss", "auto", x) == "triton"

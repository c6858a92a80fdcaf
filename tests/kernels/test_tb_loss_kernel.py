"""The fused trajectory-balance op (``flowloss::tb_sequence_terms``) vs the float64 reference and the PyTorch path.

Runs under Triton's interpreter on CPU (``TRITON_INTERPRET=1`` set before triton is imported: ``make
test-kernels``) or on a CUDA device; every tensor the op sees is on the device under test (the ``device``
fixture). The PyTorch path of ``trajectory_balance_loss`` is run on CPU copies, so it stays the PyTorch path
once CUDA inputs are routed to the fused op.

Tolerances. The reference receives the inputs already rounded to their dtype, and the kernels accumulate in fp32
whatever the input dtype, so value tolerances follow fp32 rounding (``u = 2^-24``) with the magnitudes involved:
a sum of ``n`` terms errs by at most about ``n u sum|x|`` (``delta``, the log-weight), the weight by that plus
Triton's ``exp`` (``ex2.approx`` on NVIDIA: ``~(4 + |x|) u`` relative), ``per_seq`` by ``|w g'(delta)|`` times
the error of ``delta`` plus its own relative rounding. Gradients add the rounding to their storage dtype
(relative ``2^-24`` fp32, ``2^-11`` fp16, ``2^-7`` bf16: the interpreter truncates to bf16). Against the
PyTorch path both errors add, plus the cancellation of its ``cosh(d) - 1`` / ``expm1(x) - x`` formulas
(absolute ``~u`` times their terms).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need TRITON_INTERPRET=1 (set before triton is imported; `make test-kernels`) or CUDA",
        allow_module_level=True,
    )
pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flowloss import FlowRLOptions, ratio_clip_token_mask, reference, trajectory_balance_loss  # noqa: E402
from flowloss.importance import importance_weights_with_stats  # noqa: E402
from flowloss.ops import fused_tb  # noqa: E402
from flowloss.ops.fused_tb import fused_tb_sequence_terms, fused_tb_supported, reduce_per_sequence  # noqa: E402
from flowloss.reductions import apply_reduction  # noqa: E402
from tests.strategies import masks  # noqa: E402

# The kernels keep even discarded tl.where branches free of inf - inf, 0 * inf and 0 / 0: numpy (the
# interpreter) would warn about them, so any RuntimeWarning here is an error.
pytestmark = [pytest.mark.triton_interpreter, pytest.mark.filterwarnings("error::RuntimeWarning")]

F64 = torch.float64
U = 2.0**-24  # fp32 unit roundoff
# Storing a gradient in its dtype: relative rounding, and half the smallest subnormal (values that underflow).
# bf16: one full ulp, 2^-7, because Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest).
STORE_ROUNDING = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}
STORE_UNDERFLOW = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["none", "sequence_clipped", "sequence_capped", "sequence", "geometric_clipped"]
PENALTIES = ["squared", "shifted_cosh", "linex", "huber"]
OPTION_DEFAULTS = dict(
    eps_low=0.2, eps_high=0.28, max_weight=10.0, tis_cap=2.0, linex_alpha=1.0, huber_delta=1.0, beta=1.0
)


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cpu" if INTERPRET else "cuda")


# ------------------------------------------------------------------------------------------------------
# Cases and the three implementations (fused, float64 reference, PyTorch path)


@dataclass
class Case:
    """One batch, on CPU in its dtype (masked positions may hold -inf/NaN), and the loss options."""

    lp: torch.Tensor
    ref: torch.Tensor
    old: torch.Tensor | None
    ro: torch.Tensor | None
    rewards: torch.Tensor
    log_z: torch.Tensor
    mask: torch.Tensor
    mode: str = "none"
    token_clip_mask: bool = False
    length_normalization: bool = True
    penalty: str = "squared"
    eps_low: float = 0.2
    eps_high: float = 0.28
    max_weight: float = 10.0
    tis_cap: float = 2.0
    linex_alpha: float = 1.0
    huber_delta: float = 1.0
    beta: float = 1.0
    block_t: int = 0

    def options(self) -> dict:
        names = ("mode", "token_clip_mask", "length_normalization", "penalty", *OPTION_DEFAULTS)
        return {n: getattr(self, n) for n in names}

    def fused_kwargs(self) -> dict:
        """The fused op's keywords: the options object and the weight mode."""
        fields = {k: v for k, v in self.options().items() if k != "mode"}
        return {"options": FlowRLOptions(**fields), "mode": self.mode}


def make_case(b, t, dtype, *, seed=0, mask=None, poison=float("nan"), scale=3.0, old_noise=0.3, **options):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=scale):
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    lp = -rand(b, t).abs()
    ref = -rand(b, t).abs()
    old = lp + rand(b, t, s=old_noise)
    ro = old + rand(b, t, s=old_noise)
    if mask is None:
        mask = torch.rand(b, t, generator=gen) > 0.3
    mask = mask.bool()
    rows = [x.to(dtype).masked_fill(~mask, poison) for x in (lp, ref, old, ro)]
    return Case(*rows, rand(b, s=1.0).to(dtype), rand(b, s=1.0).to(dtype), mask, **options)


def uses_old(case: Case) -> bool:
    return case.old is not None


def run_fused(case: Case, device, upstream: torch.Tensor):
    """Fused forward + backward on ``device``; returns the terms, d logprobs and d log_z on CPU."""
    lp = case.lp.to(device, copy=True).requires_grad_(True)
    lz = case.log_z.to(device, copy=True).requires_grad_(True)
    terms = fused_tb_sequence_terms(
        lp,
        case.ref.to(device),
        case.rewards.to(device),
        lz,
        case.mask.to(device),
        None if case.old is None else case.old.to(device),
        None if case.ro is None else case.ro.to(device),
        block_t=case.block_t,
        **case.fused_kwargs(),
    )
    dlp, dlz = torch.autograd.grad(terms.per_sequence, [lp, lz], upstream.to(device))
    assert terms.per_sequence.dtype == torch.float32 and terms.per_sequence.device == lp.device
    assert dlp.dtype == case.lp.dtype and dlz.dtype == case.log_z.dtype
    return fused_tb.TBSequenceTerms(*(x.detach().cpu() for x in terms)), dlp.cpu(), dlz.cpu()


def kept_mask(case: Case) -> torch.Tensor:
    """The tokens that enter the means: the public CISPO mask (decided in fp32, as the loss decides)."""
    if not case.token_clip_mask:
        return case.mask
    return ratio_clip_token_mask(
        case.lp, case.old, case.rewards, case.mask, eps_low=case.eps_low, eps_high=case.eps_high
    )


@dataclass
class Expected:
    per_sequence: torch.Tensor
    delta: torch.Tensor
    weights: torch.Tensor
    log_w: torch.Tensor
    seq_lp: torch.Tensor
    seq_ref: torch.Tensor
    dlp: torch.Tensor
    dlz: torch.Tensor
    kept: torch.Tensor


def run_reference(case: Case, upstream: torch.Tensor) -> Expected:
    """float64: `reference.trajectory_balance_loss` (reduction "none") and `reference.importance_weights`."""
    kept = kept_mask(case)
    n = kept.sum(-1).to(F64)
    weights = None
    log_w = torch.zeros(len(n), dtype=F64)
    if uses_old(case):
        weights = reference.importance_weights(
            case.lp, case.old, kept, mode=case.mode, eps_low=case.eps_low, eps_high=case.eps_high,
            max_weight=case.max_weight, rollout_logprobs=case.ro, tis_cap=case.tis_cap,
        )
        if case.mode != "none":
            rho = torch.where(kept, case.lp.to(F64) - case.old.to(F64), 0.0).sum(-1)
            log_w = rho / n.clamp_min(1) if case.mode == "geometric_clipped" else rho
    lp64 = case.lp.to(F64).requires_grad_(True)
    lz64 = case.log_z.to(F64).requires_grad_(True)
    w = torch.ones(len(n), dtype=F64) if weights is None else weights
    if (case.linex_alpha, case.huber_delta) == (1.0, 1.0):
        per_seq = reference.trajectory_balance_loss(
            lp64, case.ref, case.rewards, lz64, kept, beta=case.beta, weights=weights,
            length_normalization=case.length_normalization, penalty_name=case.penalty, reduction="none",
        )
    else:  # the reference loss knows only a = k = 1: the same sum from its parts, with reference.penalty(a, k)
        norm = case.length_normalization
        residual = (lz64 + reference.sequence_logprob(lp64, kept, normalize=norm) - case.beta * case.rewards.to(F64)
                    - reference.sequence_logprob(case.ref, kept, normalize=norm))
        per_seq = torch.stack([
            w[i] * reference.penalty(residual[i], case.penalty, linex_alpha=case.linex_alpha,
                                     huber_delta=case.huber_delta) if n[i] > 0 else torch.zeros((), dtype=F64)
            for i in range(len(n))
        ])
    if per_seq.requires_grad:
        dlp, dlz = torch.autograd.grad(per_seq, [lp64, lz64], upstream.to(F64), allow_unused=True)
        dlp = torch.zeros_like(lp64) if dlp is None else dlp
        dlz = torch.zeros_like(lz64) if dlz is None else dlz
    else:  # no row has a kept token: the loss is the constant 0
        dlp, dlz = torch.zeros_like(lp64), torch.zeros_like(lz64)
    seq_lp = reference.sequence_logprob(case.lp, kept, normalize=case.length_normalization)
    seq_ref = reference.sequence_logprob(case.ref, kept, normalize=case.length_normalization)
    delta = case.log_z.to(F64) + seq_lp - case.beta * case.rewards.to(F64) - seq_ref
    return Expected(per_seq.detach(), delta, w, log_w, seq_lp, seq_ref, dlp, dlz, kept)


def run_pytorch_path(case: Case, upstream: torch.Tensor):
    """``trajectory_balance_loss(reduction="none")`` on CPU copies: values and both gradients, plus the weights."""
    lp = case.lp.clone().requires_grad_(True)
    lz = case.log_z.clone().requires_grad_(True)
    per_seq = trajectory_balance_loss(
        lp, case.ref, case.rewards, lz, case.mask, old_logprobs=case.old, rollout_logprobs=case.ro,
        importance_weights=case.mode, token_clip_mask=case.token_clip_mask, reduction="none", strict=False,
        impl="pytorch",
        **{k: getattr(case, k) for k in ("length_normalization", "penalty", *OPTION_DEFAULTS)},
    )
    dlp, dlz = torch.autograd.grad(per_seq, [lp, lz], upstream.to(per_seq.dtype), allow_unused=True)
    weights = None
    if uses_old(case):
        weights = importance_weights_with_stats(
            case.lp, case.old, kept_mask(case), importance_weights=case.mode, eps_low=case.eps_low,
            eps_high=case.eps_high, max_weight=case.max_weight, rollout_logprobs=case.ro, tis_cap=case.tis_cap,
            strict=False,
        )
    zeros = torch.zeros_like
    return per_seq.detach(), zeros(lp) if dlp is None else dlp, zeros(lz) if dlz is None else dlz, weights


# ------------------------------------------------------------------------------------------------------
# Error bounds (see the module docstring)


def penalty_derivatives(d: torch.Tensor, case: Case):
    """float64 ``(g'(d), |g''(d)|, abs. rounding of the PyTorch formula for g / u, same for g' / u)``."""
    a, k = case.linex_alpha, case.huber_delta
    if case.penalty == "squared":
        return 2 * d, torch.full_like(d, 2.0), d * d, 2 * d.abs()
    if case.penalty == "shifted_cosh":
        return 2 * torch.sinh(d), 2 * torch.cosh(d), 4 * torch.cosh(d) + 4, 2 * torch.cosh(d)
    if case.penalty == "linex":
        e = torch.expm1(a * d)
        return 2 * e / a, 2 * (e + 1).abs(), 4 * (e.abs() + (a * d).abs()) / a**2, 4 * (e.abs() + 1) / abs(a)
    inside = d.abs() <= k
    gp = torch.where(inside, 2 * d, 2 * k * d.sign())
    return gp, torch.full_like(d, 2.0), 2 * d * d + 2 * k * k, 2 * gp.abs()


def bounds(case: Case, exp: Expected, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    kept = exp.kept
    n = kept.sum(-1).to(F64)
    den = n.clamp_min(1) if case.length_normalization else torch.ones_like(n)

    def kept_abs_sum(x):
        return torch.where(kept, x.to(F64).abs(), 0.0).sum(-1)

    terms = (case.log_z.to(F64).abs() + abs(case.beta) * case.rewards.to(F64).abs()
             + (kept_abs_sum(case.lp) + kept_abs_sum(case.ref)) / den)
    sum_err = 4 * (n + 4) * U  # relative to the sum of |terms|
    err_delta = sum_err * terms
    err_log_w = torch.zeros_like(n)
    rel_w = torch.zeros_like(n)
    if uses_old(case):
        ratios = torch.where(kept, case.lp.to(F64) - case.old.to(F64), 0.0).abs().sum(-1)
        if case.ro is not None:
            ratios = ratios + torch.where(kept, case.old.to(F64) - case.ro.to(F64), 0.0).abs().sum(-1)
        if case.mode == "geometric_clipped":
            ratios = ratios / n.clamp_min(1)
        err_log_w = sum_err * ratios
        log_w = torch.where(exp.weights > 0, exp.weights.log(), 0.0)  # w = 0: exp underflowed, exactly 0
        rel_w = err_log_w + 8 * U * (1 + log_w.abs())
    gp, gpp, torch_g, torch_gp = penalty_derivatives(exp.delta, case)
    exp_arg = exp.delta.abs() * (abs(case.linex_alpha) if case.penalty == "linex" else 1.0)
    rel_g = 16 * U * (1 + exp_arg) if case.penalty in ("shifted_cosh", "linex") else 4 * U * torch.ones_like(n)
    w, up = exp.weights, upstream.to(F64).abs()
    live = n > 0
    zero = torch.zeros_like(n)
    per_seq = torch.where(live, w * gp.abs() * err_delta + exp.per_sequence.abs() * (rel_w + rel_g), zero)
    dz_core = torch.where(live, up * w * (gpp * err_delta + gp.abs() * (rel_w + rel_g)), zero)
    dz = dz_core + exp.dlz.abs() * STORE_ROUNDING[case.log_z.dtype] + STORE_UNDERFLOW[case.log_z.dtype]
    dlp = (dz_core / den)[:, None] + exp.dlp.abs() * STORE_ROUNDING[case.lp.dtype] + STORE_UNDERFLOW[case.lp.dtype]
    tiny = 1e-30
    return {
        "delta": err_delta + tiny,
        "weights": w * rel_w + tiny,
        "log_w": err_log_w + tiny,
        "seq_lp": sum_err * kept_abs_sum(case.lp) / den + tiny,
        "seq_ref": sum_err * kept_abs_sum(case.ref) / den + tiny,
        "per_sequence": per_seq + tiny,
        "dlz": dz + tiny,
        "dlp": torch.where(kept, dlp, 0.0) + tiny,
        # the PyTorch path rounds too, and its cosh(d) - 1 / expm1(x) - x formulas cancel
        "per_sequence_torch": 2 * per_seq + torch.where(live, 4 * U * w * torch_g, zero) + tiny,
        "dlz_torch": 2 * dz + torch.where(live, 4 * U * up * w * torch_gp, zero) + tiny,
        "dlp_torch": 2 * dlp + torch.where(kept, (4 * U * up * w * torch_gp / den)[:, None], 0.0) + tiny,
    }


def within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """``|actual - expected| <= bound`` elementwise (float64); NaN must meet NaN, inf the same inf."""
    a, e = actual.detach().to(F64).cpu(), expected.detach().to(F64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    special = ~e.isfinite()
    same = (a == e) | (a.isnan() & e.isnan())
    if not bool((same | ~special).all() and (a.isfinite() | special).all()):
        raise AssertionError(f"{what}: non-finite values differ\n got {a}\n expected {e}")
    err = torch.where(special, 0.0, (a - e).abs())
    bound = torch.broadcast_to(bound.to(F64), err.shape)
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err / bound))
        raise AssertionError(
            f"{what}: error {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} at flat index {worst} "
            f"(got {a.flatten()[worst]:.10g}, expected {e.flatten()[worst]:.10g})"
        )


def check_case(case: Case, device, *, seed: int = 0) -> None:
    """Fused values, diagnostics and gradients vs the float64 reference and vs the PyTorch path."""
    upstream = torch.randn(case.lp.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    terms, dlp, dlz = run_fused(case, device, upstream.float())
    exp = run_reference(case, upstream.float().to(F64))
    tol = bounds(case, exp, upstream.float().to(F64))
    n = exp.kept.sum(-1)
    assert torch.equal(terms.lengths, n.float()), "lengths = kept tokens per row"
    assert torch.equal(terms.mask_lengths, case.mask.sum(-1).float()), "mask_lengths = sum_t mask"
    assert torch.equal(terms.counted, case.mask.any(-1).float()), "counted = row has a token in the mask"
    assert bool((terms.per_sequence[n == 0] == 0).all()), "a row without a kept token contributes exactly 0"
    assert bool((dlp[~exp.kept] == 0).all()), "d logprobs is exactly 0 off the kept tokens"
    within(terms.delta, exp.delta, tol["delta"], "delta = log Z + l - beta r - l_ref")
    within(terms.seq_logprobs, exp.seq_lp, tol["seq_lp"], "l = token mean (or sum) of logprobs")
    within(terms.seq_ref_logprobs, exp.seq_ref, tol["seq_ref"], "l_ref")
    within(terms.weights, exp.weights, tol["weights"], f"w ({case.mode}, TIS={case.ro is not None})")
    within(terms.log_weights_unclipped, exp.log_w, tol["log_w"], "unclipped log-weight")
    within(terms.per_sequence, exp.per_sequence, tol["per_sequence"], f"w g(delta), g = {case.penalty}")
    within(dlz, exp.dlz, tol["dlz"], "d log_z = u w g'(delta)")
    within(dlp, exp.dlp, tol["dlp"], "d logprobs = u w g'(delta) / |y| on kept tokens")
    check_clip_flags(case, terms, exp, tol["log_w"])

    per_seq, t_dlp, t_dlz, t_weights = run_pytorch_path(case, upstream.float())
    within(terms.per_sequence, per_seq, tol["per_sequence_torch"], "per_sequence vs the PyTorch path")
    within(dlz, t_dlz, tol["dlz_torch"], "d log_z vs the PyTorch path")
    within(dlp, t_dlp, tol["dlp_torch"], "d logprobs vs the PyTorch path")
    if t_weights is not None:
        within(terms.weights, t_weights.weights, 2 * tol["weights"], "w vs the PyTorch path")


def check_clip_flags(case: Case, terms, exp: Expected, err_log_w: torch.Tensor) -> None:
    """Clip indicators from the float64 log-weight, except within its rounding error of a bound."""
    lo, hi = math.log1p(-case.eps_low), math.log1p(case.eps_high)
    cap = math.log(case.max_weight) if case.mode == "sequence_capped" else 20.0
    s = exp.log_w
    if case.mode in ("sequence_clipped", "geometric_clipped"):
        low, high, clear = s < lo, s > hi, ((s - lo).abs() > err_log_w) & ((s - hi).abs() > err_log_w)
    elif case.mode in ("sequence_capped", "sequence"):
        low, high, clear = torch.zeros_like(s, dtype=torch.bool), s > cap, (s - cap).abs() > err_log_w
    else:
        low = high = torch.zeros_like(s, dtype=torch.bool)
        clear = torch.ones_like(low)
    assert torch.equal(terms.clipped_low[clear], low[clear].float()), "clipped_low = log w < log(1 - eps_low)"
    assert torch.equal(terms.clipped_high[clear], high[clear].float()), "clipped_high = log w above its bound"


# ------------------------------------------------------------------------------------------------------
# The property: every option, mask shape, dtype and tile


@st.composite
def cases(draw) -> Case:
    b = draw(st.integers(1, 5))
    t = draw(st.one_of(st.integers(1, 20), st.sampled_from([31, 32, 33, 47])))
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(MODES))
    with_old = mode != "none" or draw(st.booleans())
    penalty = draw(st.sampled_from(PENALTIES))
    length_normalization = draw(st.booleans())
    # cosh and exp grow fast: keep delta within float32 range (|delta| of a few units)
    small = penalty in ("shifted_cosh", "linex")
    scale = 3.0 / math.sqrt(t) if small and not length_normalization else 3.0
    case = make_case(
        b,
        t,
        dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        mask=draw(masks(b, t)),
        poison=draw(st.sampled_from([float("nan"), float("-inf"), 0.0])),
        scale=scale,
        mode=mode,
        token_clip_mask=with_old and draw(st.booleans()),
        length_normalization=length_normalization,
        penalty=penalty,
        beta=draw(st.sampled_from([0.0, 1.0] if small else [0.0, 1.0, 15.0])),
        block_t=draw(st.sampled_from([0, 16])),  # 16: several blocks, the last one partial
    )
    if not with_old:
        case = replace(case, old=None, ro=None)
    elif not draw(st.booleans()):
        case = replace(case, ro=None)
    return case


@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=cases())
def test_matches_reference_and_pytorch_path(case, device):
    """per_seq = w g(delta), delta, w, the log-weight, l, l_ref, lengths, flags and both gradients."""
    check_case(case, device)


# ------------------------------------------------------------------------------------------------------
# Targeted cases


@pytest.mark.parametrize(("penalty", "alpha", "k"), [("linex", -0.7, 1.0), ("linex", 2.5, 1.0), ("huber", 1.0, 0.3)])
def test_penalty_parameters(penalty, alpha, k, device):
    """linex with a != 1 (both signs) and huber with k != 1, residuals on both sides of k."""
    case = make_case(4, 9, torch.float32, seed=5, penalty=penalty, linex_alpha=alpha, huber_delta=k, scale=1.0)
    check_case(case, device, seed=1)
    exp = run_reference(case, torch.ones(4, dtype=F64))
    expected = [
        w * reference.penalty(d, penalty, linex_alpha=alpha, huber_delta=k)
        for w, d in zip(exp.weights, exp.delta)
    ]
    terms, _, _ = run_fused(case, device, torch.ones(4))
    within(terms.per_sequence, torch.stack(expected), 1e-5 * (1 + torch.stack(expected).abs()), "g with a, k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 2048 + 5])
def test_one_token_and_long_rows(t, dtype, device):
    """T = 1 (one token per row, some rows empty) and T past one default tile (two blocks of 2048)."""
    mask = torch.ones(3, t, dtype=torch.bool)
    mask[1] = False
    if t > 1:
        mask[2, : t // 2] = False  # left padding
    case = make_case(3, t, dtype, seed=t, mask=mask, mode="sequence_clipped", token_clip_mask=True)
    check_case(case, device, seed=2)


def test_sequence_mode_caps_log_weight_at_20_and_extreme_ratios_stay_finite(device):
    """log w = sum rho reaches +-1000: "sequence" caps it at 20 (w = e^20, flagged high), clipped modes clip."""
    base = make_case(3, 6, torch.float32, seed=3, mode="sequence", mask=torch.ones(3, 6, dtype=torch.bool))
    shift = torch.tensor([[200.0], [-200.0], [0.0]])  # rho = +-200 per token
    case = replace(base, old=base.lp - shift, ro=base.lp - shift + 0.5)
    for mode in MODES[1:]:
        c = replace(case, mode=mode)
        check_case(c, device)
        terms, dlp, dlz = run_fused(c, device, torch.ones(3))
        assert bool(terms.per_sequence.isfinite().all() and dlp.isfinite().all() and dlz.isfinite().all()), mode
    terms, _, _ = run_fused(replace(case, mode="sequence", ro=None), device, torch.ones(3))
    assert terms.log_weights_unclipped[0] == pytest.approx(1200.0)
    assert terms.weights[0].item() == pytest.approx(math.exp(20.0), rel=1e-5) and terms.clipped_high[0] == 1.0


def test_token_clip_mask_bounds_are_strict(device):
    """rho exactly on log1p(eps) (as fp32) is kept; the next float beyond it is dropped; r = 0 drops nothing."""
    hi = torch.tensor(math.log1p(0.28), dtype=torch.float32)
    lo = torch.tensor(math.log1p(-0.2), dtype=torch.float32)
    up = torch.nextafter(hi, torch.tensor(1.0))
    down = torch.nextafter(lo, torch.tensor(-1.0))
    rho = torch.stack([torch.stack([hi, up, lo, down, torch.tensor(0.0)])] * 3)
    lp = torch.zeros(3, 5)  # old = lp - rho is then exact, and so is the kernel's rho = lp - old
    case = Case(lp, lp - 0.5, lp - rho, None, torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3),
                torch.ones(3, 5, dtype=torch.bool), mode="sequence_clipped", token_clip_mask=True)
    terms, dlp, _ = run_fused(case, device, torch.ones(3))
    assert terms.lengths.tolist() == [4.0, 4.0, 5.0], "r > 0 drops rho > hi only; r < 0 drops rho < lo only"
    assert (dlp[0] != 0).tolist() == [True, False, True, True, True]
    assert (dlp[1] != 0).tolist() == [True, True, True, False, True]
    check_case(case, device)


def test_nan_at_an_unmasked_position_gives_nan_and_leaves_other_rows_bitwise_equal(device):
    """A NaN log-prob, reference log-prob or old log-prob at a kept position gives per_seq = NaN for its row
    (never a silently finite value); the other rows are bitwise what they are without it."""
    clean = make_case(4, 12, torch.float32, seed=7, mode="sequence_clipped", mask=torch.ones(4, 12, dtype=torch.bool))
    bad = replace(clean, lp=clean.lp.clone(), ref=clean.ref.clone(), old=clean.old.clone())
    bad.lp[0, 3] = float("nan")
    bad.ref[1, 0] = float("nan")
    bad.old[2, 11] = float("nan")
    ones = torch.ones(4)
    t_bad, dlp_bad, dlz_bad = run_fused(bad, device, ones)
    t_clean, dlp_clean, dlz_clean = run_fused(clean, device, ones)
    assert bool(t_bad.per_sequence[:3].isnan().all()), "NaN at a kept position -> NaN per_seq"
    assert bool(t_bad.weights[2].isnan()), "NaN old log-prob -> NaN weight"
    assert torch.equal(t_bad.per_sequence[3], t_clean.per_sequence[3]) and torch.equal(dlp_bad[3], dlp_clean[3])
    assert torch.equal(dlz_bad[3], dlz_clean[3])
    torch_path, _, _, _ = run_pytorch_path(bad, ones)
    assert bool(torch_path[:3].isnan().all()), "the PyTorch path agrees: NaN"


@pytest.mark.parametrize("mode", MODES[1:])
def test_an_infinite_old_or_rollout_log_prob_at_a_kept_token_gives_nan(mode, device):
    """A clip or cap must not hide an infinite ratio: old = +-inf at a kept token makes the row's weight NaN
    (it was clipped to a finite weight); rollout = +inf makes it NaN (it was a weight of exactly 0); rollout
    = -inf (pi_rollout = 0) truncates the TIS factor to exactly tis_cap. Both paths agree."""
    clean = make_case(4, 6, torch.float32, seed=5, mode=mode, mask=torch.ones(4, 6, dtype=torch.bool))
    bad = replace(clean, old=clean.old.clone(), ro=clean.ro.clone())
    bad.old[0, 2] = float("-inf")
    bad.old[1, 4] = float("inf")
    bad.ro[2, 1] = float("inf")
    bad.ro[3, 0] = float("-inf")
    terms, _, _ = run_fused(bad, device, torch.ones(4))
    assert bool(terms.weights[:3].isnan().all()) and bool(terms.per_sequence[:3].isnan().all()), terms.weights
    assert bool(terms.weights[3].isfinite()), "pi_rollout = 0: the factor is exactly tis_cap"
    torch_path, _, _, _ = run_pytorch_path(bad, torch.ones(4))
    assert bool(torch_path[:3].isnan().all()) and bool(torch_path[3].isfinite())
    torch.testing.assert_close(terms.per_sequence[3], torch_path[3].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [-4.0, 0.0, float("inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_bad_tensor_normalizer_gives_nan_on_the_fused_path(value, reduction, device):
    case = make_case(3, 5, torch.float32, seed=1, mode="sequence_clipped")
    terms, _, _ = run_fused(case, device, torch.ones(3))
    loss = reduce_per_sequence(terms.per_sequence, terms.counted, reduction, torch.tensor(value))
    assert bool(loss.isnan().all()), loss


def test_a_row_does_not_depend_on_its_batch(device):
    """Bitwise: row i of a batch equals the same row computed alone (one program per row, no atomics)."""
    case = make_case(5, 40, torch.bfloat16, seed=9, mode="geometric_clipped", token_clip_mask=True, penalty="huber")
    up = torch.randn(5, generator=torch.Generator().manual_seed(0))
    terms, dlp, dlz = run_fused(case, device, up)
    one = Case(*(x[3:4] for x in (case.lp, case.ref, case.old, case.ro, case.rewards, case.log_z, case.mask)),
               **case.options())
    t1, dlp1, dlz1 = run_fused(one, device, up[3:4])
    assert torch.equal(terms.per_sequence[3:4], t1.per_sequence) and torch.equal(dlp[3:4], dlp1)
    assert torch.equal(dlz[3:4], dlz1)


def test_strided_inputs_are_read_in_place_or_copied(device):
    """Row-strided views, a strided log_z column, a transposed (token-strided) tensor and an expanded mask."""
    b, t = 3, 10
    case = make_case(b, t, torch.float32, seed=11, mode="sequence_capped", token_clip_mask=True)
    wide = torch.randn(b, t + 7, dtype=torch.float32)
    up = torch.randn(b, generator=torch.Generator().manual_seed(1))
    expected, dlp_e, dlz_e = run_fused(case, device, up)

    lp_wide = wide.clone().to(device)
    lp_wide[:, 3 : 3 + t] = case.lp.to(device)
    lp = lp_wide[:, 3 : 3 + t].detach().requires_grad_(True)  # row stride t + 7
    assert lp.stride() == (t + 7, 1)
    ref_t = case.ref.t().contiguous().t().to(device)  # token stride b: copied inside the launcher
    lz = torch.stack([case.log_z, case.log_z], dim=1).to(device)[:, 1].detach().requires_grad_(True)
    assert lz.stride() == (2,)
    opts = case.options()
    terms = fused_tb_sequence_terms(
        lp, ref_t, case.rewards.to(device), lz, case.mask.to(device), case.old.to(device), case.ro.to(device),
        **case.fused_kwargs(),
    )
    dlp, dlz = torch.autograd.grad(terms.per_sequence, [lp, lz], up.to(device))
    assert torch.equal(terms.per_sequence.cpu(), expected.per_sequence)
    assert torch.equal(dlp.cpu(), dlp_e) and torch.equal(dlz.cpu(), dlz_e)

    full = torch.ones(1, t, dtype=torch.bool).expand(b, t)  # row stride 0
    c_full = make_case(b, t, torch.float32, seed=11, mask=full.contiguous(), **opts)
    e_full, _, _ = run_fused(c_full, device, up)
    terms = fused_tb_sequence_terms(
        c_full.lp.to(device), c_full.ref.to(device), c_full.rewards.to(device), c_full.log_z.to(device),
        full.to(device), c_full.old.to(device), c_full.ro.to(device), **c_full.fused_kwargs(),
    )
    assert bool(terms.per_sequence.isfinite().all())
    assert torch.equal(terms.per_sequence.cpu(), e_full.per_sequence)


def test_empty_batch_and_empty_rows(device):
    lp = torch.zeros(0, 5, device=device, requires_grad=True)
    lz = torch.zeros(0, device=device, requires_grad=True)
    opts = make_case(1, 1, torch.float32).fused_kwargs()
    terms = fused_tb_sequence_terms(lp, lp.detach(), lz.detach(), lz, torch.zeros(0, 5, dtype=torch.bool,
                                    device=device), **opts)
    assert terms.per_sequence.shape == (0,) and terms.delta.shape == (0,)
    terms.per_sequence.sum().backward()
    assert lp.grad.shape == (0, 5) and lz.grad.shape == (0,)
    case = make_case(3, 4, torch.float16, mask=torch.zeros(3, 4, dtype=torch.bool), mode="sequence")
    check_case(case, device)


def test_only_log_z_requires_grad(device):
    case = replace(make_case(3, 8, torch.float32, seed=4, mode="sequence_clipped"), ro=None)
    lz = case.log_z.to(device, copy=True).requires_grad_(True)
    terms = fused_tb_sequence_terms(
        case.lp.to(device), case.ref.to(device), case.rewards.to(device), lz, case.mask.to(device),
        case.old.to(device), None, **case.fused_kwargs(),
    )
    (dlz,) = torch.autograd.grad(terms.per_sequence.sum(), [lz])
    _, _, expected = run_fused(case, device, torch.ones(3))
    assert torch.equal(dlz.cpu(), expected)


def test_double_backward_is_refused(device):
    case = make_case(2, 5, torch.float32)
    lp = case.lp.to(device, copy=True).requires_grad_(True)
    terms = fused_tb_sequence_terms(lp, case.ref.to(device), case.rewards.to(device), case.log_z.to(device),
                                    case.mask.to(device), **case.fused_kwargs())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(terms.per_sequence.sum(), [lp], create_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalizer", [None, 7.0, "tensor"])
def test_reduce_per_sequence_equals_apply_reduction(reduction, normalizer, device):
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[1] = False
    case = make_case(5, 6, torch.float32, seed=6, mask=mask, mode="sequence_clipped", token_clip_mask=True)
    terms, _, _ = run_fused(case, device, torch.ones(5))
    norm = torch.tensor([3.0]) if normalizer == "tensor" else normalizer
    got = reduce_per_sequence(terms.per_sequence, terms.counted, reduction, norm)
    expected = apply_reduction(terms.per_sequence, terms.lengths > 0, terms.counted > 0, reduction, norm)
    assert torch.equal(got, expected)
    empty = torch.zeros(2)
    assert reduce_per_sequence(empty, empty, "mean", None).item() == 0.0, "no counted row: mean 0, not NaN"


# ------------------------------------------------------------------------------------------------------
# No host synchronisation; torch.compile; the GPU compiler


SYNCING = ("item", "__bool__", "tolist", "__int__", "__float__")


def _count_flowloss_syncs(monkeypatch) -> list[str]:
    """Patch the host-synchronising Tensor methods; record those called from flowloss's source files."""
    import flowloss.kernels

    import flowloss

    roots = (os.path.dirname(flowloss.__file__), os.path.dirname(flowloss.kernels.__file__))
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.abspath(caller).startswith(roots):
                calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_no_host_synchronisation(monkeypatch, device):
    """Forward, backward and every reduction call none of item/bool/tolist/int/float from flowloss's code."""
    case = make_case(4, 9, torch.bfloat16, seed=8, mode="sequence", token_clip_mask=True, penalty="linex")
    names = ("lp", "ref", "old", "ro", "rewards", "log_z", "mask")
    tensors = {k: getattr(case, k).to(device, copy=True) for k in names}
    lp = tensors["lp"].requires_grad_(True)
    lz = tensors["log_z"].requires_grad_(True)
    calls = _count_flowloss_syncs(monkeypatch)
    for reduction, normalizer in [("mean", None), ("sum", torch.tensor(3.0, device=device)), ("none", 2.0)]:
        terms = fused_tb_sequence_terms(lp, tensors["ref"], tensors["rewards"], lz, tensors["mask"], tensors["old"],
                                        tensors["ro"], **case.fused_kwargs())
        loss = reduce_per_sequence(terms.per_sequence, terms.counted, reduction, normalizer)
        loss.sum().backward()
    assert calls == [], f"host synchronisations in flowloss: {calls}"
    # the patch does see flowloss's own syncs (the strict-mode normalizer check reads the tensor)
    from flowloss.reductions import check_normalizer

    check_normalizer(torch.tensor(2.0, device=device), strict=True)
    assert calls, "the counting patch missed a known host synchronisation"


def test_torch_compile_fullgraph_matches_eager(device):
    """Dynamo traces the op (one node each way): same loss and gradients as eager, no graph break."""
    case = make_case(3, 10, torch.float32, seed=12, mode="sequence_clipped", token_clip_mask=True, penalty="huber")
    args = [getattr(case, k).to(device) for k in ("lp", "ref", "rewards", "log_z", "mask", "old")]

    def loss_fn(lp, ref, rewards, log_z, mask, old):
        terms = fused_tb_sequence_terms(lp, ref, rewards, log_z, mask, old, **case.fused_kwargs())
        return reduce_per_sequence(terms.per_sequence, terms.counted, "mean", None)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        lp, lz = args[0].clone().requires_grad_(True), args[3].clone().requires_grad_(True)
        loss = fn(lp, args[1], args[2], lz, args[4], args[5])
        results.append((loss.detach(), *torch.autograd.grad(loss, [lp, lz])))
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


def test_bench_entry_is_the_default_loss(device):
    """`flowloss bench`'s flowloss-fused-loss callable equals trajectory_balance_loss with its defaults."""
    from flowloss.bench.impls import IMPLS

    (entry,) = [i for i in IMPLS if i.name == "flowloss-fused-loss"]
    case = make_case(6, 12, torch.float32, seed=13, mode="sequence_clipped")
    fn = entry.build(device)
    args = [getattr(case, k).to(device) for k in ("lp", "ref", "rewards", "log_z", "mask", "old")]
    loss = fn(*args)
    expected = trajectory_balance_loss(case.lp, case.ref, case.rewards, case.log_z, case.mask, old_logprobs=case.old)
    assert loss.shape == () and abs(loss.item() - expected.item()) <= 1e-5 * (1 + abs(expected.item()))


def test_support_check_and_stat_rows(device):
    from flowloss.kernels import tb_loss

    assert fused_tb.STAT_ROWS == tb_loss.STAT_ROWS
    assert fused_tb.TBSequenceTerms._fields[1:] == tb_loss.STAT_ROWS[:-1]
    x = torch.zeros(2, 3, device=device)
    assert fused_tb_supported(x, x.bool(), None, x.half())
    assert not fused_tb_supported(x, x.double()), "float64 stays on the PyTorch path"


# ------------------------------------------------------------------------------------------------------
# On a GPU only


def _round_to_nearest(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x rounded to nearest-even in dtype, True where x is within a hair of a rounding midpoint)``: torch's
    fp32 -> bf16/fp16 conversion rounds to nearest-even, as the GPU's stores do."""
    near = x.to(dtype)
    _, exponent = torch.frexp(x)  # |x| in [2^(e-1), 2^e)
    bits, smallest = {torch.bfloat16: (8, 2.0**-133), torch.float16: (11, 2.0**-24)}[dtype]
    ulp = torch.clamp(torch.ldexp(torch.ones_like(x), exponent - bits), min=smallest)
    tie = ((x - near.float()).abs() - ulp / 2).abs() <= 4 * U * x.abs()
    return near, tie


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a GPU (the interpreter truncates)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["none", "sequence_clipped", "geometric_clipped"])
def test_half_gradients_are_the_fp32_gradients_rounded_to_nearest(dtype, mode, device):
    """The backward forms ``d lp`` and ``d log_z`` in fp32 and stores them in the inputs' dtype. On a GPU the store
    rounds to nearest-even: the bf16/fp16 gradients equal the fp32 kernel's gradients on the same values, rounded
    by torch, element for element (Triton's interpreter truncates instead, so only the GPU lane can check this;
    elements within 4 fp32 ulps of a midpoint are left out, and the check must meet elements where truncation
    and rounding differ)."""
    case = make_case(16, 1024, dtype, seed=23, mode=mode, token_clip_mask=mode != "none", scale=2.0)
    upstream = torch.randn(16, generator=torch.Generator().manual_seed(5))
    _, dlp, dlz = run_fused(case, device, upstream)
    wide = replace(
        case,
        **{k: getattr(case, k).float() for k in ("lp", "ref", "old", "ro", "rewards", "log_z")},
    )
    _, dlp32, dlz32 = run_fused(wide, device, upstream)
    for name, got, exact in (("d logprobs", dlp, dlp32), ("d log_z", dlz, dlz32)):
        want, tie = _round_to_nearest(exact, dtype)
        sure = ~tie & exact.isfinite()
        assert torch.equal(got[sure], want[sure]), f"{name}: not the fp32 gradient rounded to nearest"
    truncated = (dlp32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype) if dtype == torch.bfloat16 else None
    if truncated is not None:
        assert bool((truncated != dlp).any()), "no element tells rounding from truncation: the check has no power"


def test_the_token_clip_mask_keeps_an_infinite_ratio_so_it_reaches_the_loss(device):
    """An old log-prob of +-inf (rho = -+inf) at a kept token is outside any trust region; dropping it would turn
    the bad value into a finite loss. Both paths keep it: the row's weight and loss are NaN."""
    clean = make_case(2, 6, torch.float32, seed=4, mode="sequence_clipped", token_clip_mask=True, old_noise=0.01,
                      mask=torch.ones(2, 6, dtype=torch.bool))
    bad = replace(clean, old=clean.old.clone(), rewards=torch.tensor([1.0, -1.0]))
    bad.old[0, 1] = float("-inf")  # rho = +inf with r > 0: above 1 + eps_high
    bad.old[1, 2] = float("inf")  # rho = -inf with r < 0: below 1 - eps_low
    terms, _, _ = run_fused(bad, device, torch.ones(2))
    assert terms.lengths.tolist() == [6.0, 6.0] and bool(terms.per_sequence.isnan().all())
    torch_path, _, _, _ = run_pytorch_path(bad, torch.ones(2))
    assert bool(torch_path.isnan().all())

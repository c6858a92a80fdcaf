"""Fused lm_head + log-prob kernels (``flowloss.kernels.linear_logprob_forward`` / ``_backward``) vs float64.

Runs under Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by ``make test-kernels`` before triton is
imported) or on a CUDA device; every tensor is created on the ``device`` fixture's device. Shapes are small and
tiles are 16 wide, so a few tiles and chunks are crossed even at N, V < 100 (the interpreter runs every program in
Python). ``TestOnGpu`` repeats the checks at a realistic shape (V = 151,936, N V > 2^31) and skips without CUDA.

Tolerances are rounding bounds computed from the data, not constants tuned to pass:

- values (fp32 out, fp32 accumulation): the logit of row n carries at most ``(H + 2) 2^-24 M_n`` of matmul error,
  ``M_n = max_v (|h_n| @ |W_v| + |b_v|) / T``, plus the exp2/log2 approximations (``VALUE_TOL``);
- gradients: ``dz`` is rounded to the input dtype (unit roundoff ``u``: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32; 2^-7 for
  bf16 under the interpreter, which truncates), summed in fp32, rounded once to the output dtype. So
  ``|err dH| <= u |dH| + (u + d_n + (V + 2) 2^-24) (A @ |W|)`` with ``A >= |dz|`` the magnitude of the terms of
  ``dz`` and ``d_n`` the logit error above (plus fp32 underflow of tiny ``p``); the same for ``dW`` with
  ``A^T @ |h|``, and for ``db`` without the ``dz`` rounding (``db`` sums fp32 ``dz``). The naive path (bf16 matmul,
  fp32 log-softmax, autograd) is checked to err at least as much (``test_errors_no_larger_than_naive``).
"""

from __future__ import annotations

import math
import os
import warnings
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

from flowloss.kernels import configs, linear_logprob_backward, linear_logprob_forward  # noqa: E402
from flowloss.kernels.linear_logprob_plan import (  # noqa: E402
    SINGLE_PASS_FRACTION,
    default_scratch_bytes,
    plan_backward,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flowloss import reference  # noqa: E402
from tests.conftest import close  # noqa: E402

# Discarded tl.where branches stay free of 0 * inf and inf - inf: numpy (the interpreter) would warn.
pytestmark = [pytest.mark.triton_interpreter, pytest.mark.filterwarnings("error::RuntimeWarning")]

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Rounding of the kernels' stores (dz chunks, gradients). GPUs round fp32 -> bf16 to nearest; Triton's interpreter
# truncates (its cast passes no rounding mode, and fp_downcast_rounding="rtne" does not change that), an error of up
# to one ulp: 2^-7.
STORE_ROUNDOFF = {**UNIT_ROUNDOFF, torch.bfloat16: 2.0**-7 if INTERPRET else 2.0**-8}
# Below fp16's normal range (6e-5) rounding is absolute: half the subnormal spacing 2^-24.
SUBNORMAL_ABS = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
EPS32 = 2.0**-24
# p = 2^(u - lse2) in fp32 below the normal range (2^-126) is flushed to zero (or keeps few bits): an absolute error
# of up to 2^-126 per entry of p, times |g| + |g_H| |log p + H| (|log p| <= 100 there, |H| <= log V).
FP32_TINY = 2.0**-126
# exp2/log2 are hardware approximations on GPUs (~2 ulp); the O(1) arithmetic around them adds a few ulp of |lse|.
VALUE_TOL = (2e-5, 2e-6)
# Small tiles so that tests cross tile, split and chunk boundaries at small N, V.
FWD = {"block_n": 16, "block_v": 16, "block_k": 16, "split_v": 32}
BWD = {
    "block_n": 16,
    "block_v": 16,
    "block_k": 16,
    "block_h": 16,
    "h_rows": 16,
    "min_chunk_tiles": 2,
    "min_split_row_tiles": 1,
}


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu" if INTERPRET else "cuda")


@dataclass(frozen=True)
class Case:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    labels: torch.Tensor  # [N]
    g: torch.Tensor  # [N] fp32 upstream gradient of the log-probs
    g_h: torch.Tensor | None  # [N] fp32 upstream gradient of the entropy
    temperature: float = 0.7
    ignore_index: int = -100

    @property
    def kept(self) -> torch.Tensor:
        return (self.labels >= 0) & (self.labels != self.ignore_index)


def make_case(
    n, h, v, dtype, device, *, bias=True, entropy=True, seed=0, scale=2.0, skip=0.25, temperature=0.7
) -> Case:
    """Logits ``h W^T`` with standard deviation ``scale`` (2: the bench's), ~``skip`` of the rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (scale / math.sqrt(h))
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < skip] = -100
    g = torch.randn(n, generator=gen)
    g_h = torch.randn(n, generator=gen) if entropy else None

    def put(t, dt=None):
        return None if t is None else t.to(dtype=dt or t.dtype).to(device)

    return Case(put(hidden, dtype), put(weight, dtype), put(b, dtype), put(labels), put(g), put(g_h), temperature)


def skip_order(case: Case) -> torch.Tensor:
    """What the caller passes as ``order``: a stable argsort of the skip flags (kept rows first)."""
    return torch.argsort((~case.kept).to(torch.int8), stable=True)


def run(case: Case, *, order=None, fwd=FWD, bwd=BWD, **kwargs):
    """Forward, then backward with the case's upstream gradients: (logprobs, lse2, entropy, dH, dW, db)."""
    with_entropy = case.g_h is not None
    lp, lse2, ent = linear_logprob_forward(
        case.hidden,
        case.weight,
        case.bias,
        case.labels,
        temperature=case.temperature,
        ignore_index=case.ignore_index,
        with_entropy=with_entropy,
        order=order,
        **fwd,
    )
    dh, dw, db = linear_logprob_backward(
        case.hidden,
        case.weight,
        case.bias,
        case.labels,
        lse2,
        case.g,
        entropy=ent,
        grad_entropy=case.g_h,
        temperature=case.temperature,
        ignore_index=case.ignore_index,
        order=order,
        **{**bwd, **kwargs},
    )
    return lp, lse2, ent, dh, dw, db


@dataclass
class Ref:
    logprobs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    dz: torch.Tensor  # [N, V]
    mag: torch.Tensor  # [N, V] >= |dz|: the magnitude of the terms dz is made of (rounding is relative to it)
    d_hidden: torch.Tensor
    d_weight: torch.Tensor
    d_bias: torch.Tensor
    logit_err: torch.Tensor  # [N] fp32 error bound of the row's logits (and so of log p)


def reference_of(case: Case) -> Ref:
    """float64 closed forms on the same (rounded) inputs, ``p log p = 0`` at ``p = 0``, ``dz = 0`` on skipped rows;
    a row whose logits are all ``-inf`` has ``lse = logp = -inf``, ``H = 0`` and ``dz = g onehot / T``.
    ``test_reference_matches_autograd`` checks the closed forms against autograd through ``reference.token_logprobs``.
    """
    h, w = case.hidden.cpu().to(F64), case.weight.cpu().to(F64)
    b = case.bias.cpu().to(F64) if case.bias is not None else torch.zeros(w.shape[0], dtype=F64)
    n, v = h.shape[0], w.shape[0]
    t = case.temperature
    kept = case.kept.cpu()
    z = (h @ w.T + b) / t
    lse = torch.logsumexp(z, dim=1)
    dead = lse == float("-inf")
    log_p = z - torch.where(dead, 0.0, lse)[:, None]
    p = log_p.exp()
    plogp = torch.where(p > 0, p * log_p, 0.0)
    entropy = -plogp.sum(dim=1)
    y = case.labels.cpu().clamp(0, v - 1)
    logprobs = torch.where(dead, float("-inf"), z.gather(1, y[:, None])[:, 0] - torch.where(dead, 0.0, lse))
    g = case.g.cpu().to(F64) * kept
    g_h = (case.g_h.cpu().to(F64) if case.g_h is not None else torch.zeros(n, dtype=F64)) * kept
    onehot = torch.zeros(n, v, dtype=F64).scatter_(1, y[:, None], 1.0)
    entropy_term = torch.where(p > 0, p * (log_p + entropy[:, None]), 0.0)
    dz = (g[:, None] * (onehot - p) - g_h[:, None] * entropy_term) / t
    dz = torch.where(kept[:, None], dz, 0.0)
    abs_log_p = torch.where(p > 0, log_p.abs() + entropy.abs()[:, None], 0.0)
    mag = (g.abs()[:, None] * (onehot + p) + g_h.abs()[:, None] * p * abs_log_p) / t
    b_mag = torch.where(b.isfinite(), b.abs(), 0.0)  # a -inf bias gives an exact -inf logit
    m_n = ((h.abs() @ w.abs().T + b_mag) / t).amax(dim=1)
    logit_err = 4 * (h.shape[1] + 2) * EPS32 * m_n
    return Ref(
        torch.where(kept, logprobs, 0.0),
        torch.where(kept, lse, 0.0),
        torch.where(kept, entropy, 0.0),
        dz,
        mag,
        dz @ w,
        dz.T @ h,
        dz.sum(dim=0),
        logit_err,
    )


def check_values(case: Case, ref: Ref, lp, lse2, ent) -> None:
    kept = case.kept.cpu()
    assert lp.dtype == lse2.dtype == torch.float32
    tol = VALUE_TOL[0] + ref.logit_err
    for name, got, want in (
        ("logprob = z_y - logsumexp(z)", lp, ref.logprobs),
        ("lse2 = logsumexp(z) / ln 2", lse2.cpu().double() * math.log(2), ref.lse),
        ("entropy = -sum p log p", ent, ref.entropy if ent is not None else None),
    ):
        if got is None:
            continue
        got = got.cpu().double()
        finite = want.isfinite()
        assert torch.equal(got[~finite], want[~finite]), f"{name}: non-finite entries differ"
        err = torch.where(finite, (got - want).abs(), 0.0)
        bound = tol + VALUE_TOL[1] * want.abs().nan_to_num(0.0, 0.0, 0.0)
        assert bool((err <= bound).all()), f"{name}: max error {err.max():.3e}, bound there {bound[err.argmax()]:.3e}"
        assert bool((got[~kept] == 0).all()), f"{name}: skipped rows must hold 0"


def grad_bounds(case: Case, ref: Ref, filter_eps: float | None = None) -> tuple[torch.Tensor, ...]:
    """Elementwise error bounds of (dH, dW, db) (module docstring), plus the filter's when ``filter_eps``."""
    dtype = case.hidden.dtype
    u, sub = STORE_ROUNDOFF[dtype], SUBNORMAL_ABS[dtype]
    h, w = case.hidden.cpu().to(F64).abs(), case.weight.cpu().to(F64).abs()
    n, v = ref.dz.shape
    d = ref.logit_err + 2 * VALUE_TOL[0]  # relative error of p (and absolute error of log p)
    g_h = case.g_h.cpu().to(F64).abs() if case.g_h is not None else torch.zeros(n, dtype=F64)
    c = (case.g.cpu().to(F64).abs() + g_h) / case.temperature * case.kept.cpu()  # the row's gradient scale
    tiny = FP32_TINY * 120 * c[:, None]
    a_h = ref.mag * (u + d[:, None] + (v + 2) * EPS32) + tiny + sub
    a_w = ref.mag * (u + d[:, None] + (n + 2) * EPS32) + tiny + sub
    b_h = u * ref.d_hidden.abs() + a_h @ w
    b_w = u * ref.d_weight.abs() + a_w.T @ h
    u_b = STORE_ROUNDOFF[case.bias.dtype] if case.bias is not None else 0.0
    b_b = u_b * ref.d_bias.abs() + (ref.mag * (d[:, None] + (n + 2) * EPS32) + tiny).sum(dim=0)
    if filter_eps is not None:
        share = filter_eps / -(-v // BWD["block_v"])  # per tile; a row loses at most filter_eps * c in all
        b_h = b_h + filter_eps * c[:, None] * w.amax(dim=0)[None, :]
        b_w = b_w + share * (c[:, None] * h).sum(dim=0)[None, :]
    return b_h, b_w, b_b


def check_grads(case: Case, ref: Ref, dh, dw, db, *, filter_eps=None) -> None:
    b_h, b_w, b_b = grad_bounds(case, ref, filter_eps)
    assert dh.dtype == case.hidden.dtype and dw.dtype == case.weight.dtype
    assert dh.shape == case.hidden.shape and dh.is_contiguous()
    outs = [("dH = dz @ W", dh, ref.d_hidden, b_h), ("dW = dz^T @ h", dw, ref.d_weight, b_w)]
    if case.bias is not None:
        assert db.dtype == case.bias.dtype
        outs.append(("db = sum_rows dz", db, ref.d_bias, b_b))
    else:
        assert db is None
    for name, got, want, bound in outs:
        err = (got.cpu().double() - want).abs()
        assert bool(err.isfinite().all()), f"{name}: non-finite entries"
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name}: error {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} "
            f"(got {got.flatten()[worst].item():.6g}, want {want.flatten()[worst].item():.6g})"
        )
    assert bool((dh[~case.kept] == 0).all()), "skipped rows get dH = 0 exactly"


# --- values and every gradient against float64 ---


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_float64(dtype, bias, device):
    """N, H, V not multiples of the 16-wide tiles; T = 0.7; random g and g_H; a quarter of the rows ignored."""
    case = make_case(37, 40, 83, dtype, device, bias=bias)
    lp, lse2, ent, dh, dw, db = run(case)
    ref = reference_of(case)
    check_values(case, ref, lp, lse2, ent)
    check_grads(case, ref, dh, dw, db)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_without_entropy(dtype, device):
    case = make_case(29, 24, 50, dtype, device, entropy=False, temperature=1.3)
    lp, lse2, ent, dh, dw, db = run(case)
    assert ent is None
    ref = reference_of(case)
    check_values(case, ref, lp, lse2, None)
    check_grads(case, ref, dh, dw, db)


def test_entropy_gradient_only(device):
    """``grad_logprobs=None``: dz is the entropy term alone."""
    case = make_case(21, 24, 40, torch.float32, device)
    case = replace(case, g=torch.zeros_like(case.g))
    _, lse2, ent, _, _, _ = run(case)
    dh, dw, db = linear_logprob_backward(
        case.hidden, case.weight, case.bias, case.labels, lse2, None, entropy=ent, grad_entropy=case.g_h,
        temperature=case.temperature, **BWD,
    )  # fmt: skip
    check_grads(case, reference_of(case), dh, dw, db)


def test_reference_matches_autograd():
    """The closed forms of `reference_of` = autograd through ``flowloss.reference.token_logprobs(h W^T + b)``."""
    case = make_case(9, 12, 20, torch.float32, torch.device("cpu"))
    ref = reference_of(case)
    h = case.hidden.double().requires_grad_(True)
    w = case.weight.double().requires_grad_(True)
    b = case.bias.double().requires_grad_(True)
    lp, ent = reference.token_logprobs(h @ w.T + b, case.labels, temperature=case.temperature)
    (lp * case.g.double() + ent * case.g_h.double()).sum().backward()
    close(lp, ref.logprobs, atol=1e-12, rtol=1e-12, what="reference logprob")
    close(ent, ref.entropy, atol=1e-12, rtol=1e-12, what="reference entropy")
    for name, got, want in (("dH", h.grad, ref.d_hidden), ("dW", w.grad, ref.d_weight), ("db", b.grad, ref.d_bias)):
        close(got, want, atol=1e-12, rtol=1e-10, what=f"reference {name}")


@pytest.mark.parametrize(("n", "h", "v"), [(5, 7, 1), (6, 1, 19), (1, 20, 33), (17, 16, 16)])
def test_odd_shapes(n, h, v, device):
    """V = 1 (log p = 0, H = 0, dz = 0 exactly), H = 1, N = 1, and shapes equal to one tile."""
    case = make_case(n, h, v, torch.bfloat16, device, skip=0.2)
    lp, lse2, ent, dh, dw, db = run(case)
    ref = reference_of(case)
    check_values(case, ref, lp, lse2, ent)
    check_grads(case, ref, dh, dw, db)
    if v == 1:
        assert bool((lp == 0).all() and (ent == 0).all()), "V = 1: log p = 0 and H = 0 exactly"
        assert bool((dh == 0).all() and (dw == 0).all() and (db == 0).all()), "V = 1: p = 1, dz = 0 exactly"


def test_errors_no_larger_than_naive(device):
    """bf16: our errors vs float64 are at most the naive path's (bf16 matmul, fp32 log-softmax, autograd)."""
    case = make_case(48, 64, 96, torch.bfloat16, device, skip=0.1)
    ours = run(case)
    ref = reference_of(case)
    h = case.hidden.detach().clone().requires_grad_(True)
    w = case.weight.detach().clone().requires_grad_(True)
    b = case.bias.detach().clone().requires_grad_(True)
    kept = case.kept
    logp = torch.log_softmax((h @ w.T + b).float() / case.temperature, dim=-1)
    lp = torch.where(kept, logp.gather(1, case.labels.clamp_min(0)[:, None])[:, 0], 0.0)
    ent = torch.where(kept, -(logp.exp() * logp).sum(-1), 0.0)
    (lp * case.g + ent * case.g_h).sum().backward()
    naive = (lp, ent, h.grad, w.grad, b.grad)
    wants = (ref.logprobs, ref.entropy, ref.d_hidden, ref.d_weight, ref.d_bias)
    for name, mine, theirs, want in zip(
        ("logprob", "entropy", "dH", "dW", "db"), (ours[0], ours[2], *ours[3:]), naive, wants
    ):
        err_mine = (mine.cpu().double() - want).abs().max()
        err_naive = (theirs.detach().cpu().double() - want).abs().max()
        assert err_mine <= err_naive, f"{name}: ours errs {err_mine:.3e} > naive {err_naive:.3e}"


def test_layouts_label_dtypes_empty_batch_and_zero_gradient(device):
    """A row-strided hidden (a column slice of a wider buffer) is read in place, int32 labels and order equal int64,
    bitwise; N = 0 gives empty outputs; no upstream gradient gives exact zeros."""
    case = make_case(30, 24, 50, torch.bfloat16, device, seed=11)
    expected = run(case, order=skip_order(case))
    wide = torch.zeros(30, 40, dtype=torch.bfloat16, device=device)
    wide[:, 5:29] = case.hidden
    strided = wide[:, 5:29]
    assert strided.stride() == (40, 1)
    narrow = replace(case, hidden=strided, labels=case.labels.to(torch.int32))
    got = run(narrow, order=skip_order(case).to(torch.int32))
    for a, b, name in zip(expected, got, ("logprobs", "lse2", "entropy", "dH", "dW", "db")):
        assert torch.equal(a, b), f"{name}: row stride or int32 indices changed the result"

    empty = make_case(0, 24, 50, torch.float32, device)
    lp, lse2, ent, dh, dw, db = run(empty)
    assert lp.shape == lse2.shape == ent.shape == (0,) and dh.shape == (0, 24)
    assert bool((dw == 0).all() and (db == 0).all())

    _, lse2, ent, *_ = expected
    dh, dw, db = linear_logprob_backward(
        case.hidden, case.weight, case.bias, case.labels, lse2, None, entropy=ent, grad_entropy=None, **BWD
    )
    assert bool((dh == 0).all() and (dw == 0).all() and (db == 0).all()), "no upstream gradient: zeros"


# --- skipped rows, order, batch independence ---


@pytest.mark.parametrize("use_order", [False, True], ids=["rows", "order"])
def test_skipped_rows_are_never_read(use_order, device):
    """NaN in the hidden rows of ignored (-100), negative and custom-``ignore_index`` rows: every output and gradient
    is finite and those rows get 0; a run of skipped rows spanning whole tiles is included."""
    case = make_case(45, 24, 40, torch.float32, device, skip=0.0)
    labels = case.labels.clone()
    labels[[0, 5, 6]] = -100
    labels[7] = -3
    labels[16:32] = 9  # one whole 16-row tile ignored through ignore_index=9 ...
    labels[40] = 9
    case = replace(case, labels=labels, ignore_index=9)
    poisoned = case.hidden.clone()
    poisoned[~case.kept] = float("nan")
    order = skip_order(case) if use_order else None
    lp, lse2, ent, dh, dw, db = run(replace(case, hidden=poisoned), order=order)
    ref = reference_of(case)
    check_values(case, ref, lp, lse2, ent)
    check_grads(case, ref, dh, dw, db)
    skipped = ~case.kept
    assert bool((lp[skipped] == 0).all() and (ent[skipped] == 0).all() and (lse2[skipped] == 0).all())


def test_order_gives_the_same_rows(device):
    """Reading rows through ``order`` (kept rows first) changes every row's tile and position: log-probs, entropy
    and dH are bitwise unchanged (a row's arithmetic does not depend on its tile-mates); dW, db within bounds."""
    case = make_case(50, 24, 45, torch.bfloat16, device, skip=0.4, seed=3)
    plain = run(case)
    ordered = run(case, order=skip_order(case))
    for i, name in ((0, "logprobs"), (1, "lse2"), (2, "entropy"), (3, "dH")):
        assert torch.equal(plain[i], ordered[i]), f"{name} changed with the row order"
    check_grads(case, reference_of(case), *ordered[3:])


@settings(max_examples=6, deadline=None, derandomize=True)
@given(extra=st.integers(1, 40), at=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_a_row_does_not_depend_on_its_batch(extra, at, seed):
    """A row computed alone and at position ``at`` of a larger batch (other chunk plans, other tile-mates): its
    log-prob, log-sum-exp, entropy and dH are bitwise the same."""
    device = torch.device("cpu" if INTERPRET else "cuda")
    big = make_case(extra + 1, 20, 37, torch.bfloat16, device, seed=seed, skip=0.3)
    at = at % (extra + 1)
    labels = big.labels.clone()
    labels[at] = 5  # kept
    big = replace(big, labels=labels)
    one = replace(
        big, hidden=big.hidden[at : at + 1], labels=big.labels[at : at + 1], g=big.g[at : at + 1],
        g_h=big.g_h[at : at + 1],
    )  # fmt: skip
    whole, alone = run(big, max_scratch_bytes=1), run(one)  # smallest chunks vs one chunk
    for i, name in ((0, "logprob"), (1, "lse2"), (2, "entropy"), (3, "dH")):
        assert torch.equal(whole[i][at : at + 1], alone[i]), f"{name} of a row depends on its batch"


# --- plans: every chunking gives the same gradients ---


PLANS = {
    # budget (bytes) -> what plan_backward picks for N = 45, V = 83, H = 24, fp32, BWD tiles (asserted below)
    "single_pass": 1 << 30,
    "two_pass_whole_vocab": 8000,
    "two_pass_split_vocab": 6000,
    "split_rows": 1,
}


def _plan(case: Case, budget: int, has_order: bool):
    n, h = case.hidden.shape
    return plan_backward(
        n, case.weight.shape[0], h, case.hidden.element_size(), need_hidden=True, need_weight=True, need_bias=True,
        has_order=has_order, budget=budget, block_n=BWD["block_n"], block_v=BWD["block_v"], h_rows=BWD["h_rows"],
        min_chunk_tiles=BWD["min_chunk_tiles"], min_split_row_tiles=BWD["min_split_row_tiles"],
    )  # fmt: skip


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("use_order", [False, True], ids=["rows", "order"])
def test_every_plan_gives_the_same_gradients(plan, use_order, device):
    """One recompute with an fp32 dH buffer, two passes, vocabulary sub-chunks, split rows (fp32 dW buffer): dH
    and dW bitwise equal across plans (summation order fixed by the tiles), each within the float64 bounds."""
    case = make_case(45, 24, 83, torch.float32, device, seed=1)
    p = _plan(case, PLANS[plan], use_order)
    expected = {
        "single_pass": p.single_pass,
        "two_pass_whole_vocab": p.pass_h and p.h_cols >= p.v_pad,
        "two_pass_split_vocab": p.pass_h and p.h_cols < p.v_pad,
        "split_rows": p.w_rows < p.n_pad,
    }[plan]
    assert expected, f"budget {PLANS[plan]} no longer gives plan {plan}: {p}"
    order = skip_order(case) if use_order else None
    got = run(case, order=order, max_scratch_bytes=PLANS[plan])
    check_grads(case, reference_of(case), *got[3:])
    baseline = run(case, order=order, max_scratch_bytes=PLANS["single_pass"])
    assert torch.equal(got[3], baseline[3]) and torch.equal(got[4], baseline[4]), "the plan changed dH or dW"


@pytest.mark.parametrize(
    "needs",
    [
        {"need_hidden": False},
        {"need_weight": False},
        {"need_bias": False},
        {"need_hidden": False, "need_weight": False},
        {"need_weight": False, "need_bias": False},
    ],
    ids=lambda d: "+".join(k[5:] for k in d) + "-off",
)
def test_only_the_requested_gradients(needs, device):
    """Each subset of (dH, dW, db): the requested ones match float64, the others are None (two-pass budget)."""
    case = make_case(40, 24, 70, torch.float32, device, seed=2)
    _, lse2, ent, *_ = run(case)
    dh, dw, db = linear_logprob_backward(
        case.hidden, case.weight, case.bias, case.labels, lse2, case.g, entropy=ent, grad_entropy=case.g_h,
        temperature=case.temperature, max_scratch_bytes=6000, **BWD, **needs,
    )  # fmt: skip
    ref = reference_of(case)
    b_h, b_w, b_b = grad_bounds(case, ref)
    for flag, got, want, bound in (
        ("need_hidden", dh, ref.d_hidden, b_h),
        ("need_weight", dw, ref.d_weight, b_w),
        ("need_bias", db, ref.d_bias, b_b),
    ):
        if not needs.get(flag, True):
            assert got is None, f"{flag}=False must return None"
            continue
        assert bool(((got.cpu().double() - want).abs() <= bound).all()), f"{flag}: outside the float64 bound"


def test_reads_only_what_it_wrote_and_is_deterministic(device, monkeypatch):
    """Twice, the second time with every ``torch.empty`` (outputs, dz chunks, flags, tile lists, fp32 buffers) filled
    with NaN / -77 first: bitwise equal results, so no unwritten scratch is read and nothing depends on timing."""
    case = make_case(45, 24, 83, torch.bfloat16, device, seed=4)
    order = skip_order(case)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -77)

    for budget in (PLANS["two_pass_split_vocab"], PLANS["split_rows"], PLANS["single_pass"]):
        first = run(case, order=order, max_scratch_bytes=budget, filter_eps=2.0**-10)
        monkeypatch.setattr(torch, "empty", poisoned)
        second = run(case, order=order, max_scratch_bytes=budget, filter_eps=2.0**-10)
        monkeypatch.setattr(torch, "empty", real_empty)
        for a, b, name in zip(first, second, ("logprobs", "lse2", "entropy", "dH", "dW", "db")):
            assert torch.equal(a, b), f"{name} differs between runs (budget {budget})"


# --- extreme values ---


def test_neg_inf_bias_and_dead_rows(device):
    """-inf bias entries (padded vocabulary): p = 0 and no gradient there, including whole -inf tiles and a label
    whose logit is -inf (log p = -inf, dz = g onehot / T: finite). All -inf: log p = -inf, H = 0."""
    case = make_case(20, 16, 50, torch.float32, device, skip=0.1)
    bias = case.bias.clone()
    bias[:18] = float("-inf")  # the first tile and a bit of the second
    bias[40:] = float("-inf")
    labels = case.labels.clone()
    labels[3] = 2  # a label on a -inf column
    case = replace(case, bias=bias, labels=labels)
    lp, lse2, ent, dh, dw, db = run(case)
    ref = reference_of(case)
    check_values(case, ref, lp, lse2, ent)
    assert lp[3] == float("-inf")
    check_grads(case, ref, dh, dw, db)
    neg_inf = bias == float("-inf")
    neg_inf[case.labels[case.kept]] = False  # a label's column gets g / T even at -inf
    assert bool((db[neg_inf] == 0).all() and (dw[neg_inf] == 0).all()), "no gradient on -inf columns"

    dead = replace(case, bias=torch.full_like(bias, float("-inf")))
    lp, lse2, ent, dh, dw, db = run(dead)
    kept = dead.kept
    assert bool((lp[kept] == float("-inf")).all() and (ent == 0).all() and (lse2[kept] == float("-inf")).all())
    ref = reference_of(dead)
    check_grads(dead, ref, dh, dw, db)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_logit_gives_nan(bad, device):
    """A NaN / +inf in a kept row's hidden state (NaN, or +inf and -inf logits) makes that row's outputs NaN, the
    others exact; a +inf bias entry is a +inf logit on every row: all kept rows NaN, not a silently finite value."""
    case = make_case(20, 16, 40, torch.float32, device, skip=0.2)
    labels = case.labels.clone()
    labels[0] = 3
    hidden = case.hidden.clone()
    hidden[0, 5] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lp, _, ent, *_ = run(replace(case, hidden=hidden, labels=labels))
        assert lp[0].isnan() and ent[0].isnan(), "NaN (or +inf and -inf logits) on row 0: NaN"
        ref = reference_of(replace(case, labels=labels))
        rest = torch.arange(20, device=device) > 0
        close(lp[rest], ref.logprobs[rest.cpu()], atol=1e-5, rtol=1e-5, what="the other rows are exact")
        bias = case.bias.clone()
        bias[7] = float("inf")
        lp, _, ent, *_ = run(replace(case, bias=bias, labels=labels))
    kept = labels >= 0
    assert bool(lp[kept].isnan().all() and ent[kept].isnan().all()), "a +inf logit must give NaN"
    assert bool((lp[~kept] == 0).all()), "skipped rows stay 0"


def test_large_label_on_a_kept_row_reads_nothing_out_of_bounds(device):
    """A kept label >= V (the caller replaces its outputs by NaN) is never used as an address: the kernels run, the
    other rows are bitwise what they are with a valid label there, and every gradient stays finite."""
    case = make_case(20, 16, 40, torch.float32, device, skip=0.0)
    baseline = run(case)
    labels = case.labels.clone()
    labels[4] = 40
    labels[9] = 2**40
    got = run(replace(case, labels=labels))
    rest = torch.ones(20, dtype=torch.bool, device=device)
    rest[[4, 9]] = False
    for i in range(3):
        assert torch.equal(got[i][rest], baseline[i][rest])
    assert torch.equal(got[3][rest], baseline[3][rest]), "dH of other rows unchanged"
    assert all(bool(t.isfinite().all()) for t in got[3:]), "gradients stay finite"


# --- gradient filtering ---


def test_filter_within_its_bound_and_actually_skips(device):
    """Rows sharing one peaked distribution (hidden states near one vector, logits of standard deviation 12) with
    labels in the first tile: most of the 20 vocabulary tiles hold p far below the budget. With ``filter_eps =
    2^-10`` dH and dW stay within the bf16 bounds plus the filter's sound bound, differ from the exact result
    (tiles were skipped), and db is bitwise the exact one (always computed from every tile)."""
    case = make_case(40, 32, 320, torch.bfloat16, device, scale=12.0, seed=5, skip=0.1)
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(1, 32, generator=gen)
    hidden = (base + 0.05 * torch.randn(40, 32, generator=gen)).to(torch.bfloat16).to(device)
    labels = torch.where(case.kept, case.labels % 16, case.labels)
    case = replace(case, hidden=hidden, labels=labels)
    exact = run(case)
    eps = 2.0**-10
    filtered = run(case, filter_eps=eps)
    ref = reference_of(case)
    check_grads(case, ref, *filtered[3:], filter_eps=eps)
    assert not torch.equal(filtered[4], exact[4]), "no tile was skipped: the test would not test the filter"
    assert torch.equal(filtered[5], exact[5]), "db is exact with filtering"
    for i in range(3):
        assert torch.equal(filtered[i], exact[i]), "the forward is not affected"


def test_filter_keeps_every_tile_of_a_flat_distribution(device):
    """Logits of standard deviation 2 (the bench's): every tile holds more than its share of the budget, so the
    filtered gradients are bitwise the exact ones: the rule cannot drop mass spread over many tokens."""
    case = make_case(40, 32, 96, torch.bfloat16, device, scale=2.0, seed=6)
    exact, filtered = run(case), run(case, filter_eps=2.0**-10)
    for a, b in zip(exact[3:], filtered[3:]):
        assert torch.equal(a, b)


# --- property ---


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 40),
    v=st.integers(1, 60),
    dtype=st.sampled_from(DTYPES),
    skip=st.sampled_from([0.0, 0.3, 1.0]),
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    bias=st.booleans(),
    entropy=st.booleans(),
    use_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_float64(n, h, v, dtype, skip, temperature, bias, entropy, use_order, seed):
    device = torch.device("cpu" if INTERPRET else "cuda")
    case = make_case(n, h, v, dtype, device, bias=bias, entropy=entropy, seed=seed, skip=skip, temperature=temperature)
    order = skip_order(case) if use_order else None
    lp, lse2, ent, dh, dw, db = run(case, order=order)
    ref = reference_of(case)
    check_values(case, ref, lp, lse2, ent)
    check_grads(case, ref, dh, dw, db)


# --- plan arithmetic (pure Python) ---


@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("v", [32000, 151936, 262144])
def test_default_plan_takes_the_single_pass_where_its_buffer_is_cheap(n, v):
    """At the bench shapes (H = 4096, bf16, default tiles): the single pass (8 N H V FLOPs instead of 10) exactly when
    its fp32 dH buffer costs at most 1/4 of dW + dH, and then the budget grows by that buffer only; otherwise two
    passes within max(64 MiB, (dW + dH) / 24)."""
    budget = default_scratch_bytes(n, v, 4096, 2, True, True, False)
    p = plan_backward(
        n, v, 4096, 2, need_hidden=True, need_weight=True, need_bias=False, has_order=True, budget=budget,
        block_n=128, block_v=128, h_rows=1024, min_chunk_tiles=4,
    )  # fmt: skip
    outputs = 2 * 4096 * (n + v)
    base = max(64 << 20, outputs // 24)
    buffer = 4 * n * 4096 + 2 * 1024 * 4096  # fp32 dH + one conversion block
    assert p.single_pass == (buffer * SINGLE_PASS_FRACTION <= outputs)
    assert budget == base + buffer * p.single_pass and p.scratch_bytes <= budget
    assert p.w_cols % 128 == 0 and p.w_cols >= 512 and p.w_rows % 128 == 0
    assert p.single_pass or (p.h_rows % 128 == 0 and p.h_cols % 128 == 0 and p.h_rows >= 256)


def test_a_frozen_weight_takes_few_chunks():
    """dH alone (LoRA) at N = 16,384, V = 262,144, fp32: the 64 MiB floor keeps it to a few hundred chunks (the
    former 4 MiB floor / (dH / 24) budget planned 6,272, i.e. 12,546 kernel launches for one backward)."""
    budget = default_scratch_bytes(16384, 262144, 4096, 4, True, False, False)
    p = plan_backward(
        16384, 262144, 4096, 4, need_hidden=True, need_weight=False, need_bias=False, has_order=True,
        budget=budget, block_n=128, block_v=128, h_rows=1024, min_chunk_tiles=4,
    )  # fmt: skip
    chunks = -(-p.n_pad // p.h_rows) * -(-p.v_pad // p.h_cols)
    assert p.pass_h and not p.pass_w and chunks <= 600, (p, chunks)


def test_single_pass_when_an_fp32_dh_buffer_fits():
    kwargs = dict(need_hidden=True, need_weight=True, need_bias=False, has_order=False, block_n=128, block_v=128,
                  h_rows=1024, min_chunk_tiles=4)  # fmt: skip
    assert plan_backward(4096, 151936, 4096, 2, budget=1 << 30, **kwargs).single_pass
    assert not plan_backward(16384, 151936, 4096, 2, budget=64 << 20, **kwargs).single_pass


# --- realistic shapes on a GPU ---


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (not the interpreter)")
class TestOnGpu:
    """V = 151,936, H = 1024, N = 16,384 (N V = 2.5e9 > 2^31: int64 offsets), bf16, default tiles and plan (two
    passes), T = 0.7, 20 % of rows ignored (through ``order``), random g and g_H. The float64 reference is computed
    in row chunks on the GPU; gradients are checked elementwise against the module docstring's bound on every 97th
    row of dH and every 97th column of dW."""

    N, H, V = 16384, 1024, 151936

    @pytest.fixture(scope="class")
    def case(self):
        return make_case(self.N, self.H, self.V, torch.bfloat16, torch.device("cuda"), skip=0.2, seed=7)

    @staticmethod
    def _reference(case: Case, rows: torch.Tensor, cols: torch.Tensor):
        """float64 (logp, H, logit error bound [N], (dH, bound)[rows], (dW, bound)[cols], (db, bound)), row chunks."""
        h, w = case.hidden.double(), case.weight.double()
        b = case.bias.double() if case.bias is not None else torch.zeros(w.shape[0], dtype=F64, device=h.device)
        t, kept, n, v = case.temperature, case.kept, h.shape[0], w.shape[0]
        u = UNIT_ROUNDOFF[case.hidden.dtype]
        lp = torch.zeros(n, dtype=F64, device=h.device)
        ent, d_err = torch.zeros_like(lp), torch.zeros_like(lp)
        d_w = torch.zeros(len(cols), w.shape[1], dtype=F64, device=h.device)
        b_w = torch.zeros_like(d_w)
        d_b, b_b = torch.zeros_like(b), torch.zeros_like(b)
        d_h, b_h = [], []
        for lo in range(0, n, 1024):
            sl = slice(lo, lo + 1024)
            z = (h[sl] @ w.T + b) / t
            m_n = ((h[sl].abs() @ w.abs().T + b.abs()) / t).amax(dim=1)
            d = 4 * (h.shape[1] + 2) * EPS32 * m_n + 2 * VALUE_TOL[0]
            d_err[sl] = d
            log_p = torch.log_softmax(z, dim=1)
            p = log_p.exp()
            y, k = case.labels[sl].clamp_min(0), kept[sl]
            ent_c = -(p * log_p).sum(1)
            lp[sl] = torch.where(k, log_p.gather(1, y[:, None])[:, 0], 0.0)
            ent[sl] = torch.where(k, ent_c, 0.0)
            g, g_h = case.g[sl].double() * k, case.g_h[sl].double() * k
            dz = -(g[:, None] + g_h[:, None] * (log_p + ent_c[:, None])) * p
            dz.scatter_add_(1, y[:, None], g[:, None])
            dz /= t
            mag = (g.abs()[:, None] * p + g_h.abs()[:, None] * p * (log_p.abs() + ent_c.abs()[:, None])) / t
            mag.scatter_add_(1, y[:, None], g.abs()[:, None] / t)
            d_w += dz[:, cols].T @ h[sl]
            b_w += (mag[:, cols] * (u + d[:, None] + (n + 2) * EPS32)).T @ h[sl].abs()
            d_b += dz.sum(0)
            b_b += (mag * (d[:, None] + (n + 2) * EPS32)).sum(0)
            pick = rows[(rows >= lo) & (rows < lo + 1024)] - lo
            d_h.append(dz[pick] @ w)
            b_h.append((mag[pick] * (u + d[pick, None] + (v + 2) * EPS32)) @ w.abs())
        d_h, b_h = torch.cat(d_h), torch.cat(b_h)
        return lp, ent, d_err, (d_h, u * d_h.abs() + b_h), (d_w, u * d_w.abs() + b_w), (d_b, u * d_b.abs() + b_b)

    def test_values_gradients_memory_and_determinism(self, case):
        order = skip_order(case)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = run(case, order=order, fwd={}, bwd={})
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        lp, _, ent, dh, dw, db = got
        outputs = dh.numel() * dh.element_size() + dw.numel() * dw.element_size()
        # The default budget: at this shape the single pass (its fp32 dH buffer is 0.19x of dW + dH), so the
        # scratch is that buffer plus a chunk; + the O(N) and O(V) outputs (log-probs, lse, entropy; db).
        budget = default_scratch_bytes(self.N, self.V, self.H, 2, True, True, True)
        assert budget > outputs / 24, "the single pass is the default here"
        assert peak <= 1.02 * outputs + budget + 12 * self.N + 8 * self.V, (
            f"peak extra memory {peak / 2**20:.1f} MiB > dW + dH + the budget = {(outputs + budget) / 2**20:.1f} MiB"
        )
        again = run(case, order=order, fwd={}, bwd={})
        for a, b, name in zip(got, again, ("logp", "lse2", "H", "dH", "dW", "db")):
            assert torch.equal(a, b), f"{name} is not bitwise reproducible"
        rows = torch.arange(0, self.N, 97, device="cuda")
        cols = torch.arange(0, self.V, 97, device="cuda")
        r_lp, r_ent, d_err, (r_dh, b_dh), (r_dw, b_dw), (r_db, b_db) = self._reference(case, rows, cols)
        tol = VALUE_TOL[0] + d_err + VALUE_TOL[1] * r_lp.abs()
        assert bool(((lp.double() - r_lp).abs() <= tol).all()), "log-probs outside the fp32 bound"
        assert bool(((ent.double() - r_ent).abs() <= tol + VALUE_TOL[1] * r_ent.abs()).all()), "entropy"
        for name, mine, want, bound in (
            ("dH", dh[rows], r_dh, b_dh),
            ("dW", dw[cols], r_dw, b_dw),
            ("db", db, r_db, b_db),
        ):
            err = (mine.double() - want).abs()
            assert bool((err <= bound).all()), f"{name}: error {err.max():.3e} outside the bound"

    def test_a_row_does_not_depend_on_its_batch(self, case):
        full = run(case, fwd={}, bwd={})
        part = replace(case, hidden=case.hidden[:300], labels=case.labels[:300], g=case.g[:300], g_h=case.g_h[:300])
        small = run(part, fwd={}, bwd={})
        for i, name in ((0, "logp"), (1, "lse2"), (2, "H"), (3, "dH")):
            assert torch.equal(full[i][:300], small[i]), f"{name} depends on the batch"

    def _check_subset(self, case, got, *, frozen=False):
        """Values on every row, dH on every 97th row, dW on every 97th column, db: within the float64 bounds."""
        lp, _, ent, dh, dw, db = got
        n, v = case.hidden.shape[0], case.weight.shape[0]
        rows = torch.arange(0, n, 97, device="cuda")
        cols = torch.arange(0, v, 97, device="cuda")
        r_lp, r_ent, d_err, (r_dh, b_dh), (r_dw, b_dw), (r_db, b_db) = self._reference(case, rows, cols)
        tol = VALUE_TOL[0] + d_err + VALUE_TOL[1] * r_lp.abs()
        assert bool(((lp.double() - r_lp).abs() <= tol).all()), "log-probs outside the fp32 bound"
        assert bool(((ent.double() - r_ent).abs() <= tol + VALUE_TOL[1] * r_ent.abs()).all()), "entropy"
        checks = [("dH", dh[rows], r_dh, b_dh)]
        if frozen:
            assert dw is None and db is None, "a frozen weight (and bias) gets no gradient"
        else:
            checks.append(("dW", dw[cols], r_dw, b_dw))
            if case.bias is not None:
                checks.append(("db", db, r_db, b_db))
        for name, mine, want, bound in checks:
            err = (mine.double() - want).abs()
            assert bool((err <= bound).all()), f"{name}: error {err.max():.3e} outside the bound"

    @pytest.mark.parametrize(
        ("dtype", "bias", "frozen"),
        [(torch.float16, False, False), (torch.bfloat16, False, True), (torch.float16, True, True)],
        ids=["fp16-no_bias", "bf16-frozen_weight", "fp16-bias-frozen_weight"],
    )
    def test_production_configs(self, dtype, bias, frozen):
        """The device's own configuration (no tuning passed: `configs.linear_config`) with fp16, without a bias,
        and with a frozen weight (LoRA: only dH asked, the plan's pass H), at N = 4096, H = 1024, V = 151,936."""
        c = make_case(4096, 1024, self.V, dtype, torch.device("cuda"), bias=bias, skip=0.2, seed=11)
        got = run(c, order=skip_order(c), fwd={}, bwd={}, need_weight=not frozen, need_bias=bias and not frozen)
        self._check_subset(c, got, frozen=frozen)

    def test_weight_of_more_than_2_31_elements(self):
        """V H > 2^31 (int64 offsets into W): V = 131,328, H = 16,384, bf16 (4.3 GB), N = 256."""
        gen = torch.Generator(device="cuda").manual_seed(12)
        n, h, v = 256, 16384, 131328

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

        labels = torch.randint(0, v, (n,), generator=gen, device="cuda")
        labels[::5] = -100
        g = torch.randn(n, generator=gen, device="cuda")
        c = Case(randn(n, h), randn(v, h, scale=2 / math.sqrt(h)), randn(v, scale=0.5), labels, g, g.flip(0))
        assert c.weight.numel() > 2**31
        self._check_subset(c, run(c, order=skip_order(c), fwd={}, bwd={}))

    def test_fp32_runs_on_tf32_tensor_cores_when_allowed(self):
        """fp32 at H = 1024: refused without TF32 (the FMA path would spill), TF32 when allowed: within TF32's
        bounds (10-bit mantissa operands: 2^-11 relative per product)."""
        c = make_case(256, 1024, 4096, torch.float32, torch.device("cuda"), seed=8)
        with pytest.raises(configs.NoConfig, match="TF32"):
            run(c, fwd={}, bwd={})
        lp, _, _, dh, dw, _ = run(c, fwd={"allow_tf32": True}, bwd={"allow_tf32": True})
        ref = reference_of(c)
        h, w = c.hidden.cpu().double().abs(), c.weight.cpu().double().abs()
        # Operands rounded to 10 mantissa bits: each product errs by 2^-10 relative, a logit by 2^-10 |h| @ |W|^T / T
        logit_err = 2.0**-10 * (h @ w.T).amax(dim=1) / c.temperature + ref.logit_err
        assert bool(((lp.cpu().double() - ref.logprobs).abs() <= 2 * logit_err + VALUE_TOL[0]).all()), "log-probs"
        a = ref.mag * (2 * logit_err[:, None] + 2.0**-10 + 2.0**-24 * (w.shape[0] + 2))  # dz's error, then the GEMM
        for name, got, want, bound in (("dH", dh, ref.d_hidden, a @ w), ("dW", dw, ref.d_weight, a.T @ h)):
            err = (got.cpu().double() - want).abs()
            assert bool((err <= bound + 2.0**-24 * want.abs()).all()), f"{name}: error {err.max():.3e} (TF32)"

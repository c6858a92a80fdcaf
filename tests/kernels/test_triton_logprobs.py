"""Fused Triton log-prob kernels vs the float64 reference (values and gradients).

Runs under Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by ``make test-kernels`` before triton is
imported) or on a CUDA device. Shapes are small: the interpreter executes every program in Python.
"""

from __future__ import annotations

import os
import warnings

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

from flowloss import reference  # noqa: E402
from flowloss.ops.token_logprobs import triton_token_logprobs  # noqa: E402
from tests.conftest import close  # noqa: E402

# The kernels keep even discarded tl.where branches free of 0 * inf and 0 / 0: numpy (the interpreter) would
# warn about them, so any RuntimeWarning here is an error.
pytestmark = [pytest.mark.triton_interpreter, pytest.mark.filterwarnings("error::RuntimeWarning")]

DEVICE = "cpu" if INTERPRET else "cuda"
F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) of fp32 outputs against the float64 reference on the same (rounded) inputs; accumulation is
# fp32 for every input dtype, so the error does not depend on it.
VALUE_TOL = (2e-5, 2e-6)
# Gradients are stored in the logits' dtype: rounding to 24/8/11 mantissa bits dominates.
GRAD_TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (1e-4, 8e-3), torch.float16: (1e-5, 1e-3)}


def analytic_grad(logits, labels, temperature, g, g_h, vocab_size=None):
    """float64 ``(g (onehot - p) - g_H p (log p + H)) / T``, ``p log p = 0`` at ``p = 0``; 0 on skipped rows.

    Used where autograd through the reference gives NaN (``-inf`` logits make ``0 * -inf`` in the entropy's
    backward); ``test_analytic_gradient_matches_autograd_reference`` checks it against autograd elsewhere.
    """
    n, v = logits.shape
    vocab = v if vocab_size is None else vocab_size
    out = torch.zeros(n, v, dtype=F64)
    for i in range(n):
        y = int(labels[i])
        if y < 0:
            continue
        z = logits[i, :vocab].to(F64) / temperature
        lse = torch.logsumexp(z, 0)
        if lse == float("-inf"):
            out[i, y] = float(g[i]) / temperature
            continue
        log_p = z - lse
        p = log_p.exp()
        plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
        h = -plogp.sum()
        onehot = torch.zeros(vocab, dtype=F64)
        onehot[y] = 1.0
        term_h = torch.where(p > 0, p * (log_p + h), torch.zeros_like(p))
        out[i, :vocab] = (float(g[i]) * (onehot - p) - float(g_h[i]) * term_h) / temperature
    return out


def make_logits(n, v, dtype, *, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen, dtype=torch.float32) * scale).to(dtype)


def make_labels(n, v, dtype=torch.int64, *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, (n,), generator=gen).to(dtype)


def run_kernel(logits, labels, *, seed=2, **kwargs):
    """Forward + backward with random upstream gradients; returns (logprobs, entropy, dlogits, g, g_h)."""
    x = logits.detach().clone().to(DEVICE).requires_grad_(True)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    lp, ent = triton_token_logprobs(x, labels.to(DEVICE), return_entropy=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(lp.shape, generator=gen)
    g_h = torch.randn(lp.shape, generator=gen)
    torch.autograd.backward([lp, ent], [g.to(DEVICE), g_h.to(DEVICE)])
    return lp.cpu(), ent.cpu(), x.grad.cpu(), g, g_h


def run_reference(logits, labels, g, g_h, *, temperature=1.0, ignore_index=-100, mask=None):
    eff = labels.to(torch.int64)
    if mask is not None:
        eff = torch.where(mask.bool(), eff, torch.full_like(eff, ignore_index))
    x = logits.detach().to(F64).requires_grad_(True)
    lp, ent = reference.token_logprobs(x, eff, temperature=temperature, ignore_index=ignore_index)
    (lp * g.to(F64) + ent * g_h.to(F64)).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def check_against_reference(logits, labels, *, temperature=1.0, mask=None, ignore_index=-100, **kwargs):
    lp, ent, grad, g, g_h = run_kernel(
        logits, labels, temperature=temperature, mask=mask, ignore_index=ignore_index, **kwargs
    )
    r_lp, r_ent, r_grad = run_reference(
        logits, labels, g, g_h, temperature=temperature, ignore_index=ignore_index, mask=mask
    )
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert grad.dtype == logits.dtype
    close(lp, r_lp, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="logprob = z_y - logsumexp(z)")
    close(ent, r_ent, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="entropy = -sum p log p")
    atol, rtol = GRAD_TOL[logits.dtype]
    close(grad, r_grad, atol=atol, rtol=rtol, what="dlogits = (g (onehot - p) - g_H p (log p + H)) / T")
    return lp, ent, grad


# --- values and gradients against the float64 reference ---


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_small_vocab(dtype, vocab, temperature):
    logits = make_logits(5, vocab, dtype)
    labels = make_labels(5, vocab)
    lp, ent, _ = check_against_reference(logits, labels, temperature=temperature)
    if vocab == 1:  # the documented V = 1 result: 0 up to the fast exp2/log2 rounding (2^-21)
        assert bool((lp.abs() <= 2.0**-21).all()) and bool((ent.abs() <= 2.0**-21).all()), (lp, ent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_large_odd_vocab(dtype):
    """V = 32003: eight 4096-column blocks, the last one partial (online max/LSE/entropy across blocks)."""
    logits = make_logits(2, 32003, dtype, scale=4.0)
    logits[0, 31000] = 30.0  # the running maximum jumps in the last block
    labels = torch.tensor([31000, 17])
    check_against_reference(logits, labels, temperature=1.3)


@pytest.mark.parametrize("block_v", [16, 64])
def test_many_small_blocks(block_v):
    """The online rescale across many blocks, with the row maximum at the start, middle and end."""
    logits = make_logits(3, 203, torch.float32, scale=5.0)
    logits[0, 0] = 40.0
    logits[1, 101] = 40.0
    logits[2, 202] = 40.0
    check_against_reference(logits, make_labels(3, 203), temperature=0.9, block_v=block_v)


def test_analytic_gradient_matches_autograd_reference():
    """The float64 analytic gradient used for the -inf tests agrees with autograd through the reference."""
    logits = make_logits(4, 50, torch.float32)
    labels = make_labels(4, 50)
    labels[1] = -100
    g, g_h = torch.randn(4), torch.randn(4)
    _, _, r_grad = run_reference(logits, labels, g, g_h, temperature=0.8)
    close(analytic_grad(logits, labels, 0.8, g, g_h), r_grad, atol=1e-12, rtol=1e-10, what="analytic dlogits")


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_label_dtypes_give_identical_results(label_dtype):
    logits = make_logits(4, 300, torch.float32)
    labels = make_labels(4, 300)
    lp64, ent64, grad64, _, _ = run_kernel(logits, labels)
    lp, ent, grad, _, _ = run_kernel(logits, labels.to(label_dtype))
    assert torch.equal(lp, lp64) and torch.equal(ent, ent64) and torch.equal(grad, grad64)


def test_only_one_output_receives_a_gradient():
    """Upstream gradient on the log-prob only, then on the entropy only (the other is None in backward)."""
    logits = make_logits(3, 40, torch.float32)
    labels = make_labels(3, 40)
    g = torch.randn(3)
    for which in ("logprob", "entropy"):
        x = logits.clone().to(DEVICE).requires_grad_(True)
        lp, ent = triton_token_logprobs(x, labels.to(DEVICE), temperature=1.5, return_entropy=True)
        out = lp if which == "logprob" else ent
        (out * g.to(DEVICE)).sum().backward()
        zeros = torch.zeros(3)
        expected = analytic_grad(
            logits, labels, 1.5, g if which == "logprob" else zeros, g if which != "logprob" else zeros
        )
        close(x.grad.cpu(), expected, atol=2e-6, rtol=2e-5, what=f"dlogits from d{which} only")


def test_without_entropy():
    logits = make_logits(3, 100, torch.bfloat16)
    labels = make_labels(3, 100)
    x = logits.clone().to(DEVICE).requires_grad_(True)
    lp, ent = triton_token_logprobs(x, labels.to(DEVICE), temperature=0.6)
    assert ent is None
    g = torch.randn(3)
    (lp * g.to(DEVICE)).sum().backward()
    r_lp, _, r_grad = run_reference(logits, labels, g, torch.zeros(3), temperature=0.6)
    close(lp.cpu(), r_lp, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="logprob without entropy")
    atol, rtol = GRAD_TOL[torch.bfloat16]
    close(x.grad.cpu(), r_grad, atol=atol, rtol=rtol, what="dlogits without entropy")


def test_raw_launchers_forward_and_backward():
    """``flowloss.kernels`` launchers: lse2 = logsumexp(z) / ln 2; in-place backward = out-of-place."""
    from flowloss import kernels

    logits = make_logits(3, 77, torch.float32).to(DEVICE)
    labels = torch.tensor([5, -1, 76], device=DEVICE)  # negative label = skipped row
    lp, lse2, ent = kernels.logprob_forward(logits, labels, temperature=0.5, with_entropy=True, block_v=32)
    z = logits.cpu().double() / 0.5
    expected = torch.logsumexp(z, dim=1) / torch.log(torch.tensor(2.0, dtype=F64))
    close(lse2.cpu()[[0, 2]], expected[[0, 2]], atol=1e-5, rtol=1e-6, what="lse2 = logsumexp(z) / ln 2")
    assert lp[1] == 0 and lse2[1] == 0 and ent[1] == 0, "skipped row: zeros"
    g = torch.randn(3, device=DEVICE)
    out = kernels.logprob_backward(logits, labels, lse2, g, temperature=0.5, block_v=32)
    buf = logits.clone()
    same = kernels.logprob_backward(buf, labels, lse2, g, temperature=0.5, block_v=32, inplace=True)
    assert same.data_ptr() == buf.data_ptr() and torch.equal(same, out)
    expected_grad = analytic_grad(logits.cpu(), labels.cpu(), 0.5, g.cpu(), torch.zeros(3))
    close(out.cpu(), expected_grad, atol=2e-6, rtol=2e-5, what="launcher dlogits = g (onehot - p) / T")


# --- skipped rows ---


def test_ignored_and_masked_rows_are_zero_and_never_read():
    logits = make_logits(6, 90, torch.float32)
    labels = make_labels(6, 90)
    labels[1] = -100
    labels[4] = 12345  # out of range, but the row is masked out: allowed, never used
    mask = torch.tensor([True, True, False, True, False, True])
    r_lp, r_ent, r_grad = None, None, None
    poisoned = logits.clone()
    poisoned[[1, 2, 4]] = float("nan")  # a skipped row's logits are not read: NaN there cannot leak
    lp, ent, grad, g, g_h = run_kernel(poisoned, labels, mask=mask, temperature=1.2)
    r_lp, r_ent, r_grad = run_reference(logits, labels.clamp_max(89), g, g_h, temperature=1.2, mask=mask)
    for row in (1, 2, 4):
        assert lp[row] == 0 and ent[row] == 0, f"skipped row {row}: logprob and entropy must be 0"
        assert bool((grad[row] == 0).all()), f"skipped row {row}: gradient must be exactly 0"
    close(lp, r_lp, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="logprob with skipped rows")
    close(ent, r_ent, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="entropy with skipped rows")
    close(grad, r_grad, atol=2e-6, rtol=2e-5, what="dlogits with skipped rows")


def test_custom_ignore_index_and_mask_as_ints():
    logits = make_logits(4, 20, torch.float16)
    labels = torch.tensor([3, 7, 3, 19], dtype=torch.int32)
    mask = torch.tensor([1, 1, 1, 0])
    lp, _, grad = check_against_reference(logits, labels, ignore_index=7, mask=mask)
    assert lp[1] == 0 and lp[3] == 0 and bool((grad[[1, 3]] == 0).all())


def test_empty_batch():
    x = torch.zeros(0, 11, device=DEVICE, requires_grad=True)
    lp, ent = triton_token_logprobs(x, torch.zeros(0, dtype=torch.int64, device=DEVICE), return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 11)


# --- extreme values, -inf, padded vocabulary ---


def test_extreme_logits_are_finite():
    """Logits of +-1e4 (fp32): the kernel rounds u = x log2(e) / T to fp32, an error of ~1.5 ulp(|u|) in
    u - lse2, i.e. a relative error of 1.5 ulp(|u|) ln 2 in p (1e-3 at |u| = 1.6e4). dlogits then err by
    |g| p eps_p / T for the logprob term and |g_H| p (|log p + H| + 1) eps_p / T for the entropy term: the
    tolerance below is that bound, element by element, with a factor 4 on the ulp count (u, the running
    maximum, lse2 and the fast exp2/log2 each round once)."""
    logits = make_logits(4, 300, torch.float32)
    logits[0, :150] = 1e4
    logits[1, 10] = 1e4
    logits[1, 11] = -1e4
    logits[2] = -1e4
    logits[3, ::2] = 1e4
    logits[3, 1::2] = -1e4
    labels = torch.tensor([3, 11, 0, 1])
    lp, ent, grad, g, g_h = run_kernel(logits, labels, temperature=0.9)
    r_lp, r_ent, r_grad = run_reference(logits, labels, g, g_h, temperature=0.9)
    assert bool(lp.isfinite().all() and ent.isfinite().all() and grad.isfinite().all())
    close(lp, r_lp, atol=1e-7 * 1e4 / 0.9 * 4, rtol=1e-6, what="logprob at +-1e4")
    close(ent, r_ent, atol=1e-4, rtol=1e-5, what="entropy at +-1e4 (computed relative to the running max)")
    z = logits.double() / 0.9
    ulp_u = 2.0 ** (torch.floor(torch.log2(z.abs().amax() * 1.4426950408889634)) - 23)
    eps_p = 4 * 1.5 * float(ulp_u) * 0.6931471805599453
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    p = log_p.exp()
    h = -(p * log_p).sum(dim=1, keepdim=True)
    bound = (g.double().abs()[:, None] + g_h.double().abs()[:, None] * ((log_p + h).abs() + 1)) * p * eps_p / 0.9
    assert bool(((grad.double() - r_grad).abs() <= bound + 1e-6).all()), "dlogits at +-1e4 beyond the fp32 bound"


def test_neg_inf_entries_and_all_neg_inf_blocks():
    """-inf columns (padded vocab): whole -inf blocks before the first finite one must not give NaN."""
    logits = make_logits(4, 64, torch.bfloat16)
    logits[:, :20] = float("-inf")  # blocks 0 (and part of 1) of 16 columns are all -inf
    logits[1, 40:] = float("-inf")
    logits[2, 30] = float("-inf")
    logits[3] = float("-inf")  # every logit -inf
    labels = torch.tensor([25, 33, 30, 5])  # row 2's label has logit -inf; row 3 has nothing finite
    lp, ent, grad, g, g_h = run_kernel(logits, labels, temperature=1.1, block_v=16)
    r_lp, r_ent, _ = run_reference(logits, labels, g, g_h, temperature=1.1)
    assert lp[2] == float("-inf"), "a label whose logit is -inf has log-prob -inf"
    assert lp[3] == float("-inf") and ent[3] == 0, "an all -inf row: log-prob -inf, entropy 0"
    close(lp[:3], r_lp[:3], atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="logprob with -inf entries")
    close(ent[:3], r_ent[:3], atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="entropy with -inf entries")
    assert bool(grad.isfinite().all()), "dlogits must be finite with -inf logits"
    atol, rtol = GRAD_TOL[torch.bfloat16]
    expected = analytic_grad(logits, labels, 1.1, g, g_h)
    close(grad, expected, atol=atol, rtol=rtol, what="dlogits with -inf entries (0 at -inf columns)")


def test_vocab_size_treats_padded_columns_as_neg_inf():
    logits = make_logits(3, 50, torch.float32)
    padded = torch.cat([logits, torch.full((3, 14), 1e3)], dim=1)  # padding that would dominate if read
    padded[1, 55] = float("nan")
    labels = make_labels(3, 50)
    lp, ent, grad, g, g_h = run_kernel(padded, labels, vocab_size=50, block_v=16)
    r_lp, r_ent, r_grad = run_reference(logits, labels, g, g_h)
    close(lp, r_lp, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="logprob over the first vocab_size columns")
    close(ent, r_ent, atol=VALUE_TOL[0], rtol=VALUE_TOL[1], what="entropy over the first vocab_size columns")
    close(grad[:, :50], r_grad, atol=2e-6, rtol=2e-5, what="dlogits over the first vocab_size columns")
    assert bool((grad[:, 50:] == 0).all()), "padded columns get a zero gradient"
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, V=50\)"):
        triton_token_logprobs(
            padded.to(DEVICE), torch.tensor([0, 55, 1], device=DEVICE), vocab_size=50, strict=True
        )
    lp, _ = triton_token_logprobs(padded.to(DEVICE), torch.tensor([0, 55, 1], device=DEVICE), vocab_size=50)
    assert lp[1].isnan() and lp[[0, 2]].isfinite().all(), "a label in the padding: NaN, never read"


# --- layouts and in-place backward ---


def test_row_strided_and_transposed_logits():
    base = make_logits(4, 70, torch.float32)
    labels = make_labels(4, 57)
    strided = base[:, 3:60]  # row stride 70, last-dim stride 1: used as is
    assert strided.stride() == (70, 1)
    check_against_reference(strided, labels, temperature=0.8)
    transposed = make_logits(57, 4, torch.float32).t()  # last-dim stride != 1: copied first
    check_against_reference(transposed, labels, temperature=0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_same_gradient_same_buffer(dtype):
    logits = make_logits(4, 300, dtype)
    labels = make_labels(4, 300)
    labels[2] = -100
    _, _, expected, g, g_h = run_kernel(logits, labels, temperature=0.7)

    x = logits.clone().to(DEVICE)
    leaf = x.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf whose buffer the backward may overwrite
    version = work._version
    lp, ent = triton_token_logprobs(
        work, labels.to(DEVICE), temperature=0.7, return_entropy=True, inplace_backward=True
    )
    (grad,) = torch.autograd.grad([lp, ent], [work], [g.to(DEVICE), g_h.to(DEVICE)])
    assert grad.data_ptr() == work.data_ptr(), "in-place backward must reuse the logits buffer"
    assert grad.dtype == dtype and torch.equal(grad.cpu(), expected), "in-place gradient == out-of-place"
    assert work._version > version, "the overwritten logits are marked modified for autograd"


def test_inplace_backward_refuses_a_second_backward():
    """After the in-place backward the logits hold their gradient: reusing them must raise, not mislead."""
    leaf = make_logits(3, 20, torch.float32).to(DEVICE).requires_grad_(True)
    lp, _ = triton_token_logprobs(leaf * 1.0, torch.tensor([1, 2, 3], device=DEVICE), inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        lp.sum().backward()


def test_inplace_backward_on_row_strided_view():
    big = make_logits(3, 40, torch.float32)
    view = big[:, :33].clone().to(DEVICE)
    labels = make_labels(3, 33)
    _, _, expected, g, g_h = run_kernel(view, labels)
    leaf = big.clone().to(DEVICE).requires_grad_(True)
    holder = leaf * 1.0
    sub = holder[:, :33]  # row stride 40, last-dim stride 1
    lp, ent = triton_token_logprobs(sub, labels.to(DEVICE), return_entropy=True, inplace_backward=True)
    (grad,) = torch.autograd.grad([lp, ent], [sub], [g.to(DEVICE), g_h.to(DEVICE)])
    assert grad.data_ptr() == sub.data_ptr()
    assert torch.equal(holder[:, :33].detach().cpu(), expected), "gradient written into the strided rows"
    assert torch.equal(holder[:, 33:].detach().cpu(), big[:, 33:]), "columns outside the view untouched"


# --- invariants ---


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 4),
    v=st.integers(1, 70),
    shift=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_batch_independent_and_shift_invariant(n, v, shift, seed, temperature):
    """A row's result does not depend on the other rows (bitwise), and log-probs are invariant to z + c."""
    logits = make_logits(n + 1, v, torch.float32, seed=seed)
    labels = make_labels(n + 1, v, seed=seed + 1)
    lp_all, ent_all = triton_token_logprobs(
        logits.to(DEVICE), labels.to(DEVICE), temperature=temperature, return_entropy=True, block_v=16
    )
    lp_one, ent_one = triton_token_logprobs(
        logits[-1:].to(DEVICE),
        labels[-1:].to(DEVICE),
        temperature=temperature,
        return_entropy=True,
        block_v=16,
    )
    assert torch.equal(lp_all[-1:], lp_one) and torch.equal(ent_all[-1:], ent_one), "depends on batch"
    lp_shift, ent_shift = triton_token_logprobs(
        (logits + shift).to(DEVICE),
        labels.to(DEVICE),
        temperature=temperature,
        return_entropy=True,
        block_v=16,
    )
    tol = 4e-6 * (1 + abs(shift) / temperature)
    close(lp_shift, lp_all, atol=tol, rtol=1e-5, what="log softmax(z + c) = log softmax(z)")
    close(ent_shift, ent_all, atol=tol, rtol=1e-5, what="H(z + c) = H(z)")
    every_label, _ = triton_token_logprobs(
        logits[:1].expand(v, v).to(DEVICE),
        torch.arange(v, device=DEVICE),
        temperature=temperature,
        block_v=16,
    )
    mass = torch.logsumexp(every_label.cpu().double(), dim=0, keepdim=True)
    close(mass, torch.zeros(1), atol=1e-5, rtol=0, what="log sum_y p(y) = 0")


# --- bad input ---


def _call(logits=None, labels=None, **kwargs):
    logits = torch.zeros(3, 5, device=DEVICE) if logits is None else logits
    labels = torch.zeros(3, dtype=torch.int64, device=DEVICE) if labels is None else labels
    return triton_token_logprobs(logits, labels, **kwargs)


def _zeros(*shape, dtype=torch.float32):
    return lambda: torch.zeros(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": _zeros(15)}, ValueError, r"`logits` must be \[N, V\], or \[B, T, V\]"),
        ({"logits": _zeros(3, 5, dtype=torch.float64)}, TypeError, "logits.*float32, bfloat16 or float16"),
        ({"logits": _zeros(3, 5, dtype=torch.int64)}, TypeError, "logits"),
        ({"logits": _zeros(3, 0)}, ValueError, "logits.*at least one"),
        ({"logits": lambda: [[0.0] * 5] * 3}, TypeError, "logits.*torch.Tensor"),
        ({"labels": _zeros(3)}, TypeError, "labels.*int32 or int64"),
        ({"labels": _zeros(4, dtype=torch.int64)}, ValueError, "labels.*one entry per row"),
        ({"labels": _zeros(3, 1, dtype=torch.int64)}, ValueError, "labels.*1-D"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": 1e-45}, ValueError, "temperature"),  # rounds to 0 in fp32: refused, not NaN
        ({"temperature": True}, ValueError, "temperature"),
        ({"temperature": lambda: torch.tensor(1.0)}, ValueError, "temperature"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"ignore_index": 2**70}, ValueError, "ignore_index.*int64"),
        ({"mask": lambda: torch.ones(4, dtype=torch.bool, device=DEVICE)}, ValueError, "mask"),
        ({"vocab_size": 6}, ValueError, "vocab_size"),
        ({"vocab_size": 0}, ValueError, "vocab_size"),
        ({"block_v": 100}, ValueError, "block_v"),
        (
            {"logits": lambda: torch.zeros(1, 5, device=DEVICE).expand(3, 5), "inplace_backward": True},
            ValueError,
            "inplace_backward",
        ),
    ],
)
def test_bad_input_is_refused(kwargs, error, match):
    kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        _call(**kwargs)


# Value checks (they read device memory): strict mode raises with the position; the default gives NaN.
@pytest.mark.parametrize(
    ("labels", "match"),
    [([0, 5, 1], r"labels.*\[0, V=5\).*labels\[1\] = 5"), ([0, -3, 1], r"labels\[1\] = -3")],
)
def test_out_of_range_labels_are_nan_or_refused_in_strict_mode(labels, match):
    labels = torch.tensor(labels, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        _call(labels=labels, strict=True)
    lp, _ = _call(labels=labels)
    assert lp[1].isnan() and lp[[0, 2]].isfinite().all()


def test_mask_values_are_checked_in_strict_mode_only():
    mask = torch.full((3,), 2, device=DEVICE)
    with pytest.raises(ValueError, match="`mask` must hold only 0/1"):
        _call(mask=mask, strict=True)
    lp, _ = _call(mask=mask)  # default: read as mask != 0
    assert lp.isfinite().all()


def test_out_of_range_label_on_ignored_row_is_allowed():
    lp, _ = _call(labels=torch.tensor([0, -100, 4], device=DEVICE))
    assert lp[1] == 0


def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        _call(logits=torch.zeros(3, 5), labels=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_logit_propagates_nan_and_all_neg_inf_row_is_dead(bad):
    """A NaN/+inf logit on a kept row gives NaN (not a silent -inf or 0 entropy); an all -inf row is a dead
    row (-inf, entropy 0); the other rows are untouched. Same convention as the chunked path."""
    logits = make_logits(3, 50, torch.float32)
    logits[0, 7] = bad
    logits[2] = float("-inf")
    labels = make_labels(3, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logp, entropy = triton_token_logprobs(logits.to(DEVICE), labels.to(DEVICE), return_entropy=True)
    logp, entropy = logp.cpu(), entropy.cpu()
    assert torch.isnan(logp[0]) and torch.isnan(entropy[0])
    assert logp[2].item() == float("-inf") and entropy[2].item() == 0.0
    expected, expected_entropy = reference.token_logprobs(logits[1:2], labels[1:2])
    close(logp[1:2], expected, atol=1e-5, rtol=1e-5, what="untouched row")
    close(entropy[1:2], expected_entropy, atol=1e-5, rtol=1e-5, what="untouched row entropy")

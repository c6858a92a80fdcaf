"""``token_logprobs`` (chunked CPU path and dispatch) vs the float64 reference ``flowloss.reference``.

Formulas under test, per row ``n`` with ``s = float(z_n) / T``, ``p = softmax(s)``::

    logp_n = s[y_n] - logsumexp(s)          d logp_n / d z = (onehot(y_n) - p) / T
    H_n    = -sum_v p_v log p_v              d H_n / d z    = -p (log p + H_n) / T

Skipped positions (``ignore_index`` or ``mask == 0``) give 0 and a zero gradient.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowloss import reference, trajectory_balance_loss
from flowloss.bench.memory import peak_extra_bytes
from flowloss.ops.chunked import DEFAULT_CHUNK_BYTES, default_chunk_rows
from flowloss.ops.dispatch import resolve_impl
from flowloss.ops.token_logprobs import token_logprobs
from tests.conftest import close, op_node

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------------------
# helpers (also used by test_fused_linear.py)


def value_tol(dtype: torch.dtype, zmax: float) -> tuple[float, float]:
    """(atol, rtol) of log-probs/entropies vs float64: fp32 accumulation errs by ~eps * max|z/T| absolute."""
    if dtype == F64:
        return 1e-10 * max(1.0, zmax), 1e-10
    return 2e-5 + 8 * EPS32 * zmax, 2e-6


def grad_tol(dtype: torch.dtype, zmax: float, gmax: float) -> tuple[float, float]:
    """Gradients are stored in the input dtype: its rounding (rtol) plus the fp32 error in p (atol)."""
    scale = max(1.0, gmax)
    if dtype == F64:
        return 1e-10 * scale * max(1.0, zmax), 1e-10
    atol = (2e-6 + 8 * EPS32 * zmax) * scale
    rtol = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    return atol, rtol


def reference_with_grads(logits, labels, valid, temperature, g_logp, g_entropy):
    """float64 reference log-probs, entropies and ``d(sum g*logp + g_H*H)/dlogits`` on flat inputs.

    Gradients come from autograd through ``flowloss.reference.token_logprobs``. With ``-inf`` logits the
    reference's entropy gradient is NaN for the whole row (``0 * -inf`` in the ``where`` branch it discards),
    so there the entropy term is the closed form ``-g_H p (log p + H) / T`` in float64 (limit 0 where
    ``p = 0``); the log-prob term still comes from autograd.
    """
    x = logits.detach().reshape(-1, logits.shape[-1]).to(F64).requires_grad_()
    y = torch.where(valid, labels.reshape(-1), torch.full_like(labels.reshape(-1), -100))
    logp, entropy = reference.token_logprobs(x, y, temperature=temperature, ignore_index=-100)
    has_neg_inf = bool(x.isneginf().any())
    total = (logp * g_logp.to(F64)).sum()
    if not has_neg_inf:
        total = total + (entropy * g_entropy.to(F64)).sum()
    if total.requires_grad:  # False when every row is skipped
        total.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    if has_neg_inf:
        s = x.detach() / temperature
        log_p = s - torch.logsumexp(s, dim=-1, keepdim=True)
        p = log_p.exp()
        term = torch.where(p > 0, p * (log_p + entropy.detach()[:, None]), torch.zeros_like(p))
        term = -g_entropy.to(F64)[:, None] * term / temperature
        grad = grad + torch.where(valid[:, None], term, torch.zeros_like(term))
    return logp.detach(), entropy.detach(), grad


# ----------------------------------------------------------------------------------------------------------
# hypothesis: values and gradients against the reference


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([F64, torch.float32, torch.bfloat16]))
    flat = draw(st.booleans())
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    vocab = draw(st.sampled_from([1, 2, 7, 33, 130]))
    scale = draw(st.sampled_from([1.0, 10.0, 100.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen, dtype=F64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    ignored = torch.rand(batch, length, generator=gen) < draw(st.sampled_from([0.0, 0.3]))
    labels[ignored] = -100
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, length, generator=gen) < 0.7
    if flat:
        logits, labels = logits.reshape(-1, vocab), labels.reshape(-1)
        mask = mask.reshape(-1) if mask is not None else None
    return dict(
        logits=logits,
        labels=labels,
        mask=mask,
        temperature=draw(st.sampled_from([1.0, 0.6, 1.7])),
        chunk_size=draw(st.sampled_from([None, 1, 2, 5])),
        return_entropy=draw(st.booleans()),
        gen=gen,
    )


def run_and_compare(logits, labels, mask, temperature, chunk_size, return_entropy, gen, impl="chunked"):
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    out = token_logprobs(
        x,
        labels,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
        impl=impl,
    )
    logp, entropy = out if return_entropy else (out, None)
    assert logp.shape == labels.shape
    assert logp.dtype == (F64 if dtype == F64 else torch.float32), "log-probs are fp32 (fp64 for fp64 logits)"
    g_logp = torch.randn(labels.shape, generator=gen, dtype=F64).to(logp.dtype)
    g_ent = torch.randn(labels.shape, generator=gen, dtype=F64).to(logp.dtype)
    loss = (logp * g_logp).sum()
    if entropy is not None:
        loss = loss + (entropy * g_ent).sum()
    loss.backward()
    valid = labels != -100
    if mask is not None:
        valid = valid & mask
    valid = valid.reshape(-1)
    ref_logp, ref_ent, ref_grad = reference_with_grads(
        logits,
        labels,
        valid,
        temperature,
        g_logp.reshape(-1),
        g_ent.reshape(-1) if entropy is not None else torch.zeros(valid.shape[0], dtype=F64),
    )
    zmax = float(logits.to(F64).abs().max()) / temperature if logits.numel() else 0.0
    atol, rtol = value_tol(dtype, zmax)
    close(logp.reshape(-1), ref_logp, atol=atol, rtol=rtol, what="logp = s[y] - logsumexp(s)")
    if entropy is not None:
        close(entropy.reshape(-1), ref_ent, atol=atol * 4, rtol=rtol, what="H = -sum p log p")
    assert x.grad.dtype == dtype, "dlogits come back in the logits' dtype"
    atol, rtol = grad_tol(dtype, zmax, 1.0 / temperature * 4)
    close(
        x.grad.reshape(ref_grad.shape),
        ref_grad,
        atol=atol,
        rtol=rtol,
        what="dlogits = [g (onehot - p) - g_H p (log p + H)] / T",
    )
    # skipped positions: exactly 0 and zero gradient
    assert bool((logp.reshape(-1)[~valid] == 0).all())
    assert bool((x.grad.reshape(-1, logits.shape[-1])[~valid] == 0).all())


@given(problems())
def test_chunked_matches_float64_reference(problem):
    run_and_compare(**problem)


@given(problems())
def test_result_does_not_depend_on_chunk_size(problem):
    """Each row is reduced on its own: block boundaries (batch composition) do not change any bit."""
    logits, labels = problem["logits"], problem["labels"]
    kw = dict(temperature=problem["temperature"], mask=problem["mask"], return_entropy=True, impl="chunked")
    a_lp, a_h = token_logprobs(logits, labels, chunk_size=1, **kw)
    b_lp, b_h = token_logprobs(logits, labels, chunk_size=10**6, **kw)
    assert torch.equal(a_lp, b_lp) and torch.equal(a_h, b_h)


@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_odd_vocabulary_sizes(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 3, vocab, generator=gen, dtype=F64) * 4).to(dtype)
    labels = torch.randint(0, vocab, (2, 3), generator=gen)
    labels[1, 0] = -100
    run_and_compare(logits, labels, None, 0.8, None, True, gen)


def test_vocab_one_is_certain():
    """V = 1: the only token has probability 1: log-prob 0, entropy 0, zero gradient."""
    x = torch.randn(4, 1, requires_grad=True)
    logp, h = token_logprobs(x, torch.zeros(4, dtype=torch.long), return_entropy=True)
    (logp.sum() + h.sum()).backward()
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(h, torch.zeros(4))
    assert torch.equal(x.grad, torch.zeros(4, 1))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_extreme_logits_and_neg_inf_entries(dtype):
    """±1e4 logits and -inf entries (padded vocabulary columns): finite where the math is finite."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen, dtype=F64) * 3
    logits[0, :] = 0.0
    logits[0, 10] = 1e4
    logits[1, 5] = -1e4
    logits[1, 6] = 1e4
    logits[2, 40:] = float("-inf")  # padded columns
    logits[3, :49] = float("-inf")  # a single finite entry: probability 1
    logits[4, 7] = float("-inf")  # the label itself has probability 0: log-prob -inf
    labels = torch.tensor([10, 5, 3, 49, 7, 0])
    logits = logits.to(dtype)
    run_and_compare(logits, labels, None, 1.0, 2, True, gen)
    run_and_compare(logits, labels, None, 0.6, None, True, gen)
    logp, h = token_logprobs(logits, labels, return_entropy=True)
    assert logp[4].item() == float("-inf") and bool(logp[:4].isfinite().all())
    assert h[3].item() == 0.0 and logp[3].item() == 0.0
    assert bool(h.isfinite().all())


def test_skipped_rows_may_hold_garbage():
    """Masked/ignored rows may be all -inf or NaN: they give 0 and a zero gradient; other rows are intact."""
    logits = torch.randn(4, 9)
    logits[1] = float("-inf")
    logits[2] = float("nan")
    x = logits.clone().requires_grad_()
    labels = torch.tensor([1, 2, 99, 4])  # 99 is out of range but masked
    mask = torch.tensor([True, True, False, True])
    labels[1] = -100
    logp, h = token_logprobs(x, labels, mask=mask, return_entropy=True, chunk_size=3)
    (logp.sum() + h.sum()).backward()
    assert bool(logp.isfinite().all()) and bool(h.isfinite().all()) and bool(x.grad.isfinite().all())
    assert logp[1] == 0 and logp[2] == 0 and h[1] == 0 and h[2] == 0
    assert torch.equal(x.grad[1:3], torch.zeros(2, 9))
    expected = torch.log_softmax(logits[[0, 3]], -1)[[0, 1], [1, 4]]
    close(logp[[0, 3]], expected, atol=1e-6, rtol=1e-6, what="kept rows unaffected by skipped rows")


def test_empty_input():
    x = torch.randn(0, 5, requires_grad=True)
    logp, h = token_logprobs(x, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == (0,) and h.shape == (0,)
    logp.sum().backward()
    assert x.grad.shape == (0, 5)


def test_gradcheck_float64_chunked():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4), generator=gen)
    labels[0, 1] = -100
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)

    def fn(z):
        return token_logprobs(z, labels, temperature=0.7, mask=mask, return_entropy=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (x,))  # first order only: double backward is not supported

    def entropy_only(z):
        return token_logprobs(z, labels, temperature=1.3, return_entropy=True, chunk_size=2)[1]

    assert torch.autograd.gradcheck(entropy_only, (x,))

    def logp_only_non_viewable(z):  # a [B, T+1, V] -> [:, :-1] slice cannot be flattened without a copy
        return token_logprobs(z[:, :-1], labels[:, :-1], chunk_size=2)

    assert torch.autograd.gradcheck(logp_only_non_viewable, (x,))


def test_non_viewable_slice_is_not_copied_and_matches():
    """``logits[:, :-1]`` of a contiguous ``[B, T+1, V]`` tensor: blocks stay inside each sequence."""
    big = torch.randn(3, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    g = torch.randn(3, 5)
    logp = token_logprobs(big[:, :-1], labels, chunk_size=2, temperature=0.9)
    saved_logits = op_node(logp).saved_tensors[0]
    assert saved_logits.data_ptr() == big.data_ptr() and saved_logits.stride() == big[:, :-1].stride()  # no copy
    (logp * g).sum().backward()
    ours = big.grad.clone()
    big.grad = None
    naive = torch.log_softmax(big[:, :-1].double() / 0.9, -1).gather(-1, labels[..., None]).squeeze(-1)
    (naive * g).sum().backward()
    close(ours, big.grad, atol=1e-6, rtol=1e-5, what="dlogits through a strided slice")


def test_saved_state_is_o_of_n():
    """Forward keeps the logits by reference (no copy) plus O(N) vectors: nothing else of size N x V."""
    x = torch.randn(8, 300, requires_grad=True)
    logp, _ = token_logprobs(x, torch.randint(0, 300, (8,)), return_entropy=True, impl="chunked")
    saved = op_node(logp).saved_tensors
    assert saved[0].data_ptr() == x.data_ptr()
    assert all(t.numel() <= 8 for t in saved[1:])


def test_inplace_backward_matches_and_reuses_the_logits_storage():
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(5, 17)
    hidden = torch.randn(2, 4, 5, generator=gen)
    labels = torch.randint(0, 17, (2, 4), generator=gen)
    grads = []
    for inplace in (False, True):
        head.zero_grad()
        logits = head(hidden)
        storage = []
        logits.register_hook(lambda grad, seen=storage: seen.append(grad.data_ptr()))
        logp, h = token_logprobs(logits, labels, return_entropy=True, temperature=0.7, inplace_backward=inplace)
        (logp.sum() + 0.3 * h.sum()).backward()
        grads.append((head.weight.grad.clone(), head.bias.grad.clone()))
        # in place, dlogits is written into the logits' own storage: no second [N, V] buffer
        assert (storage[0] == logits.data_ptr()) == inplace
    for a, b in zip(grads[0], grads[1]):
        close(b, a, atol=1e-6, rtol=1e-6, what="inplace_backward gives the same parameter gradients")


def test_inplace_backward_is_refused_when_the_logits_are_needed_elsewhere():
    """Autograd's version counter catches a second consumer that saved the logits for its backward."""
    x = torch.randn(3, 7, requires_grad=True)
    logits = x * 2.0
    other = (logits**2).sum()  # pow saves `logits`
    logp = token_logprobs(logits, torch.tensor([1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        (logp.sum() + other).backward()


def test_default_chunk_size_is_set_by_bytes():
    assert default_chunk_rows(151936) == DEFAULT_CHUNK_BYTES // (151936 * 4)
    assert default_chunk_rows(10**9) == 1  # never less than one row
    assert default_chunk_rows(1) == DEFAULT_CHUNK_BYTES // 4


def test_reference_impl_matches_chunked():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 9, generator=gen)
    labels = torch.randint(0, 9, (2, 3), generator=gen)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    a = token_logprobs(logits, labels, mask=mask, impl="reference", return_entropy=True, temperature=0.5)
    b = token_logprobs(logits, labels, mask=mask, impl="chunked", return_entropy=True, temperature=0.5)
    for u, v in zip(a, b):
        assert u.dtype == torch.float32
        close(v, u, atol=2e-6, rtol=2e-6, what="impl='reference' == impl='chunked'")


def test_auto_dispatch_on_cpu_is_chunked():
    assert resolve_impl("auto", torch.zeros(2, 3)) == "chunked"
    assert resolve_impl("auto", torch.zeros(2, 3, dtype=F64)) == "chunked"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs Triton on CPU")
def test_triton_on_cpu_without_interpreter_is_refused():
    with pytest.raises(ValueError, match=r"impl='triton'.*CUDA"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), impl="triton")


# ----------------------------------------------------------------------------------------------------------
# bad input: one test per class of error


def test_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"`logits` must be a torch\.Tensor"):
        token_logprobs([[0.0]], torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"`labels` must be a torch\.Tensor"):
        token_logprobs(torch.zeros(1, 2), [0])


def test_rejects_bad_dtypes():
    with pytest.raises(TypeError, match=r"`logits` must be a floating-point.*int64"):
        token_logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"`labels` must be an int32 or int64.*float32"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"`logits` must be \[B, T, V\].*\(2, 3, 5\).*\(2, 4\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`logits` must be"):
        token_logprobs(torch.zeros(5), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match=r"V >= 1"):
        token_logprobs(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`mask` must have the same shape"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), mask=torch.ones(3) > 0)


def test_labels_out_of_range_give_nan_or_are_refused_in_strict_mode():
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, V=3\).*got 3 at position \(1,\)"):
        token_logprobs(torch.zeros(2, 3), torch.tensor([0, 3]), strict=True)
    with pytest.raises(ValueError, match=r"got -1"):
        token_logprobs(torch.zeros(2, 3), torch.tensor([-1, 0]), strict=True)
    # default: NaN for the bad row (never read out of bounds, no host synchronisation), others intact
    x = torch.zeros(3, 3, requires_grad=True)
    logp, h = token_logprobs(x, torch.tensor([0, 3, -5]), return_entropy=True)
    assert logp[0].item() == pytest.approx(-math.log(3)) and logp[1:].isnan().all() and h[1:].isnan().all()
    logp[0].backward()
    assert torch.equal(x.grad[1:], torch.zeros(2, 3))
    # ignored (ignore_index) and masked positions may hold anything
    out = token_logprobs(torch.zeros(3, 3), torch.tensor([-100, 7, 1]), mask=torch.tensor([1, 0, 1]))
    assert out[0] == 0 and out[1] == 0
    out = token_logprobs(torch.zeros(2, 3), torch.tensor([-1, 1]), ignore_index=-1)
    assert out[0] == 0


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=temperature)


def test_rejects_bad_options():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`impl` must be one of"):
        token_logprobs(x, y, impl="cuda")
    with pytest.raises(ValueError, match=r"`chunk_size` must be None or an int >= 1"):
        token_logprobs(x, y, chunk_size=0)
    with pytest.raises(TypeError, match=r"`ignore_index` must be an int"):
        token_logprobs(x, y, ignore_index=-100.0)
    with pytest.raises(ValueError, match=r"`mask` must hold only 0/1"):
        token_logprobs(x, y, mask=torch.tensor([0.5, 1.0]), strict=True)


def test_rejects_device_mismatch():
    with pytest.raises(ValueError, match=r"`labels` is on meta but `logits` is on cpu"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long, device="meta"))


# ----------------------------------------------------------------------------------------------------------
# end to end: tiny linear model -> token_logprobs -> trajectory_balance_loss -> backward


def test_end_to_end_trajectory_balance_gradients_match_float64_pipeline():
    gen = torch.Generator().manual_seed(11)
    batch, length, width, vocab = 3, 5, 8, 29
    head = torch.nn.Linear(width, vocab)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen))
        head.bias.copy_(torch.randn(vocab, generator=gen))
    hidden = torch.randn(batch, length, width, generator=gen)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ref_logprobs = -torch.rand(batch, length, generator=gen) * 3
    rewards = torch.randn(batch, generator=gen)
    log_z = torch.randn(batch, generator=gen, requires_grad=True)
    temperature = 0.6

    logits = head(hidden)
    logprobs = token_logprobs(logits, labels, mask=mask, temperature=temperature)
    loss = trajectory_balance_loss(logprobs, ref_logprobs, rewards, log_z, mask)
    loss.backward()

    w64 = head.weight.detach().double().requires_grad_()
    b64 = head.bias.detach().double().requires_grad_()
    z64 = log_z.detach().double().requires_grad_()
    logits64 = hidden.double() @ w64.T + b64
    lp64, _ = reference.token_logprobs(
        logits64.reshape(-1, vocab), torch.where(mask, labels, -100).reshape(-1), temperature=temperature
    )
    loss64 = reference.trajectory_balance_loss(lp64.reshape(batch, length), ref_logprobs, rewards, z64, mask)
    loss64.backward()
    close(loss, loss64, atol=1e-4, rtol=1e-5, what="TB loss through token_logprobs")
    scale = float(w64.grad.abs().max())
    close(head.weight.grad, w64.grad, atol=2e-5 * scale, rtol=1e-4, what="dL/dW through token_logprobs")
    close(head.bias.grad, b64.grad, atol=2e-5 * scale, rtol=1e-4, what="dL/db through token_logprobs")
    close(log_z.grad, z64.grad, atol=1e-5, rtol=1e-5, what="dL/dlogZ")


# ----------------------------------------------------------------------------------------------------------
# memory: the chunked path's extra peak is one block, not O(N V); the naive path's is O(N V)


def _extra_peak_bytes(mode: str, n: int, vocab: int) -> int:
    """Peak extra tensor bytes of one call, from the CPU allocator's running total (``torch.profiler`` memory
    events, see ``flowloss.bench.memory``): deterministic, unlike process RSS, which malloc's reuse of freed
    pages can hide entirely."""
    gen = torch.Generator().manual_seed(0)
    # logits from a linear head (the realistic case: its backward needs `hidden` and `weight`, not the logits)
    hidden = torch.randn(n, 16, generator=gen)
    weight = torch.randn(vocab, 16, generator=gen, requires_grad=mode.endswith("bwd"))
    x = hidden @ weight.T
    y, g = torch.randint(0, vocab, (n,), generator=gen), torch.randn(n, generator=gen)

    def run():
        if mode.startswith("naive"):
            lp = torch.log_softmax(x.float(), -1).gather(-1, y[:, None]).squeeze(-1)
        else:
            lp = token_logprobs(x, y, impl="chunked", inplace_backward=mode.startswith("inplace"))
        if mode.endswith("bwd"):
            lp.backward(g)

    peak, method = peak_extra_bytes(run, device=torch.device("cpu"))
    assert peak is not None, method
    return peak


def test_chunked_extra_memory_is_bounded_by_a_block_not_by_n_times_v():
    n, vocab = 1024, 32000
    logits_bytes = n * vocab * 4  # 131 MB
    # A block's fp32 working set (a few block-sized temporaries), O(N) vectors and allocator slack.
    bound = 6 * DEFAULT_CHUNK_BYTES + 16 * 2**20  # 40 MiB, under a third of the logits
    chunked_fwd = _extra_peak_bytes("chunked_fwd", n, vocab)
    inplace_fwd_bwd = _extra_peak_bytes("inplace_fwd_bwd", n, vocab)
    chunked_fwd_bwd = _extra_peak_bytes("chunked_fwd_bwd", n, vocab)
    naive_fwd = _extra_peak_bytes("naive_fwd", n, vocab)
    naive_fwd_bwd = _extra_peak_bytes("naive_fwd_bwd", n, vocab)
    mib = {
        "chunked fwd": chunked_fwd,
        "inplace fwd+bwd": inplace_fwd_bwd,
        "chunked fwd+bwd": chunked_fwd_bwd,
        "naive fwd": naive_fwd,
        "naive fwd+bwd": naive_fwd_bwd,
        "logits": logits_bytes,
        "bound": bound,
    }
    report = "extra peak MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in mib.items())
    # forward: a block vs the whole fp32 log-softmax
    assert chunked_fwd <= bound, report
    assert naive_fwd > bound, report
    # forward + backward: dlogits (one [N, V] buffer) + a block; in place: a block (+ the head's [V, 16] grad)
    assert inplace_fwd_bwd <= bound, report
    assert chunked_fwd_bwd <= logits_bytes + bound, report
    assert naive_fwd_bwd > logits_bytes + bound, report


# ----------------------------------------------------------------------------------------------------------
# impl="triton" (runs in the TRITON_INTERPRET=1 process: `make test-kernels`)


@pytest.mark.triton_interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37), (5, 130)])
def test_triton_impl_matches_reference(dtype, shape):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or CUDA")
    pytest.importorskip("triton")
    pytest.importorskip("flowloss.ops.triton_logprobs")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(*shape, generator=gen, dtype=F64) * 5).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels.reshape(-1)[1] = -100
    mask = torch.rand(shape[:-1], generator=gen) < 0.8
    x = logits.to(device).clone().requires_grad_()
    logp, h = token_logprobs(
        x, labels.to(device), mask=mask.to(device), temperature=0.7, return_entropy=True, impl="triton"
    )
    assert logp.shape == labels.shape and logp.dtype == torch.float32
    g1 = torch.randn(labels.shape, generator=gen)
    g2 = torch.randn(labels.shape, generator=gen)
    ((logp.cpu() * g1).sum() + (h.cpu() * g2).sum()).backward()
    valid = ((labels != -100) & mask).reshape(-1)
    ref_logp, ref_h, ref_grad = reference_with_grads(logits, labels, valid, 0.7, g1.reshape(-1), g2.reshape(-1))
    zmax = float(logits.double().abs().max()) / 0.7
    atol, rtol = value_tol(dtype, zmax)
    close(logp.cpu().reshape(-1), ref_logp, atol=atol, rtol=rtol, what="triton logp")
    close(h.cpu().reshape(-1), ref_h, atol=4 * atol, rtol=rtol, what="triton entropy")
    atol, rtol = grad_tol(dtype, zmax, 6.0)
    close(x.grad.cpu().reshape(ref_grad.shape), ref_grad, atol=atol, rtol=rtol, what="triton dlogits")


@pytest.mark.parametrize("want_entropy", [False, True])
def test_kept_row_of_all_neg_inf_logits_matches_the_triton_convention(want_entropy):
    """A kept row with no finite logit has no distribution: log-prob -inf, entropy 0, gradient g/T on the label
    only (what the Triton kernel returns), while the other rows are untouched."""
    logits = torch.randn(3, 6, dtype=torch.float32)
    logits[1] = float("-inf")
    logits.requires_grad_(True)
    labels = torch.tensor([2, 4, 0])
    out = token_logprobs(logits, labels, temperature=0.5, return_entropy=want_entropy, impl="chunked")
    logp, entropy = out if want_entropy else (out, None)
    assert logp[1].item() == float("-inf")
    if entropy is not None:
        assert entropy[1].item() == 0.0
    expected, _ = reference.token_logprobs(logits.detach()[[0, 2]], labels[[0, 2]], temperature=0.5)
    torch.testing.assert_close(logp[[0, 2]].double(), expected, rtol=1e-5, atol=1e-5)
    g = torch.tensor([0.3, -1.5, 0.7])
    torch.autograd.backward(logp, g)
    assert torch.isfinite(logits.grad).all()
    row = torch.zeros(6)
    row[4] = -1.5 / 0.5
    torch.testing.assert_close(logits.grad[1], row)


@given(flags=st.lists(st.booleans(), max_size=40), rows=st.integers(1, 8))
def test_row_segments_tile_the_rows_and_skip_only_long_ignored_runs(flags, rows):
    """Blocks cover every row once, in order; a block marked skipped holds only ignored rows, and every
    ignored run of at least max(1, rows // 2) rows is skipped (so long padding is never read)."""
    from flowloss.ops._rows import row_blocks

    n = len(flags)
    blocks = list(row_blocks(torch.Size([n, 5]), True, rows, flags))
    assert [b[0] for b in blocks] == sorted(b[0] for b in blocks)
    covered = [r for lo, hi, _, _ in blocks for r in range(lo, hi)]
    assert covered == list(range(n))
    skipped = {r for lo, hi, _, kept in blocks if not kept for r in range(lo, hi)}
    assert all(not flags[r] for r in skipped)
    assert all(hi - lo <= rows for lo, hi, _, kept in blocks if kept)
    k, i = max(1, rows // 2), 0
    while i < n:
        j = i
        while j < n and not flags[j]:
            j += 1
        if j - i >= k:
            assert set(range(i, j)) <= skipped
        i = j + 1 if j == i else j


def test_row_blocks_of_a_non_flattenable_view_stay_inside_each_sequence():
    """logits[:, :-1] of a [B, T+1, V] tensor cannot be flattened: blocks are (b, slice) of one sequence."""
    from flowloss.ops._rows import row_blocks

    valid = torch.tensor([1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)  # B=3, T=4
    blocks = list(row_blocks(torch.Size([3, 4, 7]), False, 4, valid.tolist()))
    for lo, hi, (b, sl), _ in blocks:
        assert lo // 4 == b == (hi - 1) // 4 and (sl.start, sl.stop) == (lo - 4 * b, hi - 4 * b)
    assert [(lo, hi, kept) for lo, hi, _, kept in blocks] == [
        (0, 2, True),
        (2, 4, False),
        (4, 7, False),
        (7, 8, True),
        (8, 12, True),
    ]
    logits = torch.randn(3, 5, 7)[:, :-1]
    labels = torch.randint(0, 7, (3, 4))
    out = token_logprobs(logits, labels, mask=valid.reshape(3, 4), impl="chunked")
    expected, _ = reference.token_logprobs(logits.reshape(-1, 7), torch.where(valid, labels.reshape(-1), -100))
    torch.testing.assert_close(out.reshape(-1).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_logit_on_a_kept_row_propagates_nan(bad):
    """The 0 log 0 = 0 rule applies only where p = 0: a NaN/+inf logit gives NaN log-prob and entropy, never a
    finite-looking value, and the other rows are untouched."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = bad
    logits.requires_grad_(True)
    labels = torch.tensor([1, 2, 3])
    logp, entropy = token_logprobs(logits, labels, return_entropy=True, impl="chunked")
    assert torch.isnan(logp[0]) and torch.isnan(entropy[0])
    (entropy * torch.tensor([1.0, 1.0, 0.0])).sum().backward()
    assert torch.isnan(logits.grad[0]).any()
    assert torch.isfinite(logits.grad[1:]).all()
    expected, _ = reference.token_logprobs(logits.detach()[1:], labels[1:])
    torch.testing.assert_close(logp[1:].detach().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_reads_a_non_viewable_slice_in_place_per_sequence(inplace):
    """``logits[:, :-1]`` of a ``[B, T+1, V]`` tensor goes to the kernels without a copy (one launch per
    sequence): the saved tensor is the original storage, and values/gradients equal the chunked path's."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or CUDA")
    pytest.importorskip("flowloss.ops.triton_logprobs")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # every tensor on the device under test
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 6, 37, generator=gen).to(device)
    labels = torch.randint(0, 37, (3, 5), generator=gen).to(device)
    labels[1, 2] = -100
    g = torch.randn(3, 5, generator=gen).to(device)
    results = {}
    for impl in ("triton", "chunked"):
        leaf = full.clone().requires_grad_(True)
        base = leaf * 1.0  # a non-leaf, so that the in-place backward may overwrite it
        logp, entropy = token_logprobs(
            base[:, :-1],
            labels,
            impl=impl,
            temperature=0.8,
            return_entropy=True,
            inplace_backward=inplace and impl == "triton",
        )
        if impl == "triton":
            assert op_node(logp).saved_tensors[0].data_ptr() == base.data_ptr()  # the slice itself, not a copy
        ((logp * g).sum() + 0.3 * entropy.sum()).backward()
        results[impl] = (logp.detach(), entropy.detach(), leaf.grad)
    for a, b, what in zip(results["triton"], results["chunked"], ("log-probs", "entropy", "dlogits")):
        close(a, b, atol=1e-5, rtol=1e-5, what=f"triton vs chunked on a strided slice: {what}")


@pytest.mark.parametrize("layout", ["flat", "slice"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_chunked_vocab_size_ignores_the_padded_columns_forward_and_backward(layout, inplace):
    """``vocab_size=V`` on real tensors: log-probs and entropies are those of the first V columns (float64
    reference on ``logits[..., :V]``), ``dlogits[..., :V]`` is their gradient and the padded columns get exactly
    0. The padding holds large logits (+40): a path that reads or normalises over the wrong column count gives
    log-probs ~40 off and a gradient ~1 in the padded columns. Blocks of 3 rows cross row and sequence ends."""
    gen = torch.Generator().manual_seed(31)
    vocab, padded, temperature = 37, 48, 0.8
    full = torch.randn(4, 6, padded, generator=gen, dtype=torch.float64) * 2
    full[..., vocab:] = 40.0
    x = (full[:, :-1] if layout == "slice" else full.reshape(-1, padded)).float()
    labels = torch.randint(0, vocab, x.shape[:-1], generator=gen)
    labels.view(-1)[::4] = -100
    g = torch.randn(labels.shape, generator=gen)
    g_h = torch.randn(labels.shape, generator=gen)
    leaf = x.detach().clone().requires_grad_()
    inp = leaf * 1.0 if inplace else leaf  # in place: a non-leaf the backward may overwrite
    lp, ent = token_logprobs(inp, labels, temperature=temperature, return_entropy=True, impl="chunked",
                             chunk_size=3, vocab_size=vocab, inplace_backward=inplace)  # fmt: skip
    (grad,) = torch.autograd.grad([lp, ent], [leaf], [g, g_h])
    valid = labels.reshape(-1) != -100
    r_lp, r_ent, r_grad = reference_with_grads(
        x[..., :vocab], labels, valid, temperature, torch.where(valid, g.reshape(-1), 0.0),
        torch.where(valid, g_h.reshape(-1), 0.0),
    )  # fmt: skip
    atol, rtol = value_tol(torch.float32, 8.0)
    close(lp.reshape(-1), torch.where(valid, r_lp, 0.0), atol=atol, rtol=rtol, what="logp over V columns")
    close(ent.reshape(-1), torch.where(valid, r_ent, 0.0), atol=atol, rtol=rtol, what="entropy over V columns")
    grad = grad.reshape(-1, padded)
    atol, rtol = grad_tol(torch.float32, 8.0, 4.0)
    close(grad[:, :vocab], r_grad, atol=atol, rtol=rtol, what="dlogits over the first V columns")
    assert bool((grad[:, vocab:] == 0).all()), "padded columns must get a zero gradient"

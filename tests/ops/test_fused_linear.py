"""``token_logprobs_from_hidden`` vs ``logits = hidden @ W^T (+ b)`` followed by the float64 reference.

Formula under test: ``logp = log softmax((h W^T + b) / T)[y]`` (and the entropy), with gradients
``dh = dz W``, ``dW = dz^T h``, ``db = sum dz`` where ``dz`` is the log-softmax/entropy gradient.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowloss import reference, trajectory_balance_loss
from flowloss.ops.chunked import default_fused_chunk_rows
from flowloss.ops.fused_linear import token_logprobs_from_hidden
from flowloss.ops.token_logprobs import token_logprobs
from tests.conftest import close, op_node

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def reference_pipeline(hidden, weight, bias, labels, valid, temperature, g_logp, g_entropy):
    """float64: logits = h W^T + b, then flowloss.reference.token_logprobs; returns values and grads."""
    h = hidden.detach().to(F64).reshape(-1, hidden.shape[-1]).requires_grad_()
    w = weight.detach().to(F64).requires_grad_()
    b = bias.detach().to(F64).requires_grad_() if bias is not None else None
    logits = h @ w.T + (b if b is not None else 0.0)
    y = torch.where(valid, labels.reshape(-1), torch.full_like(labels.reshape(-1), -100))
    logp, entropy = reference.token_logprobs(logits, y, temperature=temperature, ignore_index=-100)
    total = (logp * g_logp.to(F64)).sum() + (entropy * g_entropy.to(F64)).sum()
    if total.requires_grad:
        total.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (h, w)]
    grads.append(None if b is None else (b.grad if b.grad is not None else torch.zeros_like(b)))
    return logp.detach(), entropy.detach(), float(logits.detach().abs().amax()), grads


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([F64, torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    lead = draw(st.sampled_from([(5,), (2, 3), (1, 1), (3, 4)]))
    width, vocab = draw(st.integers(1, 9)), draw(st.sampled_from([1, 3, 17, 64]))
    hidden = torch.randn(*lead, width, generator=gen, dtype=F64).to(dtype)
    weight = torch.randn(vocab, width, generator=gen, dtype=F64).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=F64).to(dtype) if draw(st.booleans()) else None
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < 0.2] = -100
    mask = (torch.rand(lead, generator=gen) < 0.8) if draw(st.booleans()) else None
    return dict(
        hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, gen=gen,
        temperature=draw(st.sampled_from([1.0, 0.6, 1.5])),
        chunk_size=draw(st.sampled_from([None, 1, 2, 5])),
        return_entropy=draw(st.booleans()),
    )


def check_against_reference(
    hidden, weight, bias, labels, mask, gen, temperature, chunk_size, return_entropy, impl="auto", device="cpu"
):
    dtype = hidden.dtype
    h = hidden.clone().to(device).requires_grad_()
    w = weight.clone().to(device).requires_grad_()
    b = bias.clone().to(device).requires_grad_() if bias is not None else None
    out = token_logprobs_from_hidden(
        h, w, labels.to(device), temperature=temperature, chunk_size=chunk_size,
        mask=mask.to(device) if mask is not None else None, return_entropy=return_entropy, bias=b, impl=impl,
    )
    logp, entropy = out if return_entropy else (out, None)
    assert logp.shape == labels.shape and logp.dtype == (F64 if dtype == F64 else torch.float32)
    g1 = torch.randn(labels.shape, generator=gen, dtype=F64).to(logp.dtype).to(device)
    g2 = torch.randn(labels.shape, generator=gen, dtype=F64).to(logp.dtype).to(device)
    loss = (logp * g1).sum() + ((entropy * g2).sum() if entropy is not None else 0.0)
    loss.backward()
    valid = labels != -100
    if mask is not None:
        valid = valid & mask
    valid = valid.reshape(-1)
    g2_ref = g2.reshape(-1) if entropy is not None else torch.zeros(valid.shape[0], dtype=F64)
    ref_logp, ref_ent, zmax, (gh, gw, gb) = reference_pipeline(
        hidden, weight, bias, labels, valid, temperature, g1.reshape(-1).cpu(), g2_ref.cpu()
    )
    zmax /= temperature
    if dtype == F64:
        atol, rtol = 1e-10 * max(1.0, zmax), 1e-10
    else:  # fp32 matmul + fp32 log-softmax: error ~ eps * (|h| |W| summed over H) ~ eps * zmax * sqrt(H)
        atol, rtol = 2e-5 + 32 * EPS32 * zmax, 1e-5
    close(logp.reshape(-1), ref_logp, atol=atol, rtol=rtol, what="logp = log softmax((h W^T + b)/T)[y]")
    if entropy is not None:
        close(entropy.reshape(-1), ref_ent, atol=4 * atol, rtol=rtol, what="H of softmax((h W^T + b)/T)")
    grad_rtol = {F64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    for name, ours, ref in (("dh = dz W", h.grad, gh), ("dW = dz^T h", w.grad, gw), ("db = sum dz", None, gb)):
        if name.startswith("db"):
            if b is None:
                continue
            ours = b.grad
        assert ours.dtype == dtype, f"{name}: gradient comes back in the parameter's dtype"
        scale = float(ref.abs().amax()) + 1.0
        close(ours.reshape(ref.shape), ref, atol=(atol + grad_rtol) * scale * 0.1, rtol=grad_rtol, what=name)


@given(problems())
def test_fused_linear_matches_float64_reference(problem):
    check_against_reference(**problem)


@pytest.mark.triton_interpreter
@settings(max_examples=12, deadline=None, derandomize=True)
@given(problems())
def test_triton_impl_through_the_public_op_matches_float64_reference(problem):
    """impl='triton' (the fused Triton kernels, the CUDA default) through the custom op and its autograd."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or CUDA")
    if problem["hidden"].dtype == F64:
        problem = {**problem, "hidden": problem["hidden"].float(), "weight": problem["weight"].float(),
                   "bias": None if problem["bias"] is None else problem["bias"].float()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_against_reference(**problem, impl="triton", device=device)


@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_fused_linear_odd_vocabulary(vocab):
    gen = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(2, 3, 8, generator=gen)
    weight = torch.randn(vocab, 8, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (2, 3), generator=gen)
    check_against_reference(hidden, weight, None, labels, None, gen, 0.8, 4, True)


def test_fused_linear_equals_token_logprobs_on_the_logits():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 4, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen)
    labels = torch.randint(0, 50, (3, 4), generator=gen)
    mask = torch.rand(3, 4, generator=gen) < 0.7
    a = token_logprobs_from_hidden(hidden, weight, labels, mask=mask, temperature=0.7, return_entropy=True)
    b = token_logprobs(hidden @ weight.T, labels, mask=mask, temperature=0.7, return_entropy=True)
    for u, v in zip(a, b):
        close(u, v, atol=1e-5, rtol=1e-5, what="fused == lm_head then token_logprobs")


def test_gradcheck_float64_fused_linear():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 3, 5, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(9, 5, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 3), generator=gen)
    labels[1, 2] = -100
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)

    def fn(h, w, b):
        return token_logprobs_from_hidden(
            h, w, labels, mask=mask, bias=b, temperature=0.7, chunk_size=2, return_entropy=True
        )

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_saved_state_has_no_logits():
    """Forward keeps hidden, W (by reference) and O(N) vectors; no [N, V] tensor."""
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(100, 4, requires_grad=True)
    logp = token_logprobs_from_hidden(hidden, weight, torch.randint(0, 100, (6,)))
    saved = [t for t in op_node(logp).saved_tensors if t is not None]
    assert any(t.data_ptr() == weight.data_ptr() for t in saved)
    assert all(t.numel() <= max(hidden.numel(), weight.numel()) for t in saved)
    assert not any(t.shape == (6, 100) for t in saved)


def test_only_requested_gradients_are_computed():
    hidden = torch.randn(4, 3)
    weight = torch.randn(11, 3, requires_grad=True)
    token_logprobs_from_hidden(hidden, weight, torch.randint(0, 11, (4,))).sum().backward()
    assert weight.grad is not None and hidden.grad is None


def test_default_chunk_rows():
    assert default_fused_chunk_rows(151936) == 64  # the matmul floor at large V
    assert default_fused_chunk_rows(32000) == 32 * 2**20 // (4 * 32000)
    assert default_fused_chunk_rows(151936, "cuda") == 512 * 2**20 // (4 * 151936)  # GPU: larger GEMMs


def test_end_to_end_trajectory_balance_through_fused_head():
    gen = torch.Generator().manual_seed(9)
    batch, length, width, vocab = 2, 4, 6, 23
    hidden = torch.randn(batch, length, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ref_lp = -torch.rand(batch, length, generator=gen)
    rewards, log_z = torch.randn(batch, generator=gen), torch.randn(batch, generator=gen)
    logp = token_logprobs_from_hidden(hidden, weight, labels, mask=mask, temperature=0.6, chunk_size=3)
    trajectory_balance_loss(logp, ref_lp, rewards, log_z, mask).backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lp64, _ = reference.token_logprobs(
        (h64 @ w64.T).reshape(-1, vocab), torch.where(mask, labels, -100).reshape(-1), temperature=0.6
    )
    reference.trajectory_balance_loss(lp64.reshape(batch, length), ref_lp, rewards, log_z, mask).backward()
    for name, ours, ref in (("dL/dhidden", hidden.grad, h64.grad), ("dL/dW", weight.grad, w64.grad)):
        scale = float(ref.abs().max()) + 1.0
        close(ours, ref, atol=2e-5 * scale, rtol=1e-4, what=name)


# bad input: one test per class


def test_rejects_bad_types():
    with pytest.raises(TypeError, match=r"`lm_head_weight` must be a torch\.Tensor"):
        token_logprobs_from_hidden(torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="`hidden` must be a floating-point"):
        token_logprobs_from_hidden(torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, 3), torch.zeros(2).long())
    with pytest.raises(TypeError, match="`labels` must be an int32 or int64"):
        token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2))


def test_rejects_bad_shapes():
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`lm_head_weight` must be \[V, H\]"):
        token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(3), y)
    with pytest.raises(ValueError, match=r"`hidden` must be \[\.\.\., H\] with H = lm_head_weight.shape\[1\] = 4"):
        token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(5, 4), y)
    with pytest.raises(ValueError, match="`labels` must have the leading shape of `hidden`"):
        token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`bias` must be \[V\]"):
        token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(5, 3), y, bias=torch.zeros(4))


def test_rejects_bad_values_and_options():
    h, w = torch.zeros(2, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, V=5\)"):
        token_logprobs_from_hidden(h, w, torch.tensor([0, 5]), strict=True)
    assert token_logprobs_from_hidden(h, w, torch.tensor([0, 5]))[1].isnan()  # default: NaN, no host sync
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        token_logprobs_from_hidden(h, w, torch.tensor([0, 1]), temperature=0.0)
    with pytest.raises(ValueError, match="`chunk_size` must be None or an int >= 1"):
        token_logprobs_from_hidden(h, w, torch.tensor([0, 1]), chunk_size=-2)


def test_rejects_device_mismatch():
    with pytest.raises(ValueError, match="`lm_head_weight` is on meta but `hidden` is on cpu"):
        token_logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(5, 3, device="meta"), torch.tensor([0, 1]))


def test_masked_rows_are_compacted_away_with_exact_values_and_gradients():
    """Skipped rows are not projected at all (only kept hidden rows are gathered); values, entropies and the
    gradients for hidden and W still equal the reference, and gradcheck passes through the gather/scatter."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)

    def run(h, w):
        return token_logprobs_from_hidden(h, w, labels, mask=mask, temperature=0.7, return_entropy=True, chunk_size=2)

    assert torch.autograd.gradcheck(run, (hidden, weight))
    logp, entropy = run(hidden, weight)
    expected_logp, expected_entropy = reference.token_logprobs(
        (hidden @ weight.T).reshape(-1, 7), torch.where(mask, labels, -100).reshape(-1), temperature=0.7
    )
    torch.testing.assert_close(logp.reshape(-1), expected_logp)
    torch.testing.assert_close(entropy.reshape(-1), expected_entropy)
    assert not logp[~mask].any() and not entropy[~mask].any()

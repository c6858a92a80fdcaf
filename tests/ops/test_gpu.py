"""The GPU lane (``make test-gpu`` on a CUDA machine; skipped on CPU): realistic shapes, every tensor on the
device, no host synchronisation in a whole FlowRL step, capture of that step in a CUDA graph, every kernel family
on a second device (when there is one) and under ``compute-sanitizer`` (when installed). The fused lm_head's
production configurations and the fused loss's bf16 gradient rounding are checked in ``tests/kernels``.

Tolerances (against float64 on the same rounded inputs): log-probs and entropies are accumulated in fp32, so
their error is a few fp32 ulps of the largest ``|z|`` (``value_tol``); gradients are stored in the logits'
dtype, so the rounding to 24/8/11 mantissa bits dominates (``GRAD_RTOL``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import flowloss
from flowloss import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)"),
]

CUDA = "cuda"
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def value_tol(zmax: float) -> float:
    """A few fp32 ulps of the largest |z| (the log-sum-exp is as exact as the logits it reads)."""
    return 8 * 2.0**-23 * max(1.0, zmax) + 1e-6


def reference_rows(logits, labels, rows, temperature, g, g_h):
    """float64 log-probs, entropies and dlogits of ``rows`` only (the whole batch would not fit in float64)."""
    x = logits.reshape(-1, logits.shape[-1])[rows].to(torch.float64).requires_grad_()
    lp, ent = reference.token_logprobs(x, labels.reshape(-1)[rows], temperature=temperature)
    (lp * g.reshape(-1)[rows].double() + ent * g_h.reshape(-1)[rows].double()).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def some_rows(n, device=CUDA):
    """First, last and a spread of rows in between (those past offset 2**31 elements included)."""
    picks = torch.unique(torch.cat([torch.tensor([0, 1, n // 2, n - 2, n - 1]), torch.linspace(0, n - 1, 27).long()]))
    return picks.to(device)


@pytest.mark.parametrize(
    ("shape", "dtype", "inplace"),
    [
        ((16384, 151936), torch.bfloat16, False),  # N * V > 2**31: int64 row offsets
        ((70000, 1000), torch.float16, True),  # more than 65,535 rows: a 1-D grid
        ((4, 2049, 32000), torch.float32, False),  # [B, T+1, V][:, :-1]: read in place, one launch per row
    ],
    ids=["NV>2^31-bf16", "rows>65535-fp16-inplace", "slice-fp32"],
)
def test_triton_path_at_realistic_shapes(shape, dtype, inplace):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    full = (torch.randn(*shape, device=CUDA, generator=gen) * 4).to(dtype)
    logits = full[:, :-1] if len(shape) == 3 else full
    labels = torch.randint(0, shape[-1], logits.shape[:-1], device=CUDA, generator=gen)
    labels.view(-1)[::5] = -100  # 20 % skipped rows
    x = logits.detach().clone().requires_grad_() if not inplace else (logits.detach().clone().requires_grad_() * 1)
    g = torch.randn(labels.shape, device=CUDA, generator=gen)
    g_h = torch.randn(labels.shape, device=CUDA, generator=gen)
    lp, ent = flowloss.token_logprobs(x, labels, temperature=0.7, return_entropy=True, inplace_backward=inplace)
    (dlogits,) = torch.autograd.grad([lp, ent], [x], [g, g_h])
    if inplace:
        assert dlogits.data_ptr() == x.data_ptr(), "in-place backward: no second [N, V] buffer"
    rows = some_rows(labels.numel())
    kept = labels.reshape(-1)[rows] != -100
    r_lp, r_ent, r_grad = reference_rows(logits.detach(), torch.where(labels == -100, 0, labels), rows, 0.7, g, g_h)
    zmax = float(logits.detach().abs().max().float()) / 0.7
    got_lp, got_ent = lp.reshape(-1)[rows], ent.reshape(-1)[rows]
    torch.testing.assert_close(got_lp[kept].double(), r_lp[kept], atol=value_tol(zmax), rtol=1e-6)
    torch.testing.assert_close(got_ent[kept].double(), r_ent[kept], atol=4 * value_tol(zmax), rtol=1e-5)
    assert bool((got_lp[~kept] == 0).all() and (got_ent[~kept] == 0).all())
    grad_rows = dlogits.reshape(-1, shape[-1])[rows].double()
    torch.testing.assert_close(grad_rows[kept], r_grad[kept], atol=1e-6, rtol=GRAD_RTOL[dtype])
    assert bool((grad_rows[~kept] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_paths_on_cuda_match_float64(dtype):
    """impl='chunked' on CUDA: the logits path, and the lm_head path with half GEMMs (no fp32 copy of W)."""
    gen = torch.Generator(device=CUDA).manual_seed(1)
    hidden = torch.randn(300, 64, device=CUDA, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(5000, 64, device=CUDA, generator=gen) / 8).to(dtype).requires_grad_()
    labels = torch.randint(0, 5000, (300,), device=CUDA, generator=gen)
    labels[::7] = -100
    g = torch.randn(300, device=CUDA, generator=gen)
    lp = flowloss.token_logprobs_from_hidden(hidden, weight, labels, impl="chunked", chunk_size=64)
    dh, dw = torch.autograd.grad(lp, [hidden, weight], g)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    kept = labels != -100
    r_lp = reference.token_logprobs(h64 @ w64.t(), torch.where(kept, labels, -100))[0]
    r_dh, r_dw = torch.autograd.grad((r_lp * g.double()).sum(), [h64, w64])
    # half GEMMs round the logits to the inputs' precision (as naive does): the tolerance is that rounding
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lp.double(), r_lp, atol=atol, rtol=1e-4)
    torch.testing.assert_close(dh.double(), r_dh, atol=atol, rtol=GRAD_RTOL[dtype] * 4)
    torch.testing.assert_close(dw.double(), r_dw, atol=atol, rtol=GRAD_RTOL[dtype] * 8)
    logits = (hidden.detach() @ weight.detach().t()).requires_grad_()
    lp2 = flowloss.token_logprobs(logits, labels, impl="chunked")
    torch.testing.assert_close(lp2, flowloss.token_logprobs(logits, labels, impl="triton"), atol=1e-5, rtol=1e-5)


def _flowrl_step(x, head):
    lp = flowloss.token_logprobs(x["logits"][:, :-1], x["labels"], mask=x["mask"], temperature=0.7)
    lp_h = flowloss.token_logprobs_from_hidden(x["hidden"], x["weight"], x["labels"], mask=x["mask"])
    r_hat = flowloss.group_normalize_rewards(x["rewards"], 4)
    log_z = head(flowloss.pool_prompt_hidden_states(x["hidden"], x["prompt_mask"]))
    loss = flowloss.trajectory_balance_loss(
        lp, x["ref"], r_hat, log_z, x["mask"], old_logprobs=x["old"], normalizer=x["normalizer"]
    )
    return loss + flowloss.trajectory_balance_loss(lp_h, x["ref"], r_hat, log_z, x["mask"])


def _step_inputs(b=8, t=256, v=32000, h=256, dtype=torch.bfloat16):
    gen = torch.Generator(device=CUDA).manual_seed(2)
    mask = torch.rand(b, t, device=CUDA, generator=gen) > 0.2
    return dict(
        logits=torch.randn(b, t + 1, v, device=CUDA, generator=gen).to(dtype).requires_grad_(),
        labels=torch.randint(0, v, (b, t), device=CUDA, generator=gen),
        mask=mask,
        prompt_mask=torch.rand(b, t, device=CUDA, generator=gen) > 0.5,
        hidden=torch.randn(b, t, h, device=CUDA, generator=gen).to(dtype).requires_grad_(),
        weight=(torch.randn(v, h, device=CUDA, generator=gen) / 16).to(dtype).requires_grad_(),
        rewards=torch.randn(b, device=CUDA, generator=gen),
        old=-torch.rand(b, t, device=CUDA, generator=gen),
        ref=-torch.rand(b, t, device=CUDA, generator=gen),
        normalizer=flowloss.count_valid_sequences(mask).float(),
    )


def test_a_full_step_never_synchronises():
    """torch.cuda.set_sync_debug_mode('error') raises on any host synchronisation."""
    x = _step_inputs()
    head = flowloss.LogZHead(256).to(CUDA)
    _flowrl_step(x, head).backward()  # warm-up (Triton compilation, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = _flowrl_step(x, head)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_a_full_step_is_captured_in_a_cuda_graph():
    x = _step_inputs(b=4, t=128, v=8192, h=128)
    head = flowloss.LogZHead(128, dropout=0.0).to(CUDA)
    leaves = [x["logits"], x["hidden"], x["weight"], *head.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            _flowrl_step(x, head).backward()
    torch.cuda.current_stream().wait_stream(side)
    eager = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _flowrl_step(x, head)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip((leaf.grad for leaf in leaves), eager):
        torch.testing.assert_close(got, want)


# --- device placement, the sanitizer ---------------------------------------------------------------------------


def _every_family(device: str, seed: int = 3):
    """The three Triton families forward and backward on ``device`` (impl='triton', small shapes): outputs and
    input gradients, on the host."""
    from flowloss.ops.fused_tb import fused_tb_sequence_terms

    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(64, 3001, generator=gen) * 3).to(torch.bfloat16).to(device).requires_grad_()
    labels = torch.randint(0, 3001, (64,), generator=gen).to(device)
    labels[::5] = -100
    hidden = torch.randn(64, 128, generator=gen).to(torch.bfloat16).to(device).requires_grad_()
    weight = (torch.randn(3001, 128, generator=gen) / 11).to(torch.bfloat16).to(device).requires_grad_()
    lp, ent = flowloss.token_logprobs(logits, labels, return_entropy=True, impl="triton", temperature=0.7)
    lp_h = flowloss.token_logprobs_from_hidden(hidden, weight, labels, impl="triton")
    lp_t = torch.randn(8, 40, generator=gen).to(device).requires_grad_()
    mask = (torch.rand(8, 40, generator=gen) > 0.3).to(device)
    log_z = torch.randn(8, generator=gen).to(device).requires_grad_()
    terms = fused_tb_sequence_terms(
        lp_t, -lp_t.detach().abs(), torch.randn(8, generator=gen).to(device), log_z, mask, lp_t.detach() * 0.9,
        None, mode="sequence_clipped", token_clip_mask=False, length_normalization=True, penalty="squared",
        eps_low=0.2, eps_high=0.28, max_weight=10.0, tis_cap=2.0, linex_alpha=1.0, huber_delta=1.0, beta=15.0,
    )  # fmt: skip
    outs = [lp, ent, lp_h, terms.per_sequence]
    leaves = [logits, hidden, weight, lp_t, log_z]
    grads = torch.autograd.grad([lp.sum() + ent.sum() + lp_h.sum() + terms.per_sequence.sum()], leaves)
    return [t.detach().cpu() for t in (*outs, *grads)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_every_family_runs_on_the_tensors_device_not_the_current_one():
    """Inputs on cuda:1 while cuda:0 is current: the launchers switch to the tensors' device (a kernel launched on
    the current device would read cuda:1's pointers on cuda:0: an illegal address or garbage). Bitwise equal to
    the same run on cuda:0; the current device is left as it was."""
    torch.cuda.set_device(0)
    on_0 = _every_family("cuda:0")
    on_1 = _every_family("cuda:1")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    for a, b in zip(on_0, on_1):
        assert torch.equal(a, b)


_SANITIZED = """
import torch
from tests.ops.test_gpu import _every_family
_every_family("cuda")
torch.cuda.synchronize()
print("ran")
"""


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not installed")
def test_every_family_passes_compute_sanitizer_memcheck():
    """No out-of-bounds or misaligned access in any kernel (skipped rows, a vocabulary of 3001, masked tokens)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", _SANITIZED]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "ran" in out and "ERROR SUMMARY: 0 errors" in out, out[-4000:]

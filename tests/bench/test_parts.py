"""The benchmark's parts: float64 reference, error columns, memory meter, timing summary, token split."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowloss import reference as flref
from flowloss.bench import impls as impls_mod
from flowloss.bench import reference as ref
from flowloss.bench.config import BenchConfig
from flowloss.bench.memory import peak_extra_bytes
from flowloss.bench.runner import run_suite, split_tokens
from flowloss.bench.timing import summarize
from tests.conftest import assert_close

CPU = torch.device("cpu")


def _inputs(n: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    keep = torch.rand(n, generator=g) > 0.3
    labels = torch.where(keep, labels, torch.full_like(labels, -100))
    grad_out = torch.randn(n, generator=g) * keep
    return logits, labels, keep, grad_out


@pytest.mark.parametrize(("n", "v", "t"), [(7, 11, 0.7), (5, 300, 1.3), (1, 2, 1.0)])
def test_chunked_reference_matches_row_loop_reference(n, v, t):
    """log softmax(z / T)[y] of flowloss.reference (row loop) == the block-vectorized float64 reference."""
    logits, labels, keep, grad_out = _inputs(n, v, seed=n * v)
    expected, _ = flref.token_logprobs(logits, labels, temperature=t)
    logp, grad = ref.logprobs_and_grad(logits, labels, keep, grad_out, temperature=t)
    assert_close(logp, expected, dtype=torch.float64, what="logp = log softmax(z/T)[y], 0 at ignored rows")
    # closed form of d/dz sum_n g_n logp_n = g_n (onehot(y_n) - softmax(z_n / T)) / T
    p = torch.softmax(logits.double() / t, dim=-1)
    onehot = torch.nn.functional.one_hot(torch.where(keep, labels, 0), v).double()
    closed = (grad_out.double() * keep)[:, None] * (onehot - p) / t
    assert_close(grad, closed, dtype=torch.float64, what="dlogits = g (onehot - p) / T")


def test_reference_blocks_cover_all_rows(monkeypatch):
    monkeypatch.setattr(ref, "BLOCK_BYTES", 8 * 4 * 13 * 3)  # 3 rows per block at V=13
    logits, labels, keep, grad_out = _inputs(10, 13, seed=1)
    rows = [r for r, _, _ in ref.logprob_blocks(logits, labels, keep, grad_out, temperature=0.7)]
    assert [(r.start, r.stop) for r in rows] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    expected, _ = flref.token_logprobs(logits, labels, temperature=0.7)
    logp, _ = ref.logprobs_and_grad(logits, labels, keep, grad_out, temperature=0.7)
    assert_close(logp, expected, dtype=torch.float64, what="blocked logp == row loop")


def test_error_columns_expose_a_wrong_answer():
    """A log-prob path that forgets the temperature is fast and wrong: the error column must show it."""
    logits, labels, keep, grad_out = _inputs(16, 50, seed=3)
    case = SimpleNamespace(safe_labels=torch.where(keep, labels, 0), keep=keep, temperature=0.7)
    x = logits.clone().requires_grad_(True)
    right = impls_mod.naive_logprobs(x, case)
    right.backward(grad_out)
    err, err_grad = ref.logprob_errors(logits, labels, keep, grad_out, temperature=0.7, logp=right, grad=x.grad)
    assert err < 1e-5 and err_grad < 1e-5
    wrong = torch.where(keep, torch.log_softmax(logits, -1).gather(-1, case.safe_labels[:, None]).squeeze(-1), 0)
    err_wrong, _ = ref.logprob_errors(logits, labels, keep, grad_out, temperature=0.7, logp=wrong, grad=None)
    assert err_wrong > 0.1
    nan = right.detach().clone()
    nan[0] = float("nan")
    assert ref.max_abs_error(nan, right.detach()) != ref.max_abs_error(nan, right.detach())  # NaN propagates


def test_runner_reports_a_wrong_implementation(monkeypatch):
    """End to end through run_suite: an implementation without temperature gets a large error, not a hidden one."""

    def no_temperature(logits, case):
        out = torch.log_softmax(logits.float(), -1).gather(-1, case.safe_labels[:, None]).squeeze(-1)
        return torch.where(case.keep, out, torch.zeros_like(out))

    wrong = impls_mod.Impl("wrong", "logprobs", "test double", lambda d: no_temperature)
    monkeypatch.setattr(impls_mod, "IMPLS", (*impls_mod.IMPLS, wrong))
    config = BenchConfig(ops=("logprobs",), n=(16,), v=(30,), impls=("naive", "wrong"), warmup=0, reps=1)
    (case,) = run_suite(config)
    res = {r["impl"]: r for r in case["results"]}
    assert res["naive"]["max_abs_err"] < 1e-5
    assert res["wrong"]["status"] == "ok" and res["wrong"]["max_abs_err"] > 0.1


def test_runner_records_an_implementation_that_raises(monkeypatch):
    def broken(logits, case):
        raise RuntimeError("kernel exploded\nsecond line")

    bad = impls_mod.Impl("broken", "logprobs", "test double", lambda d: broken)
    monkeypatch.setattr(impls_mod, "IMPLS", (*impls_mod.IMPLS, bad))
    config = BenchConfig(ops=("logprobs",), n=(4,), v=(5,), impls=("naive", "broken"), warmup=0, reps=1)
    (case,) = run_suite(config)
    res = {r["impl"]: r for r in case["results"]}
    assert res["broken"] == {
        "impl": "broken",
        "source": "test double",
        "status": "error",
        "reason": "RuntimeError: kernel exploded",
    }
    assert res["naive"]["status"] == "ok"


def test_shape_beyond_memory_is_skipped_with_the_reason():
    config = BenchConfig(ops=("logprobs",), n=(10**6,), v=(10**7,), impls=("naive",), warmup=0, reps=1)
    (case,) = run_suite(config)
    (r,) = case["results"]
    assert r["status"] == "skipped" and "shape needs about" in r["reason"] and "available on cpu" in r["reason"]


def test_cpu_peak_memory_counts_live_tensors():
    mib = 2**20

    def one_buffer():
        torch.empty(4 * mib, dtype=torch.uint8).fill_(1)

    def two_alive():
        a = torch.empty(4 * mib, dtype=torch.uint8).fill_(1)
        b = torch.empty(4 * mib, dtype=torch.uint8).fill_(1)
        return a, b

    one, method = peak_extra_bytes(one_buffer, device=CPU)
    two, _ = peak_extra_bytes(two_alive, device=CPU)
    assert "profiler" in method
    assert 4 * mib <= one < 4.5 * mib
    assert 8 * mib <= two < 8.5 * mib


def test_naive_logprob_memory_is_three_logits():
    """kernel-notes: naive log_softmax + gather forward + backward holds 3.0x the logits (fp32)."""
    logits, labels, keep, grad_out = _inputs(256, 1000, seed=5)
    x = logits.requires_grad_(True)
    case = SimpleNamespace(safe_labels=torch.where(keep, labels, 0), keep=keep, temperature=0.7)
    peak, _ = peak_extra_bytes(lambda: impls_mod.naive_logprobs(x, case).backward(grad_out), device=CPU)
    assert 2.9 < peak / x.numel() / 4 < 3.2


def test_summarize_quantiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.p20, t.p80, t.reps) == (3.0, pytest.approx(1.8), pytest.approx(4.2), 5)
    with pytest.raises(ValueError, match="samples_ms"):
        summarize([])


@given(st.integers(min_value=1, max_value=10**7))
def test_split_tokens_is_exact(n):
    b, t = split_tokens(n)
    assert b * t == n and 1 <= t <= 1024 and t & (t - 1) == 0
    assert b >= 8 or t == 1
    assert split_tokens(1024) == (8, 128) and split_tokens(16384) == (16, 1024) and split_tokens(24) == (12, 2)


def test_config_defaults_depend_on_device():
    resolved = BenchConfig(device="cpu").resolved()
    assert (resolved.n, resolved.v, resolved.dtypes, resolved.warmup, resolved.reps) == (
        (1024,),
        (32000,),
        ("fp32",),
        1,
        5,
    )
    with pytest.raises(ValueError, match="--impl must be among"):
        run_suite(BenchConfig(impls=("nope",), warmup=0, reps=1))
    with pytest.raises(ValueError, match="--n must be integers >= 1"):
        BenchConfig(n=(0,)).resolved()


def _fake_module(monkeypatch, name: str, **attrs):
    """Install ``name`` (and its parents) as empty modules for the test, with ``attrs`` on the leaf."""
    import types

    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = types.ModuleType(".".join(parts[:i]))
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def _ce_none(logits, target, ignore_index=-100, reduction="none"):
    assert reduction == "none"
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")


def test_cuda_only_adapters_turn_losses_into_temperature_scaled_logprobs(monkeypatch):
    """Liger / flash-attn adapters (wiring only, with stand-in modules of the documented call signatures):
    -loss of logits / T at kept rows, 0 at masked rows, equal to the naive path's log-probs."""
    _fake_module(
        monkeypatch,
        "liger_kernel.transformers.functional",
        liger_cross_entropy=_ce_none,
        liger_fused_linear_cross_entropy=lambda h, w, t, ignore_index=-100, reduction="none": (
            _ce_none(h @ w.T, t, ignore_index, reduction),
            None,
        ),
    )
    _fake_module(
        monkeypatch,
        "flash_attn.ops.triton.cross_entropy",
        cross_entropy_loss=lambda logits, labels: (_ce_none(logits, labels), torch.zeros(len(labels))),
    )
    logits, labels, keep, _ = _inputs(12, 17, seed=9)
    case = SimpleNamespace(labels=labels, safe_labels=torch.where(keep, labels, 0), keep=keep, temperature=0.6)
    expected = impls_mod.naive_logprobs(logits, case)
    for build in (impls_mod._liger, impls_mod._flash_attn):
        assert_close(build(CPU)(logits, case), expected, dtype=torch.float32, what="-CE(z/T) == log softmax(z/T)[y]")
    hidden, weight = torch.randn(12, 5), torch.randn(17, 5)
    fused = impls_mod._liger_fused(CPU)(hidden, weight, case)
    assert_close(fused, impls_mod.naive_fused(hidden, weight, case), dtype=torch.float32, what="(h/T) W^T == h W^T / T")

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


def _probe(monkeypatch) -> dict:
    """Test doubles of a logprobs and a fused_linear implementation that record the inputs they are called with."""
    seen: dict = {}

    def logits_probe(logits, case):
        seen[("logprobs", logits.shape)] = (logits.detach().clone(), case.labels.clone(), case.grad_out.clone())
        return impls_mod.naive_logprobs(logits, case)

    def hidden_probe(hidden, weight, case):
        seen[("fused_linear", hidden.shape)] = (torch.cat([hidden.detach().flatten(), weight.detach().flatten()]),
                                                case.labels.clone(), case.grad_out.clone())  # fmt: skip
        return impls_mod.naive_fused(hidden, weight, case)

    extra = (impls_mod.Impl("probe", "logprobs", "test double", lambda d: logits_probe),
             impls_mod.Impl("probe", "fused_linear", "test double", lambda d: hidden_probe))  # fmt: skip
    monkeypatch.setattr(impls_mod, "IMPLS", (*impls_mod.IMPLS, *extra))
    return seen


def test_inputs_depend_only_on_the_seed_and_the_shape(monkeypatch):
    """issue 20: the same --seed gave other inputs when other ops (or shapes) ran before a case. Now one case's
    logits, hidden states, labels and upstream gradient are the same whatever else the run measures, in whatever
    order; and the labels and gradient at (N, V) are the same for the logprobs and the fused_linear op."""
    seen = _probe(monkeypatch)
    base = {"v": (30,), "h": (4,), "impls": ("probe",), "warmup": 0, "reps": 1, "measure_memory": False, "seed": 7}
    run_suite(BenchConfig(ops=("logprobs",), n=(8, 16), **base))
    alone = dict(seen)
    seen.clear()
    run_suite(BenchConfig(ops=("loss", "fused_linear", "logprobs"), n=(16, 8), dtypes=("bf16", "fp32"), **base))
    for key, (x, labels, grad) in alone.items():
        y, labels2, grad2 = seen[key]
        assert torch.equal(x, y) and torch.equal(labels, labels2) and torch.equal(grad, grad2), key
    for n in (8, 16):
        _, labels, grad = seen[("logprobs", (n, 30))]
        _, labels_f, grad_f = seen[("fused_linear", (n, 4))]
        assert torch.equal(labels, labels_f) and torch.equal(grad, grad_f)
    run_suite(BenchConfig(ops=("logprobs",), n=(8,), **{**base, "seed": 8}))
    assert not torch.equal(seen[("logprobs", (8, 30))][1], alone[("logprobs", (8, 30))][1]), "another seed"


def test_loss_row_runs_the_pytorch_path(monkeypatch):
    """The 'flowloss' loss row is the PyTorch path even where the fused kernel would be chosen (on CUDA it used to
    time the fused kernel twice): a fused op that raises leaves it untouched."""
    from flowloss.ops import fused_tb

    def fused_raises(*args, **kwargs):
        raise RuntimeError("the fused kernel ran")

    monkeypatch.setattr(fused_tb, "fused_tb_supported", lambda *tensors: True)
    monkeypatch.setattr(fused_tb, "fused_tb_sequence_terms", fused_raises)
    (case,) = run_suite(BenchConfig(ops=("loss",), n=(64,), warmup=0, reps=1, measure_memory=False))
    res = {r["impl"]: r for r in case["results"]}
    assert res["flowloss"]["status"] == "ok", res["flowloss"]
    assert res["flowloss"]["max_abs_err"] < 1e-5
    assert res["flowloss-fused-loss"]["status"] == "skipped" and "CUDA" in res["flowloss-fused-loss"]["reason"]


def test_time_budget_skips_what_would_start_after_it_and_each_case_is_reported():
    reported = []
    config = BenchConfig(ops=("logprobs", "loss"), n=(8, 16), v=(20,), impls=("naive",), warmup=0, reps=1,
                         time_budget=1e-9)  # fmt: skip
    cases = run_suite(config, on_case=lambda so_far: reported.append(len(so_far)))
    assert reported == list(range(1, len(cases) + 1)) and len(cases) == 4
    for case in cases:
        for r in case["results"]:
            assert r["status"] == "skipped" and "time budget (--time-budget 1e-09 s) was spent" in r["reason"], r
    with pytest.raises(ValueError, match="--time-budget must be a number of seconds > 0"):
        BenchConfig(time_budget=0).resolved()


def test_numbers_are_readable():
    from flowloss.bench.report import num

    assert [num(x) for x in (1830.4, 123456.0, 99.94, 12.345, 1.2345, 0.5412, 0.00123, 0.0)] == [
        "1,830", "123,456", "99.9", "12.3", "1.23", "0.541", "0.00123", "0",
    ]  # fmt: skip


def test_plot_and_header_print_readable_numbers_and_the_load():
    """issue 20: bar labels read like 1.83e+03 and nothing showed the machine's load. Now: no exponent in any
    label of slow results, and the load averages with the core count in the plot's footer and the table header."""
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    from flowloss.bench.plot import figure
    from flowloss.bench.report import build_report, header_line

    config = BenchConfig(ops=("logprobs", "fused_linear"), n=(16,), v=(30,), h=(4,), impls=("naive", "flowloss-chunked",
                         "flowloss-fused"), warmup=0, reps=2)  # fmt: skip
    report = build_report(config, run_suite(config), load_at_start=(1.5, 1.25, 1.0))
    for case in report["cases"]:
        for r in case["results"]:
            for phase in ("fwd_ms", "fwdbwd_ms"):
                r[phase] = {k: v * 1e5 if k != "reps" else v for k, v in r[phase].items()}  # seconds, not ms
    fig = figure(report)
    texts = [t.get_text() for t in fig.findobj(Text) if t.get_text()]
    assert any("," in t for t in texts), texts  # thousands grouped: "1,830"
    assert not [t for t in texts if "e+" in t or "e-0" in t], texts
    footer = fig._supxlabel.get_text()
    assert "load 1.50 at start" in footer and f"{report['machine']['cpu_count']} cores" in footer
    assert "load 1.50 at start" in header_line(report) and "cores" in header_line(report)


def trl_stand_in(monkeypatch, *, compact: bool) -> None:
    """A stand-in ``trl.kernels`` whose ``ChunkedLogProbFunction.apply`` has TRL 1.16's positional signature and
    computes the log-probs with plain autograd: wiring only (which rows, labels, temperature go where)."""

    class ChunkedLogProbFunction:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
            assert chunk_size == impls_mod.TRL_CHUNK_COLUMNS and softcap is None and logit_scale == 1.0
            z = (hidden @ weight.T + (0 if bias is None else bias)).float() * logit_scale / temperature
            logp = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
            return logp, None, None, None, None

    chunked = SimpleNamespace(_use_triton=lambda device: compact)
    _fake_module(monkeypatch, "trl.kernels", ChunkedLogProbFunction=ChunkedLogProbFunction, chunked_logprob=chunked)
    sys.modules["trl"].__version__ = "stand-in"
    sys.modules["trl"].kernels = sys.modules["trl.kernels"]


@pytest.mark.parametrize("compact", [True, False], ids=["kept rows (CUDA)", "every row (CPU)"])
def test_trl_chunked_adapter_is_the_temperature_scaled_logprob(compact, monkeypatch):
    """trl-chunked: kept rows only (TRL on CUDA) or every row with label 0 (TRL elsewhere), then 0 at masked rows:
    either way the naive log-probs of (h W^T) / T and their gradients."""
    trl_stand_in(monkeypatch, compact=compact)
    _, labels, keep, grad_out = _inputs(12, 17, seed=4)
    case = SimpleNamespace(labels=labels, safe_labels=torch.where(keep, labels, 0), keep=keep, temperature=0.6)
    grads = []
    for fn in (impls_mod._trl_chunked(CPU), impls_mod.naive_fused):
        hidden = torch.randn(12, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        weight = torch.randn(17, 5, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        out = fn(hidden, weight, case)
        out.backward(grad_out)
        grads.append((out.detach(), hidden.grad, weight.grad))
    for got, expected in zip(*grads):
        assert_close(got, expected, dtype=torch.float32, what="TRL chunked log softmax((h W^T) / T)[y], 0 at masked")


def test_trl_chunked_is_tensor_for_tensor_the_naive_op_when_trl_is_installed():
    """With the real trl (run from .venv-trl): trl.kernels.ChunkedLogProbFunction through the adapter equals the
    float64 reference, values and gradients."""
    pytest.importorskip("trl.kernels")
    _, labels, keep, grad_out = _inputs(40, 300, seed=6)
    case = SimpleNamespace(labels=labels, safe_labels=torch.where(keep, labels, 0), keep=keep, temperature=0.7)
    hidden = torch.randn(40, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    weight = torch.randn(300, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    out = impls_mod._trl_chunked(CPU)(hidden, weight, case)
    out.backward(grad_out)
    lp, dh, dw = ref.fused_logprobs_and_grads(hidden, weight, labels, keep, grad_out, temperature=0.7)
    assert_close(out, lp, dtype=torch.float32, what="logp")
    assert_close(hidden.grad, dh, dtype=torch.float32, what="dh", grad=True, scale=10)
    assert_close(weight.grad, dw, dtype=torch.float32, what="dW", grad=True, scale=10)

"""``flowloss bench`` end to end on CPU at tiny shapes: table, JSON keys, PNG, and clear errors for bad options.

No timing is asserted: only that every figure is present, finite where it must be, and consistent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowloss.cli import main

TINY = ["bench", "--n", "24", "--v", "40", "--h", "8", "--warmup", "0", "--reps", "2", "--no-progress"]
FAST_IMPLS = ["--impl", "naive", "flowloss-chunked", "flowloss-triton", "flowloss-fused", "trl", "liger"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _console_script() -> str:
    here = Path(sys.executable).with_name("flowloss")
    return str(here) if here.exists() else (shutil.which("flowloss") or "flowloss")


def _results(case: dict) -> dict[str, dict]:
    return {r["impl"]: r for r in case["results"]}


def test_default_impls_end_to_end_json_table_png(tmp_path, capsys):
    """Every op with every implementation (torch.compile included): table, JSON with the documented keys, PNG."""
    pytest.importorskip("matplotlib")  # part of flowloss[cli]; absent from the framework venvs
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main([*TINY, "--json", str(json_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    for text in ("logprobs  N=24 V=40 fp32 cpu", "fused_linear  N=24 V=40 H=8", "loss  N=24", "naive", "compile"):
        assert text in out
    assert "flowloss-triton skipped: the Triton kernel needs a CUDA device" in out

    report = json.loads(json_path.read_text())
    assert report["schema"] == "flowloss-bench/1"
    assert report["command"].startswith("flowloss bench --op logprobs fused_linear loss --n 24 --v 40 --h 8")
    for key in ("device", "device_name", "cpu_model", "cpu_count", "torch", "triton", "flowloss"):
        assert key in report["machine"], key
    assert report["machine"]["torch"] == torch.__version__
    settings = report["settings"]
    assert (settings["n"], settings["v"], settings["h"], settings["dtypes"]) == ([24], [40], [8], ["fp32"])
    assert settings["device"] == "cpu" and settings["temperature"] == 0.7 and settings["mask_fraction"] == 0.2

    ops = [c["op"] for c in report["cases"]]
    assert ops == ["logprobs", "loss", "fused_linear"]
    logprobs, loss, fused = report["cases"]
    kept = 24 - logprobs["masked_rows"]  # bytes the op must move: kept rows read, every dlogits row written
    assert logprobs["masked_rows"] > 0
    assert logprobs["min_bytes"] == {"fwd": kept * 40 * 4, "fwdbwd": (2 * kept + 24) * 40 * 4}
    assert logprobs["copy_gbps"] > 0 and logprobs["masked_rows"] >= 0
    res = _results(logprobs)
    assert {"naive", "compile", "flowloss-chunked", "flowloss-triton", "trl", "verl", "openrlhf"} <= set(res)
    for name in ("naive", "flowloss-chunked"):
        r = res[name]
        assert r["status"] == "ok", r
        for phase in ("fwd_ms", "fwdbwd_ms"):
            assert set(r[phase]) == {"median", "p20", "p80", "reps"} and r[phase]["reps"] == 2
            assert 0 < r[phase]["p20"] <= r[phase]["median"] <= r[phase]["p80"]
        for key in ("gbps_fwd", "gbps_fwdbwd", "copy_fraction_fwdbwd", "speedup_vs_naive_fwdbwd"):
            assert r[key] > 0 and math.isfinite(r[key]), key
        assert r["peak_mem_fwdbwd_bytes"] >= 24 * 40 * 4  # at least dlogits
        assert r["max_abs_err"] < 1e-5 and r["max_abs_err_grad"] < 1e-5
    assert res["naive"]["speedup_vs_naive_fwdbwd"] == 1.0
    assert res["compile"]["status"] in ("ok", "error")
    assert res["flowloss-triton"]["status"] == "skipped" and "CUDA" in res["flowloss-triton"]["reason"]
    for r in res.values():
        assert r["status"] in ("ok", "skipped", "error")
        assert (r["status"] == "ok") == (r["reason"] == ""), r

    loss_result, fused_loss = _results(loss)["flowloss"], _results(loss)["flowloss-fused-loss"]
    assert fused_loss["status"] == "skipped" and "CUDA" in fused_loss["reason"]
    assert loss["b"] * loss["t"] == 24
    assert loss_result["status"] == "ok" and loss_result["fraction_of_logprobs_fwdbwd"] > 0
    assert loss["relative_to"]["impl"] == "flowloss-chunked"
    assert loss_result["max_abs_err"] < 1e-4 and loss_result["max_abs_err_grad"] < 1e-5

    fres = _results(fused)
    assert fused["flops"] == {"fwd": 2 * 24 * 8 * 40, "fwdbwd": 6 * 24 * 8 * 40}
    assert fused["grads_bytes"] == (24 + 40) * 8 * 4  # dhidden + dW
    assert fres["naive"]["mem_fwdbwd_vs_grads"] == fres["naive"]["peak_mem_fwdbwd_bytes"] / fused["grads_bytes"]
    for name in ("naive", "flowloss-fused"):
        assert fres[name]["status"] == "ok", fres[name]
        assert fres[name]["tflops_fwdbwd"] > 0
        assert fres[name]["max_abs_err"] < 1e-5 and fres[name]["max_abs_err_grad"] < 1e-4

    png = png_path.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_console_script_subprocess(tmp_path):
    """The installed ``flowloss`` entry point runs the bench and writes valid JSON."""
    json_path = tmp_path / "out.json"
    proc = subprocess.run(
        [_console_script(), *TINY, *FAST_IMPLS, "--op", "logprobs", "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "logprobs  N=24 V=40 fp32 cpu" in proc.stdout and "flowloss-chunked" in proc.stdout
    report = json.loads(json_path.read_text())
    assert [c["op"] for c in report["cases"]] == ["logprobs"]
    assert [r["impl"] for r in report["cases"][0]["results"]] == [
        "naive",
        "flowloss-triton",
        "flowloss-chunked",
        "trl",
        "liger",
    ]


def test_several_shapes_and_dtypes_make_one_case_each(tmp_path):
    json_path = tmp_path / "out.json"
    argv = [*TINY, "--impl", "naive", "flowloss-chunked", "--op", "logprobs", "--n", "8", "16", "--v", "33", "--dtype"]
    assert main([*argv, "fp32", "bf16", "--json", str(json_path), "--no-memory"]) == 0
    cases = json.loads(json_path.read_text())["cases"]
    assert sorted((c["n"], c["dtype"]) for c in cases) == [(8, "bf16"), (8, "fp32"), (16, "bf16"), (16, "fp32")]
    for case in cases:
        ok = _results(case)["flowloss-chunked"]
        assert ok["status"] == "ok" and "peak_mem_fwdbwd_bytes" not in ok
        assert ok["max_abs_err"] < 1e-5  # fp32 accumulation of the bf16 inputs, reference on the same bf16 values


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "argument --n: must be an integer >= 1, got 0"),
        (["--v", "-3"], "argument --v: must be an integer >= 1, got -3"),
        (["--h", "0"], "argument --h: must be an integer >= 1, got 0"),
        (["--n", "many"], "argument --n: must be an integer >= 1, got 'many'"),
        (["--reps", "0"], "argument --reps: must be an integer >= 1, got 0"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--impl", "fastest"], "argument --impl: invalid choice: 'fastest'"),
        (["--op", "attention"], "argument --op: invalid choice: 'attention'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["--mask-fraction", "1.0"], "--mask-fraction must be in [0, 1), got 1.0"),
    ],
)
def test_bad_values_return_2_with_a_clear_message(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_requested_without_cuda(capsys):
    assert main([*TINY, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda was requested but CUDA is not available" in err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_output_is_refused_before_the_run(flag, tmp_path, capsys, monkeypatch):
    """`--json /missing/dir/x.json` used to run the whole benchmark, then die with a traceback."""
    import flowloss.bench.runner as runner

    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: pytest.fail("the suite ran before the check"))
    assert main([*TINY, flag, str(tmp_path / "missing" / "out.file")]) == 2
    assert f"{flag} " in (err := capsys.readouterr().err) and "does not exist" in err
    assert main([*TINY, flag, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_console_script_unknown_option_fails():
    proc = subprocess.run([_console_script(), "bench", "--nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unrecognized arguments: --nope" in proc.stderr


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main([*TINY, "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "flowloss bench: error: needs matplotlib, from flowloss's optional 'cli' extra" in err
    assert 'pip install -e ".[cli]"' in err
    assert not (tmp_path / "p.png").exists()


def test_without_rich_the_bench_names_the_cli_extra(monkeypatch, capsys):
    """rich is not a runtime dependency of flowloss: without it the bench stops at once and says what to install."""
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main(TINY) == 2
    captured = capsys.readouterr()
    assert "flowloss bench: error: needs rich, from flowloss's optional 'cli' extra" in captured.err
    assert 'pip install -e ".[cli]"' in captured.err
    assert captured.out == ""


def test_help_text_has_no_printf_escapes(capsys):
    """argparse does not %-format a description: '%%' would print as typed."""
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "~20% masked rows" in out
    assert "--no-progress" in out


def test_sweep_script_writes_a_small_csv(tmp_path):
    """benchmarks/sweep_vocab.py: one CSV row per (N, V, implementation) that is installed."""
    import csv

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "sweep_vocab.py"
    argv = ["--n", "8", "16", "--v", "20", "--reps", "1", "--out-dir", str(tmp_path), "--name", "t", "--keep-json"]
    proc = subprocess.run(
        [sys.executable, str(script), *argv, "--impl", "naive", "flowloss-chunked", "trl"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    ran = [(r["n"], r["impl"]) for r in rows if r["status"] == "ok" and r["impl"] != "trl"]  # trl: if installed
    assert ran == [("8", "naive"), ("8", "flowloss-chunked"), ("16", "naive"), ("16", "flowloss-chunked")]
    assert all(float(r["max_abs_err"]) < 1e-5 for r in rows if r["status"] == "ok")
    assert (tmp_path / "t.csv").stat().st_size < 4096
    assert json.loads((tmp_path / "t.json").read_text())["schema"] == "flowloss-bench/1"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's /proc/self peak RSS")
def test_first_call_rss_script_measures_both_ops_both_ways():
    """benchmarks/first_call_rss.py: four rows (fwd, fwd+bwd x naive, flowloss); at 2,048 x 4,096 fp32 (32 MiB of
    logits) naive's fwd+bwd keeps >= 2 logits-sized fp32 buffers alive, flowloss's only the gradient."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "first_call_rss.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--n", "2048", "--v", "4096", "--reps", "1", "--warm-small"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    row = r"^\s+(fwd\+bwd|fwd)\s+(naive|flowloss)\s.*?RSS\s+([\d.]+) MiB \(([\d.]+)x logits"
    rows = re.findall(row, proc.stdout, re.M)
    assert [(op, impl) for op, impl, *_ in rows] == [
        ("fwd", "naive"), ("fwd", "flowloss"), ("fwd+bwd", "naive"), ("fwd+bwd", "flowloss")
    ], proc.stdout
    peak = {(op, impl): float(x) for op, impl, _, x in rows}
    assert peak[("fwd+bwd", "naive")] >= 1.9 and peak[("fwd+bwd", "flowloss")] < 1.5, proc.stdout


def test_impl_subset_leaves_out_ops_without_a_chosen_implementation(tmp_path):
    json_path = tmp_path / "out.json"
    assert main([*TINY, "--impl", "flowloss-fused", "--json", str(json_path)]) == 0
    cases = json.loads(json_path.read_text())["cases"]
    assert [c["op"] for c in cases] == ["fused_linear", "loss"]
    assert [r["impl"] for r in cases[0]["results"]] == ["flowloss-fused"]
    assert "fraction_of_logprobs_fwdbwd" not in cases[1]["results"][0]  # no log-prob op to compare with


def test_step_without_transformers_names_the_extra_and_other_ops_still_run(tmp_path, monkeypatch, capsys):
    """--op step needs the `step` extra: without transformers it stops with exit 2 and says what to install;
    the other ops do not import transformers and keep working."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    assert main(["bench", "--op", "step", "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap the line
    assert "--op step needs transformers: pip install -e '.[step]'" in err
    json_path = tmp_path / "out.json"
    assert main([*TINY, "--op", "logprobs", "loss", "--impl", "naive", "--json", str(json_path)]) == 0
    assert [c["op"] for c in json.loads(json_path.read_text())["cases"]] == ["logprobs", "loss"]


def test_step_is_not_in_the_default_ops_and_its_options_are_checked(capsys):
    from flowloss.bench.config import BenchConfig

    assert "step" not in BenchConfig().resolved().ops
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--op", "step", "--preset", "llama-70b"])
    assert exc.value.code == 2 and "argument --preset: invalid choice: 'llama-70b'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--op", "step", "--seq-len", "0"])
    assert "argument --seq-len: must be an integer >= 1, got 0" in capsys.readouterr().err
    if importlib.util.find_spec("transformers") is None:
        return  # the message above comes first
    assert main(["bench", "--op", "step", "--sequences", "6", "--group-size", "4"]) == 2
    assert "--sequences (6) must be a multiple of --group-size (4)" in capsys.readouterr().err
    assert main(["bench", "--op", "step", "--seq-len", "1"]) == 2
    assert "--seq-len must be an integer >= 2, got 1" in capsys.readouterr().err


@pytest.mark.triton_interpreter
def test_fused_linear_kernel_plans_run_under_the_interpreter(tmp_path):
    """The fused lm_head launchers' two other plans (one-pass backward, tile filter), as rows of --op fused_linear
    (they were a second harness, benchmarks/fused_linear_gpu.py): on CPU under TRITON_INTERPRET=1 they run and
    match float64; Liger and Cut Cross-Entropy are listed with their reason."""
    json_path = tmp_path / "fl.json"
    argv = [*TINY, "--op", "fused_linear", "--h", "16", "--impl", "naive", "flowloss-fused-onepass",
            "flowloss-fused-filter", "liger-fused", "cce-fused", "--reps", "1", "--json", str(json_path)]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "flowloss", *argv], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (case,) = json.loads(json_path.read_text())["cases"]
    res = _results(case)
    for name in ("flowloss-fused-onepass", "flowloss-fused-filter"):
        assert res[name]["status"] == "ok", res[name]
        assert res[name]["max_abs_err"] < 1e-5 and res[name]["max_abs_err_grad"] < 1e-3, res[name]
        assert res[name]["mem_fwdbwd_vs_grads"] > 0 and res[name]["fwdbwd_ms"]["median"] > 0
    assert res["flowloss-fused-onepass"]["max_abs_err_grad"] < 1e-5  # exact: no gradient filter
    assert res["liger-fused"]["status"] == res["cce-fused"]["status"] == "skipped"

"""``benchmarks/fused_linear_gpu.py`` (the H200 fused lm_head benchmark): its arguments on any machine, and one tiny
end-to-end run on CPU under Triton's interpreter (timings meaningless there; the files, columns and errors are not)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fused_linear_gpu.py"


def _script():
    if "fused_linear_gpu" not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location("fused_linear_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["fused_linear_gpu"]


def test_defaults_are_the_issue_shapes():
    args = _script().parse_args([])
    assert args.n == [16384, 4096] and sorted(args.v) == [32000, 151936, 262144]
    assert args.h == 4096 and args.dtype == "bf16" and args.time_budget < 360
    assert set(args.impls) >= {"naive", "liger", "cce", "flowloss"}


@pytest.mark.parametrize(
    "argv", [["--mask-fraction", "1.0"], ["--temperature", "0"], ["--impls", "unknown"], ["--dtype", "fp8"]]
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        _script().parse_args(argv)


def test_shell_wrapper_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "fused_linear_gpu.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.triton_interpreter
def test_tiny_run_on_cpu_writes_every_column(tmp_path):
    out = tmp_path / "fl"
    argv = ["--device", "cpu", "--n", "24", "--v", "40", "--h", "16", "--check-stride", "3", "--out", str(out)]
    argv += ["--impls", "naive", "flowloss", "flowloss-filter", "liger"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"naive", "flowloss", "flowloss-filter"}, "liger is skipped on CPU, with its reason"
    assert "liger" in data["skipped"]
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in rows.values())
    # fp32 accumulation and fp32 log-probs vs the naive bf16 logits
    assert rows["flowloss"]["err_logp"] < 1e-5 < rows["naive"]["err_logp"]
    assert out.with_suffix(".csv").read_text().count("\n") == 4 and "| flowloss |" in out.with_suffix(".md").read_text()

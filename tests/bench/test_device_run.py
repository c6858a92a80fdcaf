"""``benchmarks/device_run.sh``, the one-call GPU run: what it would run (``--dry-run``), checked against the CLI's
parser and the 6-minute limit, and that a part which fails or overruns its budget is reported while the rest run
(with stand-ins for the Python and ``make``: no GPU here)."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

from flowloss.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_run.sh"
PARTS = ["test-gpu", "logprobs", "fused_linear", "loss", "step"]


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_dry_run_lists_every_part_within_six_minutes_with_valid_bench_options(tmp_path):
    proc = _run({"OUT": str(tmp_path / "out"), "PY": "python3"}, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("part ")]
    assert [line.split()[1] for line in lines] == PARTS
    budgets = [int(line.split()[3]) for line in lines]
    assert sum(budgets) <= 330, budgets  # 6 minutes, with half a minute for set-up and the summary
    commands = {line.split()[1]: shlex.split(line.split(": ", 1)[1]) for line in lines}
    assert commands["test-gpu"] == ["make", "test-gpu", "GPU_PYTHON=python3"]
    for part in PARTS[1:]:
        argv = commands[part]
        assert argv[:3] == ["python3", "-m", "flowloss"]
        assert argv[-2:] == ["--json", str(tmp_path / "out" / f"{part}.json")]
        args = build_parser().parse_args(argv[3:])  # every option exists and takes its values
        assert args.device == "cuda" and args.op == [part] and 0 < args.time_budget < budgets[PARTS.index(part)]
    assert {"trl-chunked", "liger-fused", "cce-fused", "flowloss-fused"} <= set(commands["fused_linear"])
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_a_failing_or_overrunning_part_is_reported_and_the_rest_still_run(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == *summarize.py ]]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
        'if [[ "$1" == "-" ]]; then cat > /dev/null; exit 0; fi\n'
        'if [[ "$*" == *"--op logprobs"* ]]; then sleep 30; fi\n'
        'if [[ "$*" == *"--op loss"* ]]; then echo "5 passed"; exit 0; fi\n'
        'echo "stand-in failure of: $*"; exit 3\n'
    )
    make = tmp_path / "make"
    make.write_text("#!/usr/bin/env bash\necho 'no GPU here'; exit 2\n")
    for f in (stub, make):
        f.chmod(0o755)
    out = tmp_path / "out"
    env = {"OUT": str(out), "PY": str(stub), "MAKE": str(make), "BUDGET_LOGPROBS": "1", "WHEELS": str(tmp_path)}
    proc = _run(env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["part"]: r for r in csv.DictReader((out / "status.tsv").open(), delimiter="\t")}
    assert list(rows) == ["setup", *PARTS]
    assert (rows["setup"]["status"], rows["test-gpu"]["status"], rows["test-gpu"]["rc"]) == ("ok", "failed", "2")
    assert rows["logprobs"]["status"] == "timed out" and int(rows["logprobs"]["seconds"]) < 10
    assert (rows["fused_linear"]["status"], rows["fused_linear"]["rc"]) == ("failed", "3")
    assert rows["loss"]["status"] == "ok" and rows["step"]["status"] == "failed"
    summary = (out / "summary.txt").read_text()
    assert "test-gpu      failed" in summary and "no GPU here" in summary and "stand-in failure of" in summary
    assert (out / "setup.log").exists() and (out / "fused_linear.log").exists()


def test_summary_has_one_line_per_implementation(tmp_path):
    import importlib.util

    from flowloss.cli import main

    argv = ["bench", "--op", "logprobs", "--n", "24", "--v", "40", "--impl", "naive", "flowloss-triton", "--warmup",
            "0", "--reps", "1", "--no-progress", "--json", str(tmp_path / "logprobs.json")]  # fmt: skip
    assert main(argv) == 0
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.summarize(tmp_path)
    assert "logprobs N=24 V=40 fp32" in lines
    naive = next(line for line in lines if line.startswith("  naive: "))
    assert " ms, 1.00x naive, " in naive and "x logits" in naive and "err " in naive
    assert any(line.startswith("  flowloss-triton: skipped: ") for line in lines)

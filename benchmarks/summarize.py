"""A short summary of a `device_run.sh` folder: each part's status, and one line per implementation per case.

    python benchmarks/summarize.py OUT_DIR       # reads OUT_DIR/status.tsv, OUT_DIR/*.log, OUT_DIR/*.json

Per case: the forward + backward median (the step's median for ``--op step``), the speed against naive, the peak
extra memory and the errors against float64; the reason of every row that did not run. The full tables are in the
parts' logs, every figure in their JSON (``python -m flowloss.bench.plot OUT_DIR/<part>.json out.png`` draws one).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _num(x: float | None) -> str:
    try:
        from flowloss.bench.report import num
    except ImportError:  # summarizing a folder copied to a machine without flowloss
        return "-" if x is None else f"{x:.3g}"
    return num(x)


def _last_line(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def _row(case: dict, r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['impl']}: {r['status']}: {r['reason'][:140]}"
    ms = r.get("step_ms") or r.get("fwdbwd_ms") or {}
    parts = [f"{_num(ms.get('median'))} ms"]
    if r.get("speedup_vs_naive_fwdbwd") is not None:
        parts.append(f"{r['speedup_vs_naive_fwdbwd']:.2f}x naive")
    if r.get("tflops_fwdbwd") is not None:
        parts.append(f"{_num(r['tflops_fwdbwd'])} TFLOP/s")
    if r.get("copy_fraction_fwdbwd") is not None:
        parts.append(f"{100 * r['copy_fraction_fwdbwd']:.0f} % of copy")
    if r.get("peak_mem_fwdbwd_bytes") is not None:
        ratio = r.get("mem_fwdbwd_vs_logits")
        peak = f"peak {_num(r['peak_mem_fwdbwd_bytes'] / 2**20)} MiB"
        parts.append(peak + (f" ({ratio:.2f}x logits)" if ratio else ""))
    if (fit := r.get("max_fit")) and fit.get("tokens"):
        parts.append(f"fits {fit['tokens']} tokens")
    errs = [r.get(k) for k in ("max_abs_err", "max_abs_err_grad", "max_abs_err_logprobs", "grad_rel_diff")]
    if any(e is not None for e in errs):
        parts.append("err " + " / ".join(f"{e:.1e}" for e in errs if e is not None))
    return f"  {r['impl']}: " + ", ".join(parts)


def _title(case: dict) -> str:
    if case["op"] == "step":
        return f"step {case['preset']} {case['dtype']}, B={case['sequences']} x L={case['seq_len']}"
    shape = " ".join(f"{k.upper()}={case[k]}" for k in ("n", "v", "h", "b", "t") if k in case)
    return f"{case['op']} {shape} {case['dtype']}"


def summarize(folder: Path) -> list[str]:
    lines = []
    status = folder / "status.tsv"
    if status.exists():
        lines.append("part          status     seconds / budget  last line of its log")
        for row in csv.DictReader(status.open(), delimiter="\t"):
            tail = _last_line(folder / f"{row['part']}.log")
            lines.append(f"{row['part']:13} {row['status']:10} {row['seconds']:>4} / {row['budget']:>4}     {tail}")
    for path in sorted(folder.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            lines.append(f"{path.name}: unreadable ({err})")
            continue
        m = report.get("machine", {})
        lines.append(f"\n{path.name}: {m.get('device_name')}, torch {m.get('torch')}, triton {m.get('triton')}")
        for case in report.get("cases", []):
            lines.append(_title(case))
            lines.extend(_row(case, r) for r in case["results"])
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python benchmarks/summarize.py OUT_DIR", file=sys.stderr)
        return 2
    print("\n".join(summarize(Path(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

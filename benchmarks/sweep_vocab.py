"""Sweep N and V through ``flowloss bench`` and keep a small CSV of the figures that matter.

Runs the CLI once (one process, all shapes) and writes one CSV row per
(op, N, V, dtype, implementation): fwd and fwd+bwd medians, effective GB/s, share of a copy, peak extra memory
as a multiple of the logits, and the max errors against the float64 reference (``--keep-json``: the full JSON too).

    .venv/bin/python benchmarks/sweep_vocab.py                       # CPU: N in {512, 2048}, V in {8000, 32000, 65536}
    .venv/bin/python benchmarks/sweep_vocab.py --device cuda --n 4096 16384 32768 --v 32000 128256 151936 262144 \
        --dtype bf16 fp32 --name gpu-sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

from flowloss.cli import main as flowloss_main

HERE = Path(__file__).resolve().parent
FIELDS = [
    "op", "n", "v", "dtype", "device", "impl", "status", "fwd_ms", "fwdbwd_ms", "gbps_fwdbwd", "copy_fraction_fwdbwd",
    "mem_fwdbwd_vs_logits", "max_abs_err", "max_abs_err_grad", "reason",
]  # fmt: skip


def rows(report: dict) -> list[dict]:
    """One flat row per implementation per log-prob case (those not installed left out)."""
    out = []
    for case in report["cases"]:
        if case["op"] != "logprobs":
            continue
        for r in case["results"]:
            if r["status"] == "skipped" and r.get("reason", "").endswith("not installed"):
                continue  # keep the CSV small: missing packages are listed in the JSON
            row = {k: case.get(k) for k in ("op", "n", "v", "dtype", "device")}
            row.update({"impl": r["impl"], "status": r["status"], "reason": r.get("reason", "")})
            row["fwd_ms"] = r["fwd_ms"]["median"] if "fwd_ms" in r else None
            row["fwdbwd_ms"] = r["fwdbwd_ms"]["median"] if "fwdbwd_ms" in r else None
            for key in FIELDS[9:14]:
                row[key] = r.get(key)
            out.append({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", nargs="+", default=["512", "2048"])
    parser.add_argument("--v", nargs="+", default=["8000", "32000", "65536"])
    parser.add_argument("--dtype", nargs="+", default=["fp32"])
    parser.add_argument("--impl", nargs="+", default=None, help="passed to flowloss bench --impl")
    parser.add_argument("--reps", default=None)
    parser.add_argument("--name", default="cpu-sweep", help="writes <out-dir>/<name>.csv")
    parser.add_argument("--out-dir", default=str(HERE / "results"), help="default: benchmarks/results")
    parser.add_argument("--keep-json", action="store_true", help="also keep the full JSON as <out-dir>/<name>.json")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    json_path = (out_dir if args.keep_json else Path(tmp.name)) / f"{args.name}.json"
    cli = ["bench", "--op", "logprobs", "--device", args.device, "--n", *args.n, "--v", *args.v, "--dtype", *args.dtype]
    cli += ["--json", str(json_path)]
    if args.impl:
        cli += ["--impl", *args.impl]
    if args.reps:
        cli += ["--reps", args.reps]
    status = flowloss_main(cli)
    if status:
        return status
    table = rows(json.loads(json_path.read_text()))
    csv_path = out_dir / f"{args.name}.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {csv_path} ({len(table)} rows)" + (f" and {json_path}" if args.keep_json else ""))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

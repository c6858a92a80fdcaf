"""The run's output: one rich table per case, and the JSON file with every figure and the machine's details."""

from __future__ import annotations

import json
import os
import platform
from typing import TYPE_CHECKING, Any

import torch

from flowloss.bench.config import BenchConfig

if TYPE_CHECKING:  # rich comes with the 'cli' extra: imported where the tables are drawn
    from rich.console import Console
    from rich.table import Table

SCHEMA = "flowloss-bench/1"


def machine_info(device: str) -> dict[str, Any]:
    """Device name, CPU model, core count and library versions: what a reader needs to compare two runs."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }
    from flowloss import __version__

    info["flowloss"] = __version__
    return info


def command_line(config: BenchConfig) -> str:
    """The ``flowloss bench`` command that repeats this run (every default spelled out)."""
    c = config.resolved()
    parts = ["flowloss bench", "--op", *c.ops, "--n", *map(str, c.n), "--v", *map(str, c.v)]
    if "fused_linear" in c.ops:
        parts += ["--h", *map(str, c.h)]
    parts += ["--dtype", *c.dtypes, "--device", c.device, "--warmup", str(c.warmup), "--reps", str(c.reps)]
    if c.impls is not None:
        parts += ["--impl", *c.impls]
    parts += ["--temperature", f"{c.temperature:g}", "--mask-fraction", f"{c.mask_fraction:g}", "--seed", str(c.seed)]
    if not c.measure_memory:
        parts.append("--no-memory")
    return " ".join(parts)


def build_report(config: BenchConfig, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: schema, command, machine, settings (resolved) and the cases."""
    resolved = config.resolved()
    return {
        "schema": SCHEMA,
        "command": command_line(resolved),
        "machine": machine_info(resolved.device),
        "settings": {
            "ops": list(resolved.ops),
            "n": list(resolved.n),
            "v": list(resolved.v),
            "h": list(resolved.h),
            "dtypes": list(resolved.dtypes),
            "device": resolved.device,
            "warmup": resolved.warmup,
            "reps": resolved.reps,
            "impls": None if resolved.impls is None else list(resolved.impls),
            "temperature": resolved.temperature,
            "mask_fraction": resolved.mask_fraction,
            "seed": resolved.seed,
            "measure_memory": resolved.measure_memory,
            "timing": "CUDA events, L2 flushed per call" if resolved.device == "cuda" else "time.perf_counter per call",
            "forward": "under torch.no_grad()",
            "upstream_gradient": "random normal per token, 0 at masked rows",
        },
        "cases": cases,
    }


def write_json(report: dict[str, Any], path: str) -> None:
    """Compact JSON (one line per case) so that committed results stay a few KB."""
    with open(path, "w") as fh:
        head = {k: v for k, v in report.items() if k != "cases"}
        text = json.dumps(head, separators=(",", ":"))[:-1] + ',"cases":[\n'
        text += ",\n".join(json.dumps(c, separators=(",", ":")) for c in report["cases"]) + "\n]}"
        fh.write(text)
        fh.write("\n")


def _ms(t: dict[str, float] | None) -> str:
    if not t:
        return "-"
    return f"{t['median']:.3g} [{t['p20']:.3g}-{t['p80']:.3g}]"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _mem(r: dict[str, Any]) -> str:
    b = r.get("peak_mem_fwdbwd_bytes")
    if b is None:
        return "-"
    ratio = r.get("mem_fwdbwd_vs_logits")
    return f"{b / 2**20:.4g}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def _err(r: dict[str, Any]) -> str:
    a, g = r.get("max_abs_err"), r.get("max_abs_err_grad")
    if a is None and g is None:
        return "-"
    return f"{_num(a, '.1e')} / {_num(g, '.1e')}"


def _title(case: dict[str, Any]) -> str:
    if case["op"] == "loss":
        rel = case.get("relative_to")
        tail = f", vs log-prob op at V={rel['v']} {rel['dtype']} ({rel['impl']})" if rel and rel.get("impl") else ""
        return f"loss  N={case['n']} (B={case['b']} x T={case['t']}) fp32 {case['device']}{tail}"
    shape = f"N={case['n']} V={case['v']}" + (f" H={case['h']}" if "h" in case else "")
    masked = "" if case.get("masked_rows") is None else f", {case['masked_rows']} masked rows"
    copy = f", copy {case['copy_gbps']:.0f} GB/s" if case.get("copy_gbps") else ""
    return f"{case['op']}  {shape} {case['dtype']} {case['device']}, T={case['temperature']}{masked}{copy}"


def case_table(case: dict[str, Any]) -> Table:
    """One case as a table: a row per implementation; skipped ones show why."""
    from rich.markup import escape
    from rich.table import Table

    op = case["op"]
    table = Table(title=_title(case), title_justify="left", header_style="bold")
    table.add_column("impl", no_wrap=True)
    table.add_column("fwd ms [p20-p80]", justify="right")
    table.add_column("fwd+bwd ms [p20-p80]", justify="right")
    if op == "loss":
        table.add_column("% of log-prob op", justify="right")
    else:
        table.add_column("x naive", justify="right")
        table.add_column("TFLOP/s" if op == "fused_linear" else "GB/s (% copy)", justify="right")
    table.add_column("peak MiB (x logits)" if op != "loss" else "peak MiB", justify="right")
    table.add_column("max err out / grad", justify="right")
    notes = []
    for r in case["results"]:
        if r["status"] != "ok":
            style = "dim" if r["status"] == "skipped" else "red"
            notes.append(f"[{style}]{r['impl']} {r['status']}: {escape(r['reason'])}[/{style}]")
            table.add_row(f"[{style}]{r['impl']}[/{style}]", f"[{style}]{r['status']} (see below)[/{style}]")
            continue
        if r.get("note"):
            notes.append(f"[dim]{r['impl']}: {escape(r['note'])}[/dim]")
        cells = [r["impl"], _ms(r.get("fwd_ms")), _ms(r.get("fwdbwd_ms"))]
        if op == "loss":
            frac = r.get("fraction_of_logprobs_fwdbwd")
            cells.append("-" if frac is None else f"{100 * frac:.2g} %")
        else:
            cells.append(_num(r.get("speedup_vs_naive_fwdbwd"), ".2f"))
            if op == "fused_linear":
                cells.append(_num(r.get("tflops_fwdbwd"), ".3g"))
            else:
                gbps, frac = r.get("gbps_fwdbwd"), r.get("copy_fraction_fwdbwd")
                share = "" if frac is None else f" ({100 * frac:.0f} %)"
                cells.append("-" if gbps is None else f"{gbps:.1f}{share}")
        cells.append(_mem(r) if op != "loss" else _num(_div(r.get("peak_mem_fwdbwd_bytes"), 2**20), ".2f"))
        cells.append(_err(r))
        table.add_row(*cells)
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def _div(x: float | None, d: float) -> float | None:
    return None if x is None else x / d


def print_report(report: dict[str, Any], console: Console) -> None:
    m = report["machine"]
    s = report["settings"]
    console.print(
        f"[bold]flowloss bench[/bold]  {m['device_name']} ({m['device']}), torch {m['torch']}, triton {m['triton']}, "
        f"{s['warmup']} warm-up + {s['reps']} timed calls each"
        + ("" if m.get("load_average_1min") is None else f", load average {m['load_average_1min']:.2f}"),
        highlight=False,
    )
    for case in report["cases"]:
        console.print(case_table(case))
    console.print(
        "[dim]fwd: forward under no_grad; fwd+bwd: forward + backward with a random per-token gradient; "
        "x naive: naive median / this median (fwd+bwd); GB/s from the bytes the op must move "
        "(K kept of N rows: fwd K V s, fwd+bwd (2K + N) V s); "
        "% copy: of dst.copy_(logits) on this device; peak: extra tensor memory of fwd+bwd; "
        "err: max |x - float64 reference| of the log-probs / the input gradients.[/dim]"
    )

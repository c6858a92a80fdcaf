"""The run's output: the JSON document with every figure and the machine's details, and one rich table per case.

Numbers are printed readably (`num`: three significant digits, thousands grouped, no exponent), and the header
says how loaded the machine was (load averages against its core count: timings taken under load move).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch

from flowloss.bench.config import BenchConfig

if TYPE_CHECKING:  # rich comes with the 'cli' extra: imported where the tables are drawn
    from rich.console import Console
    from rich.table import Table

SCHEMA = "flowloss-bench/1"


def load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine_info(device: str, load_at_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Device name, CPU model, core count, load, library versions: what a reader needs to compare two runs."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = load_average()
    info: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": None if load is None else load[0],  # when the report was written (the run's end)
        "load_average_5min": None if load is None else load[1],
        "load_average_15min": None if load is None else load[2],
        "load_average_1min_start": None if load_at_start is None else load_at_start[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    from flowloss import __version__

    info["flowloss"] = __version__
    # the versions of what ran: None unless this process imported it (nothing is imported here)
    for module, dist in (("triton", "triton"), ("transformers", "transformers"), ("trl", "trl"),
                         ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):  # fmt: skip
        try:
            info[module] = metadata.version(dist) if module in sys.modules or module == "triton" else None
        except metadata.PackageNotFoundError:
            info[module] = None
    return info


def load_text(m: dict[str, Any]) -> str:
    """``"load 1.14 at start, 1.30 / 1.05 / 0.90 at end (1 / 5 / 15 min), 2 cores"`` (what the JSON holds of it),
    or ``""`` when unknown."""
    present = [(minutes, m[key]) for minutes, key in (("1", "load_average_1min"), ("5", "load_average_5min"),
               ("15", "load_average_15min")) if m.get(key) is not None]  # fmt: skip
    if not present:
        return ""
    start = m.get("load_average_1min_start")
    head = "load" if start is None else f"load {start:.2f} at start,"
    ends = " / ".join(f"{v:.2f}" for _, v in present) + (" at end" if start is not None else "")
    return f"{head} {ends} ({' / '.join(k for k, _ in present)} min), {m.get('cpu_count')} cores"


def num(x: float | None) -> str:
    """Three significant digits, thousands grouped, no exponent from 0.001 up: 1830.4 -> "1,830",
    0.5412 -> "0.541", 0.00123 -> "0.00123" (smaller values as "1.2e-05")."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x) or abs(x) < 1e-3:
        return f"{x:.2g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def command_line(config: BenchConfig) -> str:
    """The ``flowloss bench`` command that repeats this run (every default spelled out). A run that mixes
    ``step`` with other ops repeats the other ops' dtype / warm-up / reps; the step's are in ``settings.step``."""
    c = config.resolved()
    parts = ["flowloss bench", "--op", *c.ops]
    only_step = set(c.ops) == {"step"}
    if not only_step:
        parts += ["--n", *map(str, c.n), "--v", *map(str, c.v)]
        parts += ["--h", *map(str, c.h)] if "fused_linear" in c.ops else []
    if "step" in c.ops:
        parts += ["--preset", c.preset, "--sequences", str(c.sequences), "--group-size", str(c.group_size)]
        parts += ["--seq-len", str(c.seq_len)]
    dtypes, warmup, reps = (c.step_dtypes, c.step_warmup, c.step_reps) if only_step else (c.dtypes, c.warmup, c.reps)
    parts += ["--dtype", *dtypes, "--device", c.device, "--warmup", str(warmup), "--reps", str(reps)]
    parts += ["--impl", *c.impls] if c.impls is not None else []
    parts += ["--temperature", f"{c.temperature:g}"]
    parts += ["--mask-fraction", f"{c.mask_fraction:g}"] if not only_step else []
    parts += ["--seed", str(c.seed)]
    parts += ["--time-budget", f"{c.time_budget:g}"] if c.time_budget is not None else []
    return " ".join(parts + (["--no-memory"] if not c.measure_memory else []))


def build_report(config: BenchConfig, cases: list[dict[str, Any]], *,
                 load_at_start: tuple[float, float, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """The JSON document: schema, command, machine, settings (resolved) and the cases."""
    c = config.resolved()
    settings = {key: getattr(c, key) for key in ("ops", "n", "v", "h", "dtypes", "device", "warmup", "reps", "impls",
                                                 "temperature", "mask_fraction", "seed", "measure_memory")}  # fmt: skip
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    settings["time_budget_s"] = c.time_budget
    settings["timing"] = "CUDA events, L2 flushed per call" if c.device == "cuda" else "time.perf_counter per call"
    settings["forward"] = "under torch.no_grad()"
    settings["upstream_gradient"] = "random normal per token, 0 at masked rows"
    settings["inputs"] = "seeded from --seed and each case's shape alone"
    settings["step"] = None
    if "step" in c.ops:
        settings["step"] = {"preset": c.preset, "sequences": c.sequences, "group_size": c.group_size,
                            "seq_len": c.seq_len, "dtypes": list(c.step_dtypes), "warmup": c.step_warmup,
                            "reps": c.step_reps}  # fmt: skip
    return {"schema": SCHEMA, "command": command_line(c), "machine": machine_info(c.device, load_at_start),
            "settings": settings, "cases": cases}  # fmt: skip


def write_json(report: dict[str, Any], path: str) -> None:
    """Compact JSON (one line per case) so that committed results stay a few KB."""
    head = {k: v for k, v in report.items() if k != "cases"}
    text = json.dumps(head, separators=(",", ":"))[:-1] + ',"cases":[\n'
    text += ",\n".join(json.dumps(c, separators=(",", ":")) for c in report["cases"]) + "\n]}\n"
    with open(path, "w") as fh:
        fh.write(text)


def _ms(t: dict[str, float] | None) -> str:
    return "-" if not t else f"{num(t['median'])} [{num(t['p20'])}-{num(t['p80'])}]"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _mib(x: float | None) -> str:
    return "-" if x is None else num(x / 2**20)


def _title(case: dict[str, Any]) -> str:
    if case["op"] == "step":
        m = case["model"]
        return (
            f"step  {case['preset']} ({m['parameters'] / 1e6:.4g}M params, V={m['vocab_size']}) {case['dtype']} "
            f"{case['device']}, B={case['sequences']} ({case['prompts']} prompts x G={case['group_size']}) x "
            f"L={case['seq_len']} = {case['tokens']} tokens ({case['valid_tokens']} valid, {case['response_tokens']}"
            f" response), T={case['temperature']}"
        )
    if case["op"] == "loss":
        rel = case.get("relative_to")
        tail = f", vs log-prob op at V={rel['v']} {rel['dtype']} ({rel['impl']})" if rel and rel.get("impl") else ""
        return f"loss  N={case['n']} (B={case['b']} x T={case['t']}) fp32 {case['device']}{tail}"
    shape = f"N={case['n']} V={case['v']}" + (f" H={case['h']}" if "h" in case else "")
    masked = "" if case.get("masked_rows") is None else f", {case['masked_rows']} masked rows"
    copy = f", copy {num(case['copy_gbps'])} GB/s" if case.get("copy_gbps") else ""
    return f"{case['op']}  {shape} {case['dtype']} {case['device']}, T={case['temperature']}{masked}{copy}"


def _fit(r: dict) -> str:
    f = r.get("max_fit")
    return "-" if not f else "none" if f["sequences"] is None else f"{f['tokens']}" + "+" * bool(f["bounded"])


def _share(r: dict) -> str:
    ms = r.get("loss_path_ms")
    return "-" if ms is None else f"{num(ms)} ({100 * r['loss_path_fraction']:.0f} %)"


def _pair(r: dict, a: str, b: str) -> str:
    return "-" if r.get(a) is None and r.get(b) is None else f"{_sci(r.get(a))} / {_sci(r.get(b))}"


def _mem(r: dict) -> str:
    ratio = r.get("mem_fwdbwd_vs_logits")
    return _mib(r.get("peak_mem_fwdbwd_bytes")) + ("" if ratio is None else f" ({ratio:.2f}x)")


def _bandwidth(r: dict) -> str:
    gbps, frac = r.get("gbps_fwdbwd"), r.get("copy_fraction_fwdbwd")
    return "-" if gbps is None else num(gbps) + ("" if frac is None else f" ({100 * frac:.0f} %)")


def _fixed(key: str, spec: str, scale: float = 1.0, unit: str = "") -> Any:
    return lambda r: "-" if r.get(key) is None else f"{format(scale * r[key], spec)}{unit}"


STEP_COLUMNS = [
    ("step ms [p20-p80]", lambda r: _ms(r.get("step_ms"))),
    ("loss path ms (%)", _share),
    ("tok/s", lambda r: num(r.get("tokens_per_s"))),
    ("peak MiB", lambda r: _mib(r.get("peak_mem_fwdbwd_bytes"))),
    ("fits, tokens", _fit),
    ("loss", _fixed("loss", ".5g")),
    ("err logp / loss", lambda r: _pair(r, "max_abs_err_logprobs", "max_abs_err_loss")),
    ("grad diff", lambda r: _sci(r.get("grad_rel_diff"))),
]
TIMES = [
    ("fwd ms [p20-p80]", lambda r: _ms(r.get("fwd_ms"))),
    ("fwd+bwd ms [p20-p80]", lambda r: _ms(r.get("fwdbwd_ms"))),
]
ERRORS = ("max err out / grad", lambda r: _pair(r, "max_abs_err", "max_abs_err_grad"))
SPEEDUP = ("x naive", _fixed("speedup_vs_naive_fwdbwd", ".2f"))
COLUMNS = {  # (header, cell(result) -> str) per column after "impl"
    "logprobs": [*TIMES, SPEEDUP, ("GB/s (% copy)", _bandwidth), ("peak MiB (x logits)", _mem), ERRORS],
    "fused_linear": [*TIMES, SPEEDUP, ("TFLOP/s", lambda r: num(r.get("tflops_fwdbwd"))),
                     ("peak MiB (x logits)", _mem), ERRORS],
    "loss": [*TIMES, ("% of log-prob op", _fixed("fraction_of_logprobs_fwdbwd", ".2g", 100, " %")),
             ("peak MiB", lambda r: _mib(r.get("peak_mem_fwdbwd_bytes"))), ERRORS],
    "step": STEP_COLUMNS,
}  # fmt: skip


def case_table(case: dict[str, Any]) -> Table:
    """One case as a table: a row per implementation; skipped ones show why, under the table."""
    from rich.markup import escape
    from rich.table import Table

    columns = COLUMNS[case["op"]]
    table = Table(title=_title(case), title_justify="left", header_style="bold")
    table.add_column("impl", no_wrap=True)
    for header, _ in columns:
        table.add_column(header, justify="right")
    notes = []
    for r in case["results"]:
        if r["status"] != "ok":
            style = "dim" if r["status"] == "skipped" else "red"
            notes.append(f"[{style}]{r['impl']} {r['status']}: {escape(r['reason'])}[/{style}]")
            table.add_row(f"[{style}]{r['impl']}[/{style}]", f"[{style}]{r['status']} (see below)[/{style}]")
            continue
        if r.get("note"):
            notes.append(f"[dim]{r['impl']}: {escape(r['note'])}[/dim]")
        if r.get("compared_with"):
            notes.append(f"[dim]{r['impl']}: grad diff and loss compared with {r['compared_with']}[/dim]")
        table.add_row(r["impl"], *(cell(r) for _, cell in columns))
    if base := case.get("memory_baseline"):
        notes.append(
            f"[dim]peak MiB: forward + backward, above the {_mib(base['total_bytes'])} MiB allocated when a step "
            f"starts (weights {_mib(base['policy_weights_bytes'])}, gradients {_mib(base['policy_grad_bytes'])}, "
            f"AdamW states {_mib(base['optimizer_state_bytes'])}, reference {_mib(base['ref_weights_bytes'])}, "
            f"log-Z head {_mib(base['logz_head_bytes'])}, batch {_mib(base['batch_bytes'])}); the AdamW step itself"
            f" peaks at {_mib(case.get('optimizer_peak_bytes'))} above it[/dim]"
        )
    if case["op"] == "step" and case["device"] != "cuda":
        notes.append("[dim]largest batch: measured on CUDA only (grown until out of memory)[/dim]")
    table.caption, table.caption_justify = "\n".join(notes) or None, "left"
    return table


STEP_LEGEND = (
    "step: reference forward and log-probs (no grad), policy forward and log-probs, \\[log Z,] loss, backward, AdamW "
    "step; model: the backbones alone (no lm_head, no loss); loss path: step - model; tok/s: B L positions per median"
    " step; peak: see below the table; fits: tokens per step of the largest batch that fits, sequences grown at fixed"
    " L until CUDA runs out of memory (+: the search stopped at its limit); err: max |x - float64| of the response "
    "log-probs / of the loss; grad diff: ||g - g_other|| / ||g_other|| over the policy's parameters."
)
OPS_LEGEND = (
    "fwd: forward under no_grad; fwd+bwd: forward + backward with a random per-token gradient; x naive: naive median "
    "/ this median (fwd+bwd); GB/s from the bytes the op must move (K kept of N rows: fwd K V s, fwd+bwd (2K + N) V s)"
    "; % copy: of dst.copy_(logits) on this device; peak: extra tensor memory of fwd+bwd; err: max |x - float64 "
    "reference| of the log-probs / the input gradients."
)


def header_line(report: dict[str, Any]) -> str:
    """The run in one line: device, versions, calls, the machine's load against its cores."""
    m, s = report["machine"], report["settings"]
    calls = f"{s['warmup']} warm-up + {s['reps']} timed calls each"
    if (step := s.get("step")) is not None:
        steps = f"{step['warmup']} warm-up + {step['reps']} timed steps"
        calls = steps if set(s["ops"]) == {"step"} else f"{calls} ({steps} for step)"
    versions = f"torch {m['torch']}, triton {m['triton']}"
    versions += f", transformers {m['transformers']}" if m.get("transformers") else ""
    load = load_text(m)
    return f"{m['device_name']} ({m['device']}), {versions}, {calls}" + (f"; {load}" if load else "")


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]flowloss bench[/bold]  {header_line(report)}", highlight=False)
    for case in report["cases"]:
        console.print(case_table(case))
    ops = {case["op"] for case in report["cases"]}
    if "step" in ops:
        console.print(f"[dim]{STEP_LEGEND}[/dim]")
    if ops - {"step"}:
        console.print(f"[dim]{OPS_LEGEND}[/dim]")

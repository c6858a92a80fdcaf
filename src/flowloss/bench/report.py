"""The run's output: one rich table per case, and the JSON file with every figure and the machine's details."""

from __future__ import annotations

import json
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
    # the versions of what --op step ran with: None unless this process imported them (nothing is imported here)
    for module, dist in (("transformers", "transformers"), ("trl", "trl"), ("liger_kernel", "liger-kernel")):
        try:
            info[module] = metadata.version(dist) if module in sys.modules else None
        except metadata.PackageNotFoundError:
            info[module] = None
    return info


def command_line(config: BenchConfig) -> str:
    """The ``flowloss bench`` command that repeats this run (every default spelled out). A run that mixes
    ``step`` with other ops repeats the other ops' dtype / warm-up / reps; the step's are in ``settings.step``."""
    c = config.resolved()
    parts = ["flowloss bench", "--op", *c.ops]
    only_step = set(c.ops) == {"step"}
    if not only_step:
        parts += ["--n", *map(str, c.n), "--v", *map(str, c.v)]
        if "fused_linear" in c.ops:
            parts += ["--h", *map(str, c.h)]
    if "step" in c.ops:
        parts += ["--preset", c.preset, "--sequences", str(c.sequences), "--group-size", str(c.group_size)]
        parts += ["--seq-len", str(c.seq_len)]
    dtypes, warmup, reps = (c.step_dtypes, c.step_warmup, c.step_reps) if only_step else (c.dtypes, c.warmup, c.reps)
    parts += ["--dtype", *dtypes, "--device", c.device, "--warmup", str(warmup), "--reps", str(reps)]
    if c.impls is not None:
        parts += ["--impl", *c.impls]
    parts += ["--temperature", f"{c.temperature:g}"]
    if not only_step:
        parts += ["--mask-fraction", f"{c.mask_fraction:g}"]
    parts += ["--seed", str(c.seed)]
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
            "step": None
            if "step" not in resolved.ops
            else {
                "preset": resolved.preset,
                "sequences": resolved.sequences,
                "group_size": resolved.group_size,
                "seq_len": resolved.seq_len,
                "dtypes": list(resolved.step_dtypes),
                "warmup": resolved.step_warmup,
                "reps": resolved.step_reps,
            },
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


def _g(x: float) -> str:
    """3 significant digits, without an exponent from 1000 up (1234.5 -> "1234")."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _ms(t: dict[str, float] | None) -> str:
    if not t:
        return "-"
    return f"{_g(t['median'])} [{_g(t['p20'])}-{_g(t['p80'])}]"


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
    copy = f", copy {case['copy_gbps']:.0f} GB/s" if case.get("copy_gbps") else ""
    return f"{case['op']}  {shape} {case['dtype']} {case['device']}, T={case['temperature']}{masked}{copy}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.4g}"


def _fit(r: dict[str, Any]) -> str:
    fit = r.get("max_fit")
    if not fit:
        return "-"
    if fit["sequences"] is None:
        return "none"
    return f"{fit['tokens']}" + ("+" if fit.get("bounded") else "")


def step_table(case: dict[str, Any]) -> Table:
    """The ``step`` case: a row per path (the backbone-only ``model`` row first); skipped ones show why."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=_title(case), title_justify="left", header_style="bold")
    for name, justify in (
        ("impl", "left"),
        ("step ms [p20-p80]", "right"),
        ("loss path ms (%)", "right"),
        ("tok/s", "right"),
        ("peak MiB", "right"),
        ("fits, tokens", "right"),
        ("loss", "right"),
        ("err logp / loss", "right"),
        ("grad diff", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=name == "impl")
    notes = []
    for r in case["results"]:
        if r["status"] != "ok":
            style = "dim" if r["status"] == "skipped" else "red"
            notes.append(f"[{style}]{r['impl']} {r['status']}: {escape(r['reason'])}[/{style}]")
            table.add_row(f"[{style}]{r['impl']}[/{style}]", f"[{style}]{r['status']} (see below)[/{style}]")
            continue
        if r.get("note"):
            notes.append(f"[dim]{r['impl']}: {escape(r['note'])}[/dim]")
        share = "-"
        if r.get("loss_path_ms") is not None:
            share = f"{_g(r['loss_path_ms'])} ({100 * r['loss_path_fraction']:.0f} %)"
        err = "-"
        if r.get("max_abs_err_logprobs") is not None or r.get("max_abs_err_loss") is not None:
            err = f"{_num(r.get('max_abs_err_logprobs'), '.1e')} / {_num(r.get('max_abs_err_loss'), '.1e')}"
        grad = "-" if r.get("grad_rel_diff") is None else f"{r['grad_rel_diff']:.1e}"
        if r.get("compared_with"):
            notes.append(f"[dim]{r['impl']}: grad diff and loss compared with {r['compared_with']}[/dim]")
        table.add_row(
            r["impl"],
            _ms(r.get("step_ms")),
            share,
            _num(r.get("tokens_per_s"), ",.0f"),
            _mib(r.get("peak_mem_fwdbwd_bytes")),
            _fit(r),
            _num(r.get("loss"), ".5g"),
            err,
            grad,
        )
    base = case.get("memory_baseline") or {}
    if base:
        notes.append(
            f"[dim]peak MiB: forward + backward, above the {_mib(base['total_bytes'])} MiB allocated when a step "
            f"starts (weights {_mib(base['policy_weights_bytes'])}, gradients {_mib(base['policy_grad_bytes'])}, "
            f"AdamW states {_mib(base['optimizer_state_bytes'])}, reference {_mib(base['ref_weights_bytes'])}, "
            f"log-Z head {_mib(base['logz_head_bytes'])}, batch {_mib(base['batch_bytes'])}); the AdamW step itself"
            f" peaks at {_mib(case.get('optimizer_peak_bytes'))} above it[/dim]"
        )
    if case["device"] != "cuda":
        notes.append("[dim]largest batch: measured on CUDA only (grown until out of memory)[/dim]")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def case_table(case: dict[str, Any]) -> Table:
    """One case as a table: a row per implementation; skipped ones show why."""
    from rich.markup import escape
    from rich.table import Table

    op = case["op"]
    if op == "step":
        return step_table(case)
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
    calls = f"{s['warmup']} warm-up + {s['reps']} timed calls each"
    step = s.get("step")
    if step is not None:
        steps = f"{step['warmup']} warm-up + {step['reps']} timed steps"
        calls = steps if set(s["ops"]) == {"step"} else f"{calls} ({steps} for step)"
    versions = f"torch {m['torch']}, triton {m['triton']}" + (
        f", transformers {m['transformers']}" if m.get("transformers") else ""
    )
    console.print(
        f"[bold]flowloss bench[/bold]  {m['device_name']} ({m['device']}), {versions}, {calls}"
        + ("" if m.get("load_average_1min") is None else f", load average {m['load_average_1min']:.2f}"),
        highlight=False,
    )
    for case in report["cases"]:
        console.print(case_table(case))
    if any(case["op"] == "step" for case in report["cases"]):
        console.print(
            "[dim]step: reference forward and log-probs (no grad), policy forward and log-probs, \\[log Z,] loss, "
            "backward, AdamW step; model: the backbones alone (no lm_head, no loss); loss path: step - model; "
            "tok/s: B L positions per median step; peak: see below the table; fits: tokens per step of the largest "
            "batch that fits, sequences grown at fixed L until CUDA runs out of memory (+: the search stopped at its "
            "limit); err: max |x - float64| of the response log-probs / of the loss; grad diff: ||g - g_other|| / "
            "||g_other|| over the policy's parameters.[/dim]"
        )
    if all(case["op"] == "step" for case in report["cases"]):
        return
    console.print(
        "[dim]fwd: forward under no_grad; fwd+bwd: forward + backward with a random per-token gradient; "
        "x naive: naive median / this median (fwd+bwd); GB/s from the bytes the op must move "
        "(K kept of N rows: fwd K V s, fwd+bwd (2K + N) V s); "
        "% copy: of dst.copy_(logits) on this device; peak: extra tensor memory of fwd+bwd; "
        "err: max |x - float64 reference| of the log-probs / the input gradients.[/dim]"
    )

"""``--plot PATH``: a PNG of forward + backward time and peak extra memory per implementation, one row per case.

Linear axes from zero, every value printed on its bar in readable numbers (``1,830``, not ``1.83e+03``), memory
against a "1x logits" reference line, a title that states the result, and a footer with the machine, its load
and core count; sized for the docs' text column (720 px wide). A ``step`` case shows each path's step time split
into the backbone's share (the ``model`` row, hatched) and the loss path's, and its peak memory in MiB above the
step's baseline. matplotlib comes with the ``cli`` extra; without it `write_plot` raises ``ImportError`` saying so.

``python -m flowloss.bench.plot RUN.json OUT.png`` redraws the plot of a saved ``--json`` run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from flowloss.bench.report import load_text, num

FLOWLOSS = "#0072B2"  # flowloss's implementations
NAIVE = "#555555"  # the naive baseline
OTHER = "#B8B8B8"  # everything else
LABEL = {"xytext": (4, 0), "textcoords": "offset points", "va": "center", "fontsize": 8.5}


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "--plot needs matplotlib, part of the 'cli' extra: pip install -e \".[cli]\" in a clone of flowloss "
            "(or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(case: dict[str, Any]) -> str:
    if case["op"] == "step":
        return f"step  {case['preset']} B={case['sequences']} L={case['seq_len']} {case['dtype']} {case['device']}"
    shape = f"N={case['n']} V={case['v']}" + (f" H={case['h']}" if "h" in case else "")
    return f"{case['op']}  {shape} {case['dtype']} {case['device']}"


def _color(impl: str) -> str:
    return FLOWLOSS if impl.startswith("flowloss") else NAIVE if impl == "naive" else OTHER


def _headline(cases: list[dict[str, Any]]) -> str:
    """The takeaway of the first op case where a flowloss implementation and naive both ran, else of the first step
    case where a flowloss path and the GRPO path both ran."""
    for case in cases:
        ran = {r["impl"]: r for r in case["results"] if r["status"] == "ok"}
        ours = [r for name, r in ran.items() if name.startswith("flowloss")]
        if case["op"] != "step" and "naive" in ran and ours:
            best, naive = ours[0], ran["naive"]
            text = f"{best['impl']}: {best['speedup_vs_naive_fwdbwd']:.2f}x naive's speed"
            if best.get("mem_fwdbwd_vs_logits") is not None and naive.get("mem_fwdbwd_vs_logits") is not None:
                text += (f" in {best['mem_fwdbwd_vs_logits']:.2f}x the logits' memory "
                         f"(naive: {naive['mem_fwdbwd_vs_logits']:.2f}x)")  # fmt: skip
            return text + f"\n{_label(case)}, forward + backward"
    for case in cases:
        ran = {r["impl"]: r for r in case["results"] if r["status"] == "ok"}
        ours = [r for name, r in ran.items() if name.startswith("flowloss")]
        if case["op"] == "step" and "grpo-logits" in ran and ours:
            base, best = ran["grpo-logits"], min(ours, key=lambda r: r["step_ms"]["median"])
            text = f"{best['impl']}: {base['step_ms']['median'] / best['step_ms']['median']:.2f}x the GRPO path's speed"
            if best.get("peak_mem_fwdbwd_bytes") and base.get("peak_mem_fwdbwd_bytes"):
                text += f", {best['peak_mem_fwdbwd_bytes'] / base['peak_mem_fwdbwd_bytes']:.2f}x its peak memory"
            return text + f"\n{_label(case)}, one update"
    return "forward + backward time and peak extra memory per implementation"


def _row(ax_t, ax_m, case: dict[str, Any]) -> None:
    """One case: time bars (median, p20-p80 whiskers; a step's backbone share hatched) and memory bars."""
    step = case["op"] == "step"
    key = "step_ms" if step else "fwdbwd_ms"
    ran = [r for r in case["results"] if r["status"] == "ok" and r.get(key)]
    names, ys = [r["impl"] for r in ran], range(len(ran))
    colors = [_color(n) for n in names]
    med = [r[key]["median"] for r in ran]
    err = [[m - r[key]["p20"] for m, r in zip(med, ran)], [r[key]["p80"] - m for m, r in zip(med, ran)]]
    base = [0.0] * len(ran)
    if step and (model := next((r for r in ran if r["impl"] == "model"), None)):
        base = [0.0 if n == "model" else min(model[key]["median"], m) for n, m in zip(names, med)]
        ax_t.barh(ys, base, color=colors, alpha=0.35, hatch="//", edgecolor=colors)
    ax_t.barh(ys, [m - b for m, b in zip(med, base)], left=base, color=colors, xerr=err,
              error_kw={"elinewidth": 0.8, "capsize": 2})  # fmt: skip
    for y, m, r in zip(ys, med, ran):
        extra = r.get("loss_path_ms") if step else r.get("speedup_vs_naive_fwdbwd")
        text = num(m) + ("" if extra is None else f" (loss path {num(extra)})" if step else f" ({extra:.2f}x)")
        ax_t.annotate(text, (r[key]["p80"], y), **LABEL)
    ax_t.set_xlim(0, (1.6 if step else 1.45) * max(r[key]["p80"] for r in ran))
    ax_t.set_yticks(list(ys), names)
    ax_t.invert_yaxis()
    what = "one update, ms (hatched: the backbone alone)" if step else "forward + backward, ms (x naive's speed)"
    ax_t.set_title(f"{_label(case)}\n{what}", loc="left")
    ax_m.set_yticks(list(ys), [""] * len(ran))
    mem_title = "peak MiB above weights, grads, AdamW" if step else "peak extra memory, x the logits"
    ax_m.set_title(f"\n{mem_title}", loc="left")
    mem = [r.get("peak_mem_fwdbwd_bytes") for r in ran]
    if all(x is None for x in mem):
        ax_m.text(0.5, 0.5, "memory not measured (--no-memory)", ha="center", va="center", transform=ax_m.transAxes)
        ax_m.set_xticks([])
        return
    vals = [0.0 if x is None else x / 2**20 if step else r["mem_fwdbwd_vs_logits"] for x, r in zip(mem, ran)]
    ax_m.barh(ys, vals, color=colors)
    for y, x, v in zip(ys, mem, vals):
        text = "not measured" if x is None else num(v) if step else f"{v:.2f}x ({num(x / 2**20)} MiB)"
        ax_m.annotate(text, (v, y), bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5}, **LABEL)
    ax_m.set_xlim(0, (1.4 if step else 1.5) * max(1.0, *vals))
    if step:
        ax_m.set_ylim(len(ran) - 0.5, -0.5)
    else:
        ax_m.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax_m.text(1.0, -0.75, "1x logits", ha="center", va="bottom", fontsize=8.5)
        ax_m.set_ylim(len(ran) - 0.5, -1.0)


def _footer(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"{m['device_name']} ({m['device']}), torch {m['torch']}; bars: median, whiskers: p20-p80"]
    if load := load_text(m):
        lines.append(load)
    losses = []
    for case in report["cases"]:
        for r in case["results"] if case["op"] == "loss" else ():
            if r["status"] == "ok" and r.get("fwdbwd_ms"):
                frac = r.get("fraction_of_logprobs_fwdbwd")
                share = "" if frac is None else f" = {100 * frac:.2g} % of the log-prob op"
                losses.append(f"loss ({r['impl']}) at N={case['n']}: {num(r['fwdbwd_ms']['median'])} ms{share}")
    return "\n".join(lines + (["; ".join(losses)] if losses else []))


def figure(report: dict[str, Any]):
    """The matplotlib figure of a report: one row per op / step case with a result, two panels each."""
    plt = _require_matplotlib()
    cases = [c for c in report["cases"] if c["op"] != "loss" and any(r["status"] == "ok" for r in c["results"])]
    heights = [0.9 + 0.32 * sum(r["status"] == "ok" for r in c["results"]) for c in cases] or [1.0]
    style = {"font.size": 9.5, "axes.titlesize": 9.5, "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(style):
        fig, axes = plt.subplots(len(heights), 2, figsize=(7.2, sum(heights) + 1.5), squeeze=False,
                                 layout="constrained", gridspec_kw={"height_ratios": heights})  # fmt: skip
        for (ax_t, ax_m), case in zip(axes, cases):
            _row(ax_t, ax_m, case)
        fig.suptitle(_headline(cases), fontsize=10.5)
        fig.supxlabel(_footer(report), fontsize=8.5)
    return fig


def write_plot(report: dict[str, Any], path: str) -> None:
    fig = figure(report)
    fig.savefig(path, dpi=100, metadata={"Software": None}, pil_kwargs={"optimize": True})
    _require_matplotlib().close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m flowloss.bench.plot RUN.json OUT.png``: the plot of a run saved with ``--json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m flowloss.bench.plot RUN.json OUT.png", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as fh:
        write_plot(json.load(fh), args[1])
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

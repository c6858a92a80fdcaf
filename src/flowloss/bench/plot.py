"""``--plot PATH``: a PNG of forward + backward time and peak extra memory per implementation, one row per case.

Linear axes from zero, every value printed on its bar, memory against a "1x logits" reference line, and a title
that states the result; sized for the docs' text column (720 px wide). matplotlib comes with the ``cli`` extra
(``pip install -e ".[cli]"``); without it `write_plot` raises ``ImportError`` saying so.

A ``step`` case (one whole RL update per loss path) shows each path's step time split into the backbone's share
(the ``model`` row's median, hatched) and the loss path's (the rest), and its peak memory in MiB above the step's
baseline (weights, gradients, AdamW states).

``python -m flowloss.bench.plot RUN.json OUT.png`` redraws the plot of a saved ``--json`` run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

FLOWLOSS = "#0072B2"  # flowloss's implementations
NAIVE = "#555555"  # the naive baseline
OTHER = "#B8B8B8"  # everything else


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


def _step_headline(case: dict[str, Any]) -> str | None:
    ran = {r["impl"]: r for r in case["results"] if r["status"] == "ok"}
    ours = [r for name, r in ran.items() if name.startswith("flowloss")]
    if "grpo-logits" not in ran or not ours:
        return None
    base = ran["grpo-logits"]
    best = min(ours, key=lambda r: r["step_ms"]["median"])
    text = f"{best['impl']}: {base['step_ms']['median'] / best['step_ms']['median']:.2f}x the GRPO path's speed"
    if best.get("peak_mem_fwdbwd_bytes") and base.get("peak_mem_fwdbwd_bytes"):
        text += f", {best['peak_mem_fwdbwd_bytes'] / base['peak_mem_fwdbwd_bytes']:.2f}x its peak memory"
    return text + f"\n{_label(case)}, one update"


def _headline(cases: list[dict[str, Any]]) -> str:
    """The takeaway of the first log-prob case where a flowloss implementation and naive both ran (or of the
    first step case, when there is no log-prob case)."""
    for case in cases:
        if case["op"] == "step":
            continue
        ran = {r["impl"]: r for r in case["results"] if r["status"] == "ok"}
        ours = [r for name, r in ran.items() if name.startswith("flowloss")]
        if "naive" not in ran or not ours:
            continue
        best, naive = ours[0], ran["naive"]
        text = f"{best['impl']}: {best['speedup_vs_naive_fwdbwd']:.2f}x naive's speed"
        if best.get("mem_fwdbwd_vs_logits") is not None and naive.get("mem_fwdbwd_vs_logits") is not None:
            text += (
                f" in {best['mem_fwdbwd_vs_logits']:.2f}x the logits' memory "
                f"(naive: {naive['mem_fwdbwd_vs_logits']:.2f}x)"
            )
        return text + f"\n{_label(case)}, forward + backward"
    for case in cases:
        if case["op"] == "step" and (line := _step_headline(case)):
            return line
    return "forward + backward time and peak extra memory per implementation"


def _step_row(ax_t, ax_m, case: dict[str, Any]) -> None:
    """A step case: time split into backbone (hatched) and loss path; peak MiB above the step's baseline."""
    ran = [r for r in case["results"] if r["status"] == "ok" and r.get("step_ms")]
    names = [r["impl"] for r in ran]
    ys = range(len(ran))
    colors = [_color(n) for n in names]
    med = [r["step_ms"]["median"] for r in ran]
    model_ms = next((r["step_ms"]["median"] for r in ran if r["impl"] == "model"), None)
    err = [[m - r["step_ms"]["p20"] for m, r in zip(med, ran)], [r["step_ms"]["p80"] - m for m, r in zip(med, ran)]]
    base = [min(model_ms, m) if model_ms is not None and n != "model" else 0.0 for n, m in zip(names, med)]
    ax_t.barh(ys, base, color=colors, alpha=0.35, hatch="//", edgecolor=colors)
    ax_t.barh(ys, [m - b for m, b in zip(med, base)], left=base, color=colors, xerr=err,
              error_kw={"elinewidth": 0.8, "capsize": 2})
    for y, m, r in zip(ys, med, ran):
        text = f"{m:.3g}"
        if r.get("loss_path_ms") is not None:
            text += f" (loss path {r['loss_path_ms']:.3g})"
        ax_t.annotate(text, (r["step_ms"]["p80"], y), xytext=(4, 0), textcoords="offset points", va="center",
                      fontsize=8.5)
    ax_t.set_xlim(0, 1.6 * max(r["step_ms"]["p80"] for r in ran))
    ax_t.set_yticks(list(ys), names)
    ax_t.invert_yaxis()
    ax_t.set_title(f"{_label(case)}\none update, ms (hatched: the backbone alone)", loc="left")
    mem = [r.get("peak_mem_fwdbwd_bytes") for r in ran]
    if any(x is not None for x in mem):
        vals = [0.0 if x is None else x / 2**20 for x in mem]
        ax_m.barh(ys, vals, color=colors)
        for y, x in zip(ys, mem):
            ax_m.annotate("not measured" if x is None else f"{x / 2**20:.4g}", (0 if x is None else x / 2**20, y),
                          xytext=(4, 0), textcoords="offset points", va="center", fontsize=8.5)
        ax_m.set_xlim(0, 1.4 * max(1.0, *vals))
        ax_m.set_ylim(len(ran) - 0.5, -0.5)
    ax_m.set_yticks(list(ys), [""] * len(ran))
    ax_m.set_title("\npeak MiB above weights, grads, AdamW", loc="left")


def _loss_line(report: dict[str, Any]) -> str:
    parts = []
    for case in report["cases"]:
        if case["op"] != "loss":
            continue
        for r in case["results"]:
            frac = r.get("fraction_of_logprobs_fwdbwd")
            if r["status"] == "ok" and r.get("fwdbwd_ms"):
                share = "" if frac is None else f" = {100 * frac:.2g} % of the log-prob op"
                parts.append(f"loss at N={case['n']}: {r['fwdbwd_ms']['median']:.3g} ms{share}")
    return "; ".join(parts)


def write_plot(report: dict[str, Any], path: str) -> None:
    """One row per log-prob / fused case: time (left) and memory (right), a bar per implementation that ran."""
    plt = _require_matplotlib()
    cases = [c for c in report["cases"] if c["op"] != "loss" and any(r["status"] == "ok" for r in c["results"])]
    heights = [0.9 + 0.32 * sum(r["status"] == "ok" for r in c["results"]) for c in cases] or [1.0]
    style = {"font.size": 9.5, "axes.titlesize": 9.5, "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(style):
        fig, axes = plt.subplots(
            len(heights), 2, figsize=(7.2, sum(heights) + 1.3), squeeze=False, layout="constrained",
            gridspec_kw={"height_ratios": heights},
        )
        for (ax_t, ax_m), case in zip(axes, cases):
            if case["op"] == "step":
                _step_row(ax_t, ax_m, case)
                continue
            ran = [r for r in case["results"] if r["status"] == "ok"]
            names = [r["impl"] for r in ran]
            ys = range(len(ran))
            colors = [_color(n) for n in names]
            med = [r["fwdbwd_ms"]["median"] for r in ran]
            err = [[m - r["fwdbwd_ms"]["p20"] for m, r in zip(med, ran)],
                   [r["fwdbwd_ms"]["p80"] - m for m, r in zip(med, ran)]]
            ax_t.barh(ys, med, color=colors, xerr=err, error_kw={"elinewidth": 0.8, "capsize": 2})
            for y, m, r in zip(ys, med, ran):
                speed = r.get("speedup_vs_naive_fwdbwd")
                text = f"{m:.3g}" + ("" if speed is None else f" ({speed:.2f}x)")
                ax_t.annotate(text, (r["fwdbwd_ms"]["p80"], y), xytext=(4, 0), textcoords="offset points",
                              va="center", fontsize=8.5)
            ax_t.set_xlim(0, 1.45 * max(r["fwdbwd_ms"]["p80"] for r in ran))
            ax_t.set_yticks(list(ys), names)
            ax_t.invert_yaxis()
            ax_t.set_title(f"{_label(case)}\nforward + backward, ms (x naive's speed)", loc="left")

            mem = [r.get("mem_fwdbwd_vs_logits") for r in ran]
            if any(x is not None for x in mem):
                vals = [0.0 if x is None else x for x in mem]
                ax_m.barh(ys, vals, color=colors)
                for y, x, r in zip(ys, mem, ran):
                    mib = r.get("peak_mem_fwdbwd_bytes")
                    text = "not measured" if x is None else f"{x:.2f}x" + (
                        "" if mib is None else f" ({mib / 2**20:.0f} MiB)"
                    )
                    ax_m.annotate(text, (0 if x is None else x, y), xytext=(4, 0), textcoords="offset points",
                                  va="center", fontsize=8.5,
                                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
                ax_m.axvline(1.0, color="black", linestyle="--", linewidth=1)
                ax_m.text(1.0, -0.75, "1x logits", ha="center", va="bottom", fontsize=8.5)
                ax_m.set_xlim(0, 1.5 * max(1.0, *vals))
                ax_m.set_ylim(len(ran) - 0.5, -1.0)
            else:
                ax_m.text(0.5, 0.5, "memory not measured (--no-memory)", ha="center", va="center",
                          transform=ax_m.transAxes)
                ax_m.set_xticks([])
            ax_m.set_yticks(list(ys), [""] * len(ran))
            ax_m.set_title("\npeak extra memory, x the logits", loc="left")
        m = report["machine"]
        footer = f"{m['device_name']} ({m['device']}), torch {m['torch']}; bars: median, whiskers: p20-p80"
        loss = _loss_line(report)
        fig.suptitle(_headline(cases), fontsize=10.5)
        fig.supxlabel(footer + ("\n" + loss if loss else ""), fontsize=8.5)
        fig.savefig(path, dpi=100, metadata={"Software": None}, pil_kwargs={"optimize": True})
        plt.close(fig)


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

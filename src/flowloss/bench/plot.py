"""``--plot PATH``: a PNG with forward + backward time and peak extra memory per implementation, per case.

A ``step`` case plots each path's whole-step time, split into the backbone's share (the ``model`` row's median,
hatched) and the loss path's (the rest), and its peak memory above the step's baseline.

matplotlib is optional (``pip install 'flowloss[plot]'``); without it `write_plot` raises ``ImportError``
with that instruction.
"""

from __future__ import annotations

from typing import Any


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("--plot needs matplotlib: pip install 'flowloss[plot]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(case: dict[str, Any]) -> str:
    if case["op"] == "step":
        return f"step {case['dtype']}\n{case['preset']}\nB={case['sequences']} L={case['seq_len']}"
    if case["op"] == "loss":
        return f"loss\nN={case['n']}"
    shape = f"N={case['n']}\nV={case['v']}" + (f" H={case['h']}" if "h" in case else "")
    return f"{case['op']} {case['dtype']}\n{shape}"


def write_plot(report: dict[str, Any], path: str) -> None:
    """Grouped bars: one group per log-prob / fused case, one bar per implementation that ran."""
    plt = _require_matplotlib()
    seen_loss: set[int] = set()
    cases = []
    for case in report["cases"]:
        if case["op"] == "loss":
            if case["n"] in seen_loss:
                continue
            seen_loss.add(case["n"])
        cases.append(case)
    impls = list(dict.fromkeys(r["impl"] for c in cases for r in c["results"] if r["status"] == "ok"))
    colors = {name: f"C{k % 10}" for k, name in enumerate(impls)}
    steps_only = all(c["op"] == "step" for c in cases)
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(6.0, 1.8 * len(cases) + 3), 7.5), constrained_layout=True)
    labelled: set[str] = set()
    for i, case in enumerate(cases):
        ran = [r for r in case["results"] if r["status"] == "ok"]
        width = 0.8 / max(len(ran), 1)
        model_ms = next((r["step_ms"]["median"] for r in ran if r["impl"] == "model" and "step_ms" in r), None)
        for k, r in enumerate(ran):
            x = i + (k - (len(ran) - 1) / 2) * width
            t = r.get("fwdbwd_ms") or r.get("step_ms")
            if t is None:
                continue
            label = None if r["impl"] in labelled else r["impl"]
            labelled.add(r["impl"])
            err = [[t["median"] - t["p20"]], [t["p80"] - t["median"]]]
            color = colors[r["impl"]]
            if case["op"] == "step" and model_ms is not None and r["impl"] != "model":
                # the backbone's share (the model row's median), then the loss path on top
                base = min(model_ms, t["median"])
                ax_t.bar(x, base, width, color=color, alpha=0.35, hatch="//", edgecolor=color)
                ax_t.bar(x, t["median"] - base, width, bottom=base, yerr=err, capsize=2, color=color, label=label)
            else:
                ax_t.bar(x, t["median"], width, yerr=err, capsize=2, color=color, label=label)
            mem = r.get("peak_mem_fwdbwd_bytes", r.get("peak_mem_bytes"))
            if mem is not None:
                ax_m.bar(x, mem / 2**20, width, color=color)
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(cases)), [_label(c) for c in cases], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if steps_only:
        ax_t.set_ylabel("one update, ms (median, p20-p80)\nhatched: the backbone (model row)")
        ax_m.set_ylabel("peak MiB of forward + backward\nabove weights, gradients, AdamW")
    else:
        ax_t.set_ylabel("forward + backward (step: one update), ms")
        ax_t.set_yscale("log")
        ax_m.set_ylabel("peak extra memory, MiB (fwd+bwd; step: one update)")
    if impls:
        ax_t.legend(fontsize=8, ncols=min(len(impls), 4))
    m = report["machine"]
    fig.suptitle(f"flowloss bench - {m['device_name']} - torch {m['torch']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)

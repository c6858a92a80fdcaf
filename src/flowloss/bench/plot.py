"""``--plot PATH``: a PNG with forward + backward time and peak extra memory per implementation, per case.

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
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(6.0, 1.8 * len(cases) + 3), 7.5), constrained_layout=True)
    labelled: set[str] = set()
    for i, case in enumerate(cases):
        ran = [r for r in case["results"] if r["status"] == "ok"]
        width = 0.8 / max(len(ran), 1)
        for k, r in enumerate(ran):
            x = i + (k - (len(ran) - 1) / 2) * width
            t = r["fwdbwd_ms"]
            label = None if r["impl"] in labelled else r["impl"]
            labelled.add(r["impl"])
            err = [[t["median"] - t["p20"]], [t["p80"] - t["median"]]]
            ax_t.bar(x, t["median"], width, yerr=err, capsize=2, color=colors[r["impl"]], label=label)
            if r.get("peak_mem_fwdbwd_bytes") is not None:
                ax_m.bar(x, r["peak_mem_fwdbwd_bytes"] / 2**20, width, color=colors[r["impl"]])
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(cases)), [_label(c) for c in cases], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax_t.set_ylabel("forward + backward, ms (median, p20-p80)")
    ax_t.set_yscale("log")
    ax_m.set_ylabel("peak extra memory, MiB (fwd+bwd)")
    if impls:
        ax_t.legend(fontsize=8, ncols=min(len(impls), 4))
    m = report["machine"]
    fig.suptitle(f"flowloss bench - {m['device_name']} - torch {m['torch']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Present a `DemoResult`: a rich table, a PNG plot, a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from flowloss.demo.train import DemoResult, MethodResult

if TYPE_CHECKING:  # rich and matplotlib come with the 'cli' extra: imported where they draw
    from rich.console import Console
    from rich.table import Table


def _rows(result: DemoResult) -> list[MethodResult]:
    return [result.target, result.reference, *result.methods]


def results_table(result: DemoResult) -> Table:
    """One row per method (and ``p*``, ``pi_ref``): exact KLs, mode masses, coverage, reward, diversity."""
    from rich.markup import escape
    from rich.table import Table

    config = result.config
    num_modes = len(config.heights)
    table = Table(
        title=(
            f"Distribution matching vs reward maximization: V={config.vocab_size}, L={config.length}, "
            f"beta={config.beta:g}, {config.steps} steps x {config.groups * config.group_size} samples, "
            f"seed {config.seed}"
        ),
        caption=(
            f"mode m: pi(y^m) (target p*(y^m)); covered: modes with pi(y^m) >= "
            f"{config.coverage_fraction:g} p*(y^m); distinct: distinct sequences in {config.eval_samples} "
            f"samples; log Z true = {result.log_z_true:.3f}"
        ),
    )
    table.add_column("method", no_wrap=True)
    table.add_column("KL(pi||p*)", justify="right")
    table.add_column("KL(p*||pi)", justify="right")
    for m, h in enumerate(config.heights):
        table.add_column(f"mode {m} (r={h:g})", justify="right")
    table.add_column("covered", justify="right")
    table.add_column(escape("E[r]"), justify="right")
    table.add_column("distinct", justify="right")
    table.add_column("log Z", justify="right")
    target_mass = result.target.mode_mass
    for row in _rows(result):
        masses = [f"{row.mode_mass[m]:.3f}" for m in range(num_modes)]
        if row is not result.target:
            masses = [f"{row.mode_mass[m]:.3f} ({target_mass[m]:.3f})" for m in range(num_modes)]
        table.add_row(
            row.label,
            f"{row.kl_pi_target:.3f}",
            f"{row.kl_target_pi:.3f}",
            *masses,
            f"{row.modes_covered}/{num_modes}",
            f"{row.mean_reward:.3f}",
            str(row.distinct_sequences),
            "" if row.log_z is None else f"{row.log_z:.3f}",
        )
    return table


def print_table(result: DemoResult, console: Console | None = None) -> None:
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(results_table(result))


def write_json(result: DemoResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return path


# One color per method, told apart without relying on hue alone (Okabe-Ito palette); the target is drawn in black.
METHOD_COLORS: dict[str, str] = {
    "flowrl": "#E69F00",  # orange: FlowRL on z-scored rewards
    "flowrl-raw": "#0072B2",  # blue: FlowRL on raw rewards
    "grpo": "#D55E00",  # vermillion: the GRPO baseline
    "reverse-kl": "#009E73",  # green: the reverse-KL surrogate
}
# What each method aims at, in one line under its panel title: why it lands where it does.
METHOD_NOTES: dict[str, str] = {
    "flowrl": "z-score moves with the policy: p* not a fixed point",
    "flowrl-raw": "raw rewards: p* is its fixed point (Prop. 1)",
    "grpo": "maximizes reward: no target distribution",
    "reverse-kl": "score-function form of the same gradient",
}


def _takeaway(result: DemoResult) -> str:
    """The figure's title: what the run shows, in the run's own numbers."""
    by_method = {row.method: row for row in result.methods}
    num_modes = len(result.config.heights)
    matching = [by_method[m] for m in ("flowrl-raw", "reverse-kl", "flowrl") if m in by_method]
    parts = []
    if matching:  # FlowRL on raw rewards when it ran: the variant whose target is exactly p*
        best = matching[0]
        parts.append(f"{best.label} covers {best.modes_covered}/{num_modes} modes (KL {best.kl_pi_target:.2f})")
    if "grpo" in by_method:
        grpo = by_method["grpo"]
        parts.append(f"GRPO puts {max(grpo.mode_mass):.1%} of its mass on one mode")
    return "; ".join(parts) if parts else "Distribution matching vs reward maximization"


def write_plot(result: DemoResult, path: str | Path, *, dpi: int = 100) -> Path:
    """Mass per mode for each method against the target p* (one small panel each), and exact KL(pi || p*)
    over training. Sized for the docs' text column: 720 px wide at the default dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = result.config
    num_modes = len(config.heights)
    target = result.target.mode_mass
    methods = result.methods
    cols = 2 if len(methods) > 1 else 1
    rows = -(-len(methods) // cols)
    with plt.rc_context({"font.size": 10, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False}):
        fig = plt.figure(figsize=(7.2, 2.3 * rows + 3.0), layout="constrained")
        grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [1.25])
        xs = range(num_modes)
        for k, row in enumerate(methods):
            ax = fig.add_subplot(grid[k // cols, k % cols])
            color = METHOD_COLORS.get(row.method, f"C{k}")
            ax.bar(xs, row.mode_mass, width=0.6, color=color)
            # The target: a black line across each bar's slot. Both values, named, go under the slot (a number
            # printed above the bar and the line read as the target's).
            ax.hlines(target, [x - 0.4 for x in xs], [x + 0.4 for x in xs], color="black", linewidth=1.8)
            top = max(*target, *row.mode_mass)
            ax.set_ylim(0, 1.12 * top)  # each panel on its own scale: the black lines mark the same p*
            ticks = [f"r={h:g}\n\u03c0 {mass:.2f}\np* {goal:.2f}"
                     for h, mass, goal in zip(config.heights, row.mode_mass, target)]
            ax.set_xticks(list(xs), ticks, fontsize=8.5)
            ax.set_title(
                f"{row.label}: KL {row.kl_pi_target:.2f}, {row.modes_covered}/{num_modes} modes\n"
                f"{METHOD_NOTES.get(row.method, '')}",
                fontsize=9.5,
            )
            if k % cols == 0:
                ax.set_ylabel("mass of the mode")
        ax_kl = fig.add_subplot(grid[rows, :])
        last_step, top = 0.0, 0.0
        for k, row in enumerate(methods):
            color = METHOD_COLORS.get(row.method, f"C{k}")
            ax_kl.plot(row.history["step"], row.history["kl_pi_target"], color=color, linewidth=2, label=row.label)
            last_step = max(last_step, row.history["step"][-1])
            top = max(top, *row.history["kl_pi_target"])
        # Final values at the right end of each curve, nudged apart where two curves end close together.
        ends = sorted((row.history["kl_pi_target"][-1], k, row) for k, row in enumerate(methods))
        placed: list[float] = []
        for value, k, row in ends:
            y = max(value, placed[-1] + 0.07 * top) if placed else value
            placed.append(y)
            ax_kl.annotate(f"{value:.2f}", (row.history["step"][-1], value), xytext=(last_step * 1.01, y),
                           va="center", fontsize=9, color=METHOD_COLORS.get(row.method, f"C{k}"))
        ax_kl.axhline(0, color="black", linewidth=1.8)
        ax_kl.text(last_step * 0.01, 0.02 * top, "0 = the target p*", va="bottom", ha="left", fontsize=9)
        ax_kl.set_xlim(0, last_step * 1.09)
        ax_kl.set_ylim(0, 1.08 * top)
        ax_kl.set_xlabel("training step")
        ax_kl.set_ylabel("KL(pi || p*), exact")
        ax_kl.set_title("Distance to the target during training")
        ax_kl.legend(fontsize=9, frameon=False, loc="center right", bbox_to_anchor=(0.92, 0.55))
        ax_kl.grid(axis="y", alpha=0.3)
        fig.suptitle(
            f"{_takeaway(result)}\n"
            f"black lines: the target p*; beta={config.beta:g}, {config.steps} steps, seed {config.seed}",
            fontsize=10.5,
        )
        fig.savefig(path, dpi=dpi, metadata={"Software": None}, pil_kwargs={"optimize": True})
        plt.close(fig)
    return path

"""Present a `DemoResult`: a rich table, a PNG plot, a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flowloss.demo.train import DemoResult, MethodResult


def _rows(result: DemoResult) -> list[MethodResult]:
    return [result.target, result.reference, *result.methods]


def results_table(result: DemoResult) -> Table:
    """One row per method (and ``p*``, ``pi_ref``): exact KLs, mode masses, coverage, reward, diversity."""
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
    (console or Console()).print(results_table(result))


def write_json(result: DemoResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return path


def write_plot(result: DemoResult, path: str | Path, *, dpi: int = 80) -> Path:
    """Two panels: probability mass per mode vs the target (bars), exact KL(pi || p*) over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = result.config
    num_modes = len(config.heights)
    bars = [result.target, *result.methods]
    fig, (ax_mass, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.0), gridspec_kw={"width_ratios": [1.2, 1]})
    width = 0.8 / len(bars)
    colors = ["black", "tab:blue", "tab:cyan", "tab:red", "tab:green", "tab:purple"]
    for j, row in enumerate(bars):
        xs = [m + (j - (len(bars) - 1) / 2) * width for m in range(num_modes)]
        ax_mass.bar(
            xs,
            row.mode_mass,
            width=width,
            label=row.label,
            color=colors[j % len(colors)],
            alpha=0.35 if row is result.target else 0.9,
        )
    ax_mass.set_xticks(range(num_modes), [f"mode {m}\nr={h:g}" for m, h in enumerate(config.heights)])
    ax_mass.set_ylabel("probability of the mode sequence")
    ax_mass.set_title("mass per mode (grey: target p*)")
    ax_mass.legend(fontsize=8)
    for j, row in enumerate(result.methods, start=1):
        ax_kl.plot(
            row.history["step"], row.history["kl_pi_target"], label=row.label, color=colors[j % len(colors)]
        )
    ax_kl.set_yscale("log")
    ax_kl.set_xlabel("training step")
    ax_kl.set_ylabel("KL(pi || p*)  (exact)")
    ax_kl.set_title(f"beta={config.beta:g}, seed {config.seed}")
    ax_kl.legend(fontsize=8)
    ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

"""Present the sequences demo: a rich table, a PNG plot (curves against steps), a JSON file.

Several seeds are one `SequenceDemoResult` each; the JSON's ``methods`` holds the final scores (the mean over the
seeds when there are several), ``seeds`` every seed's own numbers and curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING

from flowloss.demo.sequence_metrics import SequenceScores
from flowloss.demo.sequence_train import HISTORY_KEYS, SequenceDemoResult, config_to_json

if TYPE_CHECKING:  # rich and matplotlib come with the 'cli' extra: imported where they draw
    from rich.console import Console
    from rich.table import Table

COLUMNS: dict[str, str] = {
    "reward": "E[r]",
    "distinct_correct": "distinct correct / {n}",
    "top_share": "top answer's share",
    "kl_target": "KL(pi||p*)",
}
METHOD_COLORS: dict[str, str] = {"flowrl": "#0072B2", "grpo": "#D55E00"}  # Okabe-Ito blue, vermillion


def mean_scores(scores: list[SequenceScores]) -> SequenceScores:
    return SequenceScores(**{k: mean(getattr(s, k) for s in scores) for k in HISTORY_KEYS})


def method_means(results: list[SequenceDemoResult]) -> dict[str, SequenceScores]:
    """Final scores of each method, averaged over the seeds."""
    methods = [r.method for r in results[0].runs]
    return {m: mean_scores([res.run(m).final for res in results]) for m in methods}


def verdict(results: list[SequenceDemoResult], *, short: bool = False) -> str:
    """One line: FlowRL's distinct correct answers as a multiple of GRPO's, and the reward gap (seed means)."""
    means = method_means(results)
    if "flowrl" not in means or "grpo" not in means:
        return ""
    flow, grpo = means["flowrl"], means["grpo"]
    ratio = flow.distinct_correct / max(grpo.distinct_correct, 1e-12)
    if short:
        n = results[0].config.distinct_samples
        return (
            f"FlowRL {flow.distinct_correct:.1f} vs GRPO {grpo.distinct_correct:.1f} distinct correct answers in {n} "
            f"samples ({ratio:.1f}x), reward {flow.reward:.3f} vs {grpo.reward:.3f}"
        )
    return (
        f"FlowRL keeps {ratio:.2f}x GRPO's distinct correct answers ({flow.distinct_correct:.1f} vs "
        f"{grpo.distinct_correct:.1f}) at a mean reward {flow.reward - grpo.reward:+.3f} from GRPO's "
        f"({flow.reward:.3f} vs {grpo.reward:.3f})"
    )


def results_table(results: list[SequenceDemoResult]) -> Table:
    """One row per method and seed (with the seed mean when there are several), and the reference and target."""
    from rich.markup import escape
    from rich.table import Table

    config = results[0].config
    seeds = [r.config.seed for r in results]
    n = config.distinct_samples
    trainer = "the flowloss loop" if config.trainer == "flowloss" else "TRL, FlowRLTrainer vs GRPOTrainer"
    table = Table(
        title=(
            f"FlowRL vs GRPO on a tiny causal LM, {trainer}: {config.steps} steps x "
            f"{len(config.sums)} prompts x {config.group_size} answers, lr {config.lr:g}, beta {config.beta:g}, "
            f"log Z {config.log_z}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        ),
        caption=(
            f"exact, from the enumerated answer distribution, mean over the {len(config.sums)} prompts; distinct: "
            f"expected distinct correct answers among {n} samples; p* = pi_ref exp({config.beta_seq:g} r) / Z"
        ),
    )
    table.add_column("policy", no_wrap=True)
    table.add_column("seed", justify="right")
    for name in COLUMNS.values():
        table.add_column(escape(name.format(n=n)), justify="right")  # "E[r]" is not a markup tag

    def row(label: str, seed: str, s: SequenceScores, *, style: str | None = None) -> None:
        table.add_row(label, seed, f"{s.reward:.3f}", f"{s.distinct_correct:.1f}", f"{s.top_share:.3f}",
                      f"{s.kl_target:.3f}", style=style)

    row("pi_ref (start)", "mean" if len(seeds) > 1 else str(seeds[0]), mean_scores([r.reference for r in results]))
    row("target p*", "mean" if len(seeds) > 1 else str(seeds[0]), mean_scores([r.target for r in results]))
    for method, scores in method_means(results).items():
        label = results[0].run(method).label
        if len(results) > 1:
            for res in results:
                row(label, str(res.config.seed), res.run(method).final)
        row(label, "mean" if len(results) > 1 else str(seeds[0]), scores, style="bold")
    return table


def print_table(results: list[SequenceDemoResult], console: Console | None = None) -> None:
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(results_table(results))
    line = verdict(results)
    if line:
        console.print(line)


def to_json(results: list[SequenceDemoResult]) -> dict:
    """``{"task", "trainer", "config", "methods": {m: final scores (seed mean)}, "reference", "target",
    "seeds": [each seed's numbers and curves], "model", "seconds"}``."""
    config = results[0].config
    seeds_config = config_to_json(config)
    seeds_config.pop("seed")
    return {
        "task": "sequences",
        "trainer": config.trainer,
        "config": {**seeds_config, "seeds": [r.config.seed for r in results]},
        "methods": {m: s.to_dict() for m, s in method_means(results).items()},
        "reference": mean_scores([r.reference for r in results]).to_dict(),
        "target": mean_scores([r.target for r in results]).to_dict(),
        "verdict": verdict(results),
        "seeds": [r.to_json() for r in results],
        "model": results[0].model,
        "seconds": round(sum(r.seconds for r in results), 2),
    }


def write_json(results: list[SequenceDemoResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=1) + "\n")
    return path


PANELS: tuple[tuple[str, str], ...] = (
    ("reward", "mean reward E[r]"),
    ("distinct_correct", "distinct correct answers in {n} samples"),
    ("top_share", "top correct answer's share"),
    ("kl_target", "KL(pi || p*)"),
)


def write_plot(results: list[SequenceDemoResult], path: str | Path, *, dpi: int = 100) -> Path:
    """Four panels against training steps, one curve per method and seed: mean reward, distinct correct answers
    among 64 samples, the top correct answer's share, ``KL(pi || p*)``; dashed: the target ``p*``, dotted: the
    reference. Sized for the docs' text column: 720 px wide at the default dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = results[0].config
    n = config.distinct_samples
    several = len(results) > 1
    with plt.rc_context({"font.size": 10, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False}):
        fig, axes = plt.subplots(2, 2, figsize=(7.2, 5.6), layout="constrained", sharex=True)
        for ax, (key, title) in zip(axes.flat, PANELS):
            for res in results:
                for k, run in enumerate(res.runs):
                    color = METHOD_COLORS.get(run.method, f"C{k}")
                    label = run.label if res is results[0] else None
                    ax.plot(run.history["step"], run.history[key], color=color, linewidth=1.2 if several else 2,
                            alpha=0.75 if several else 1.0, label=label)
            target = mean(getattr(r.target, key) for r in results)
            reference = mean(getattr(r.reference, key) for r in results)
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target p*")
            ax.axhline(reference, color="gray", linestyle=":", linewidth=1.2, label="pi_ref (start)")
            ax.set_title(title.format(n=n))
            ax.grid(alpha=0.3)
            if key == "kl_target":
                ax.set_yscale("log")
            if key == "reward":
                ax.set_ylim(max(0.0, reference - 0.05), 1.01)
        for ax in axes[1]:
            ax.set_xlabel("training step")
        axes[0, 1].legend(fontsize=8.5, frameon=False, loc="center right")
        seeds = ", ".join(str(r.config.seed) for r in results)
        mean_note = "seed means; " if several else ""
        fig.suptitle(
            f"{verdict(results, short=True)}\n{mean_note}{config.trainer} trainer, lr {config.lr:g}, "
            f"beta {config.beta:g}, log Z {config.log_z}, {config.steps} steps, seed{'s' if several else ''} {seeds}",
            fontsize=9.5,
        )
        fig.savefig(path, dpi=dpi, metadata={"Software": None}, pil_kwargs={"optimize": True})
        plt.close(fig)
    return path

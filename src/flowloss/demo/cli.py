"""``flowloss demo``: FlowRL vs a GRPO baseline, on a tabular bandit (default) or on a tiny causal LM (``--task
sequences``), each with an exactly enumerable answer space."""

from __future__ import annotations

import argparse

from flowloss.demo.sequence_train import LOG_Z_ESTIMATORS, TRAINERS, SequenceDemoConfig
from flowloss.demo.train import METHODS, DemoConfig

_DEFAULTS = DemoConfig()
_SEQ = SequenceDemoConfig()
TASKS = ("bandit", "sequences")
# Options of one task only (dest names): refused with the other.
_BANDIT_ONLY = ("groups", "grpo_kl_coef", "methods")
_SEQUENCES_ONLY = ("trainer", "log_z", "length_normalization", "raw_rewards", "max_grad_norm")
_FLAGS = {"length_normalization": "--no-length-normalization"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except where the default depends on ``--task`` (None: the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the ``flowloss`` parser (``set_defaults(run=run)``)."""
    parser = subparsers.add_parser(
        "demo",
        help="FlowRL (distribution matching) vs GRPO (reward maximization), exact scores: a bandit or a tiny LM",
        description=(
            "Train with FlowRL's trajectory-balance loss and with a GRPO-style baseline from the same start on the "
            "same sample budget, and score both exactly against FlowRL's target p*(y) = pi_ref(y) exp(beta r(y)) "
            "/ Z. --task bandit (the default): a tabular autoregressive policy over V^L token sequences, a "
            "multimodal reward. --task sequences: a tiny causal transformer (transformers' Qwen2, random init, "
            "no download) asked for 3 digits that sum to a target, a skewed supervised warm start as pi_ref, "
            "scored on its whole enumerated answer distribution (mean reward, expected distinct correct answers "
            "among 64 samples, the top answer's share, KL to p*); about 2 minutes of CPU."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--task", choices=TASKS, default="bandit", help="which problem to train on")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per method (default: {_DEFAULTS.steps} for bandit, {_SEQ.steps} for sequences)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="seed of the problem, the reference and sampling; sequences takes several and reports each and "
        "their mean",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"FlowRL's reward temperature (default: {_DEFAULTS.beta:g} for bandit, on raw rewards in [0, 1], "
        f"the z-scored flowrl method uses beta * sigma*; {_SEQ.beta:g} for sequences, the paper's value, on "
        "group z-scored 0/1 rewards)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"Adam learning rate of the policy, the same for every method (default: {_DEFAULTS.lr:g} for "
        f"bandit, {_SEQ.lr:g} for sequences, where the log-Z head shares it)",
    )
    parser.add_argument(
        "--lr-log-z",
        type=float,
        default=None,
        help=f"Adam learning rate of FlowRL's learned log Z (default: {_DEFAULTS.lr_log_z:g} for bandit; for "
        "sequences the policy's --lr, as the authors share it)",
    )
    parser.add_argument(
        "--group-size", type=int, default=_DEFAULTS.group_size, help="responses per group (K), per prompt"
    )
    parser.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot here")
    parser.add_argument("--json", metavar="PATH", default=None, help="write all numbers (and the curves) here")

    bandit = parser.add_argument_group("--task bandit only")
    bandit.add_argument("--groups", type=int, default=None, help=f"groups per step (default: {_DEFAULTS.groups})")
    bandit.add_argument(
        "--grpo-kl-coef",
        type=float,
        default=None,
        help=f"GRPO baseline's k3 KL penalty to pi_ref (default: {_DEFAULTS.grpo_kl_coef:g})",
    )
    bandit.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help=(
            "methods to train (default: all): flowrl = FlowRL's trajectory-balance loss on group z-scored "
            "rewards, as in the FlowRL recipe, at temperature beta * sigma* (sigma*: the reward's std under p*); "
            "flowrl-raw = the same loss on raw rewards at beta, whose target is exactly p*; grpo = the GRPO "
            "baseline on group z-scored advantages; reverse-kl = the reverse-KL surrogate on raw rewards"
        ),
    )

    sequences = parser.add_argument_group("--task sequences only")
    sequences.add_argument(
        "--trainer",
        choices=TRAINERS,
        default=None,
        help=(
            "flowloss (default): a plain PyTorch loop calling flowloss's public functions; trl: the same "
            "comparison through flowloss.adapters.trl.FlowRLTrainer and TRL's GRPOTrainer (needs TRL: "
            "pip install -e '.[trl]')"
        ),
    )
    sequences.add_argument(
        "--log-z",
        choices=LOG_Z_ESTIMATORS,
        default=None,
        help=(
            "FlowRL's log Z: head (default) = flowloss.LogZHead on the prompt's pooled hidden states, trained "
            "with the policy, at its learning rate unless --lr-log-z (the authors' choice, and what the TRL "
            "adapter does); vargrad = the parameter-free flowloss.vargrad_log_z of each group"
        ),
    )
    sequences.add_argument(
        "--no-length-normalization",
        dest="length_normalization",
        action="store_const",
        const=False,
        default=None,
        help="sequence log-likelihoods in FlowRL's residual instead of the paper's token means (flowloss's "
        "default): the target's temperature becomes beta instead of beta * L",
    )
    sequences.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help=f"clip the gradient norm of policy and log-Z head to this before each Adam step, 0 = off (default: "
        f"{_SEQ.max_grad_norm:g}, the authors' value and TRL's default)",
    )
    sequences.add_argument(
        "--raw-rewards",
        action="store_const",
        const=True,
        default=None,
        help="feed FlowRL the raw 0/1 rewards instead of their group z-score (GRPO keeps its z-scored advantage); "
        "log Z must then reach about beta, see --lr-log-z and --log-z vargrad",
    )
    parser.set_defaults(run=run)
    return parser


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return [_FLAGS.get(n, "--" + n.replace("_", "-")) for n in names if getattr(args, n) is not None]


def run(args: argparse.Namespace) -> int:
    """Run the chosen task with the parsed options; print the table; write the plot/JSON when asked.

    Returns 0, or 2 for a bad option or a missing optional dependency (the message says which and how to
    install it).
    """
    from flowloss._console import make_console, require_cli_extra

    if not require_cli_extra("demo", plot=args.plot is not None):
        return 2
    console = make_console()
    task = getattr(args, "task", "bandit")
    wrong = _given(args, _SEQUENCES_ONLY if task == "bandit" else _BANDIT_ONLY)
    if wrong:
        console.print(f"[red]flowloss demo: {', '.join(wrong)} only apply to the other --task (this is {task})[/red]")
        return 2
    if task == "sequences":
        return _run_sequences(args, console)
    if len(args.seed) != 1:
        console.print("[red]flowloss demo: --task bandit runs one --seed at a time[/red]")
        return 2
    return _run_bandit(args, console)


def _pick(value, default):
    return default if value is None else value


def _run_bandit(args: argparse.Namespace, console) -> int:
    from flowloss.demo.report import print_table, write_json, write_plot
    from flowloss.demo.train import run_demo

    config = DemoConfig(
        seed=args.seed[0],
        steps=_pick(args.steps, _DEFAULTS.steps),
        beta=_pick(args.beta, _DEFAULTS.beta),
        groups=_pick(args.groups, _DEFAULTS.groups),
        group_size=args.group_size,
        lr=_pick(args.lr, _DEFAULTS.lr),
        lr_log_z=_pick(args.lr_log_z, _DEFAULTS.lr_log_z),
        grpo_kl_coef=_pick(args.grpo_kl_coef, _DEFAULTS.grpo_kl_coef),
        methods=tuple(_pick(args.methods, _DEFAULTS.methods)),
    )
    try:
        config.validate()
    except ValueError as err:
        console.print(f"[red]flowloss demo: {err}[/red]")
        return 2
    with console.status("training..."):
        result = run_demo(config)
    print_table(result, console)
    if args.plot:
        console.print(f"plot: {write_plot(result, args.plot)}")
    if args.json:
        console.print(f"json: {write_json(result, args.json)}")
    return 0


def _run_sequences(args: argparse.Namespace, console) -> int:
    import sys

    from flowloss.demo.sequence_model import transformers_missing

    missing = transformers_missing()
    if missing:
        print(f"flowloss demo --task sequences: error: {missing}", file=sys.stderr)
        return 2
    trainer = _pick(args.trainer, _SEQ.trainer)
    if trainer == "trl":
        from flowloss.demo.sequence_trl import trl_missing

        missing = trl_missing()
        if missing:
            print(f"flowloss demo --task sequences --trainer trl: error: {missing}", file=sys.stderr)
            return 2
    configs = [
        SequenceDemoConfig(
            seed=seed,
            steps=_pick(args.steps, _SEQ.steps),
            beta=_pick(args.beta, _SEQ.beta),
            lr=_pick(args.lr, _SEQ.lr),
            group_size=args.group_size,
            log_z=_pick(args.log_z, _SEQ.log_z),
            length_normalization=_pick(args.length_normalization, _SEQ.length_normalization),
            raw_rewards=_pick(args.raw_rewards, _SEQ.raw_rewards),
            lr_log_z=args.lr_log_z,
            max_grad_norm=_pick(args.max_grad_norm, _SEQ.max_grad_norm),
            trainer=trainer,
        )
        for seed in args.seed
    ]
    try:
        for config in configs:
            config.validate()
    except ValueError as err:
        console.print(f"[red]flowloss demo: {err}[/red]")
        return 2
    from flowloss.demo.sequence_report import print_table, write_json, write_plot
    from flowloss.demo.sequence_train import run_sequence_demo

    results = []
    with _progress(console) as progress:
        for config in configs:
            bars = {
                name: progress.add_task(f"seed {config.seed}: {label}", total=total)
                for name, label, total in (
                    ("warm start", "warm start (pi_ref)", config.warm_steps),
                    *((m, m, config.steps) for m in config.methods),
                )
            }

            def on_step(name: str, seed: int, step: int, bars=bars) -> None:
                progress.update(bars[name], completed=step)

            results.append(run_sequence_demo(config, on_step))
    print_table(results, console)
    if args.plot:
        console.print(f"plot: {write_plot(results, args.plot)}")
    if args.json:
        console.print(f"json: {write_json(results, args.json)}")
    return 0


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

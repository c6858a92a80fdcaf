"""``flowloss bench``: compare flowloss's log-prob and loss paths with what RL frameworks use, on this machine."""

from __future__ import annotations

import argparse
import os

from flowloss.bench import config as cfg
from flowloss.bench.step_model import PRESETS


def _int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value

    return parse


def _defaults(d: cfg.OpDefaults) -> str:
    shape = " ".join(f"{k.upper()}={','.join(map(str, d[k]))}" for k in ("n", "v", "h"))
    return f"{shape} {','.join(d['dtypes'])}, {d['warmup']} warm-up + {d['reps']} timed calls"


def _step_defaults(d: cfg.StepDefaults) -> str:
    return (f"--preset {d['preset']}, {cfg.STEP_SEQUENCES} sequences in groups of {cfg.STEP_GROUP_SIZE} x "
            f"{d['seq_len']} positions, {d['dtypes'][0]}, {d['warmup']} warm-up + {d['reps']} timed steps")  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``flowloss`` parser (``set_defaults(run=run)``)."""
    from flowloss.bench.runner import all_impls, impl_names

    names = impl_names()
    parser = subparsers.add_parser(
        "bench",
        help="microbenchmark the log-prob ops and the loss against naive PyTorch, torch.compile and frameworks",
        description=(
            "Time (median, p20-p80), peak extra memory, effective bandwidth and float64-reference error of "
            "per-token log-prob implementations (logits -> log-probs, and hidden states -> log-probs through the "
            "lm_head), plus the trajectory-balance loss, with T=0.7, ~20% masked rows and a random upstream "
            f"gradient. Defaults: CPU {_defaults(cfg.CPU_DEFAULTS)}; CUDA {_defaults(cfg.CUDA_DEFAULTS)}. "
            "--op step (not in the default run; needs the step extra: pip install -e '.[step]') times one whole RL "
            "update of a transformer built from a config with random weights, per loss path, next to the "
            f"backbone's own cost: CPU {_step_defaults(cfg.STEP_CPU_DEFAULTS)}; CUDA "
            f"{_step_defaults(cfg.STEP_CUDA_DEFAULTS)}."
        ),
        epilog="Implementations: " + "; ".join(f"{i.name} ({i.op}): {i.source}" for i in all_impls()) + ".",
    )
    add = parser.add_argument
    add("--op", nargs="+", choices=cfg.OPS, default=list(cfg.DEFAULT_OPS), help=f"default: {' '.join(cfg.DEFAULT_OPS)}")
    add("--n", nargs="+", type=_int_at_least(1), metavar="N", help="token counts N (rows)")
    add("--v", nargs="+", type=_int_at_least(1), metavar="V", help="vocabulary sizes V")
    add("--h", nargs="+", type=_int_at_least(1), metavar="H", help="hidden sizes H (fused_linear)")
    add("--dtype", nargs="+", choices=tuple(cfg.DTYPES), metavar="DTYPE", help=f"{tuple(cfg.DTYPES)}")
    add("--device", choices=cfg.DEVICES, default="auto", help="auto: cuda when available (default)")
    add("--impl", nargs="+", choices=names, metavar="IMPL", help=f"subset of {names}")
    add("--warmup", type=_int_at_least(0), help="untimed calls before timing")
    add("--reps", type=_int_at_least(1), help="timed calls per measurement")
    add("--temperature", type=float, default=cfg.DEFAULT_TEMPERATURE, help="sampling temperature T")
    add("--mask-fraction", type=float, default=cfg.DEFAULT_MASK_FRACTION, help="fraction of rows masked (ignored)")
    step = parser.add_argument_group("--op step (one RL update of a transformer)")
    one = _int_at_least(1)
    step.add_argument("--preset", choices=tuple(PRESETS), help="model shape (CPU: tiny; CUDA: qwen2-0.5b)")
    step.add_argument("--sequences", type=one, metavar="B", help=f"sequences per step ({cfg.STEP_SEQUENCES})")
    step.add_argument("--group-size", type=one, metavar="G", help=f"responses per prompt ({cfg.STEP_GROUP_SIZE})")
    step.add_argument("--seq-len", type=one, metavar="L", help="positions per sequence (CPU 128, CUDA 2048)")
    add("--seed", type=int, default=0, help="seed of the random inputs (with each case's shape: nothing else)")
    add("--time-budget", type=float, metavar="SECONDS",
        help="start no measurement after this many seconds (the rest is listed as skipped)")  # fmt: skip
    add("--no-memory", action="store_true", help="skip the peak-memory measurement")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--json", metavar="PATH", help="write every figure and the machine details here (rewritten after each case)")
    add("--plot", metavar="PATH", help="write a PNG of time and memory per implementation")
    parser.set_defaults(run=run)
    return parser


def config_from_args(args: argparse.Namespace) -> cfg.BenchConfig:
    def tup(x):
        return None if x is None else tuple(x)

    return cfg.BenchConfig(
        ops=tuple(args.op), n=tup(args.n), v=tup(args.v), h=tup(args.h), dtypes=tup(args.dtype), device=args.device,
        warmup=args.warmup, reps=args.reps, impls=tup(args.impl), temperature=args.temperature,
        mask_fraction=args.mask_fraction, seed=args.seed, measure_memory=not args.no_memory,
        time_budget=args.time_budget, preset=args.preset, sequences=args.sequences, group_size=args.group_size,
        seq_len=args.seq_len,
    )  # fmt: skip


def _unwritable(path: str | None) -> str | None:
    """Why ``path`` cannot be written (a missing or read-only folder, a folder in its place), or None."""
    if not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if os.path.isdir(path):
        return "is a folder"
    return None if os.access(folder, os.W_OK) else f"folder {folder} is not writable"


def run(args: argparse.Namespace) -> int:
    """Run the suite; print the tables; write JSON / PNG when asked. 0 on success, 2 on bad options."""
    from flowloss._console import make_console, require_cli_extra

    if not require_cli_extra("bench", plot=bool(args.plot)):
        return 2
    from flowloss.bench.report import build_report, load_average, print_report, write_json
    from flowloss.bench.runner import count_units, run_suite

    console, errors = make_console(), make_console(stderr=True)

    def error(text: str) -> int:
        errors.print(f"flowloss bench: error: {text}", style="red", markup=False, highlight=False)
        return 2

    try:
        resolved = config_from_args(args).resolved()
    except ValueError as err:
        return error(str(err))
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if problem := _unwritable(path):  # found before the run, not after minutes of measuring
            return error(f"{flag} {path}: {problem}")
    load_at_start = load_average()

    def on_case(cases: list) -> None:
        if args.json:
            write_json(build_report(resolved, cases, load_at_start=load_at_start), args.json)

    try:
        if args.no_progress:
            cases = run_suite(resolved, on_case=on_case)
        else:
            cases = _with_progress(resolved, errors, count_units(resolved), run_suite, on_case)
    except ValueError as err:  # e.g. an --impl name that no implementation has
        return error(str(err))
    report = build_report(resolved, cases, load_at_start=load_at_start)
    print_report(report, console)
    if args.json:
        write_json(report, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        from flowloss.bench.plot import write_plot

        write_plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _with_progress(config, console, total: int, run_suite, on_case) -> list:
    """``run_suite`` under a rich progress bar on stderr (erased when the run ends)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("flowloss bench", total=total)
        started: list[bool] = []

        def progress(label: str) -> None:
            if started:
                bar.advance(task)
            started.append(True)
            bar.update(task, description=label)

        return run_suite(config, progress, on_case=on_case)

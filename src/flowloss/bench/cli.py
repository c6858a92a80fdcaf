"""``flowloss bench``: compare flowloss's log-prob and loss paths with what RL frameworks use, on this machine."""

from __future__ import annotations

import argparse

from flowloss.bench.config import (
    CPU_DEFAULTS,
    CUDA_DEFAULTS,
    DEFAULT_MASK_FRACTION,
    DEFAULT_OPS,
    DEFAULT_TEMPERATURE,
    DEVICES,
    DTYPES,
    OPS,
    STEP_CPU_DEFAULTS,
    STEP_CUDA_DEFAULTS,
    STEP_GROUP_SIZE,
    STEP_SEQUENCES,
)
from flowloss.bench.impls import IMPL_NAMES, IMPLS
from flowloss.bench.step_model import PRESETS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _defaults(d: dict) -> str:
    return f"N={','.join(map(str, d['n']))} V={','.join(map(str, d['v']))} H={','.join(map(str, d['h']))} " + (
        f"{','.join(d['dtypes'])}, {d['warmup']} warm-up + {d['reps']} timed calls"
    )


def _step_defaults(d: dict) -> str:
    return (
        f"--preset {d['preset']}, {STEP_SEQUENCES} sequences in groups of {STEP_GROUP_SIZE} x {d['seq_len']} "
        f"positions, {d['dtypes'][0]}, {d['warmup']} warm-up + {d['reps']} timed steps"
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``flowloss`` parser (``set_defaults(run=run)``)."""
    impl_help = "; ".join(f"{i.name} ({i.op}): {i.source}" for i in IMPLS)
    parser = subparsers.add_parser(
        "bench",
        help="microbenchmark the log-prob ops and the loss against naive PyTorch, torch.compile and frameworks",
        description=(
            "Time (median, p20-p80), peak extra memory, effective bandwidth and float64-reference error of "
            "per-token log-prob implementations (logits -> log-probs, and hidden states -> log-probs through the "
            "lm_head), plus the trajectory-balance loss, with T=0.7, ~20% masked rows and a random upstream "
            f"gradient. Defaults: CPU {_defaults(CPU_DEFAULTS)}; CUDA {_defaults(CUDA_DEFAULTS)}. "
            "--op step (not in the default run; needs the step extra: pip install -e '.[step]') times one whole RL "
            "update of a "
            "transformer built from a config with random weights, per loss path, next to the backbone's own cost: "
            f"CPU {_step_defaults(STEP_CPU_DEFAULTS)}; CUDA {_step_defaults(STEP_CUDA_DEFAULTS)}."
        ),
        epilog=f"Implementations: {impl_help}.",
    )
    default_ops = " ".join(DEFAULT_OPS)
    parser.add_argument("--op", nargs="+", choices=OPS, default=list(DEFAULT_OPS), help=f"default: {default_ops}")
    parser.add_argument("--n", nargs="+", type=_positive_int, metavar="N", help="token counts N (rows)")
    parser.add_argument("--v", nargs="+", type=_positive_int, metavar="V", help="vocabulary sizes V")
    parser.add_argument("--h", nargs="+", type=_positive_int, metavar="H", help="hidden sizes H (fused_linear)")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), metavar="DTYPE", help=f"{tuple(DTYPES)}")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available (default)")
    parser.add_argument("--impl", nargs="+", choices=IMPL_NAMES, metavar="IMPL", help=f"subset of {IMPL_NAMES}")
    parser.add_argument("--warmup", type=_non_negative_int, help="untimed calls before timing")
    parser.add_argument("--reps", type=_positive_int, help="timed calls per measurement")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature T")
    parser.add_argument(
        "--mask-fraction", type=float, default=DEFAULT_MASK_FRACTION, help="fraction of rows masked (ignored)"
    )
    step = parser.add_argument_group("--op step (one RL update of a transformer)")
    step.add_argument("--preset", choices=tuple(PRESETS), help="model shape (CPU: tiny; CUDA: qwen2-0.5b)")
    step.add_argument("--sequences", type=_positive_int, metavar="B", help=f"sequences per step ({STEP_SEQUENCES})")
    step.add_argument("--group-size", type=_positive_int, metavar="G", help=f"responses per prompt ({STEP_GROUP_SIZE})")
    step.add_argument("--seq-len", type=_positive_int, metavar="L", help="positions per sequence (CPU 128, CUDA 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine details here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory per implementation")
    parser.set_defaults(run=run)
    return parser


def config_from_args(args: argparse.Namespace):
    from flowloss.bench.config import BenchConfig

    return BenchConfig(
        ops=tuple(args.op),
        n=None if args.n is None else tuple(args.n),
        v=None if args.v is None else tuple(args.v),
        h=None if args.h is None else tuple(args.h),
        dtypes=None if args.dtype is None else tuple(args.dtype),
        device=args.device,
        warmup=args.warmup,
        reps=args.reps,
        impls=None if args.impl is None else tuple(args.impl),
        temperature=args.temperature,
        mask_fraction=args.mask_fraction,
        seed=args.seed,
        measure_memory=not args.no_memory,
        preset=args.preset,
        sequences=args.sequences,
        group_size=args.group_size,
        seq_len=args.seq_len,
    )


def _unwritable(path: str | None) -> str | None:
    """Why ``path`` cannot be written (a missing or read-only folder, a folder in its place), or None."""
    import os

    if not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if os.path.isdir(path):
        return "is a folder"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the suite; print the tables; write JSON / PNG when asked. 0 on success, 2 on bad options."""
    from flowloss._console import make_console, require_cli_extra

    if not require_cli_extra("bench", plot=bool(args.plot)):
        return 2
    from flowloss.bench.report import build_report, print_report, write_json
    from flowloss.bench.runner import count_units, run_suite

    console = make_console()
    errors = make_console(stderr=True)
    config = config_from_args(args)
    try:
        resolved = config.resolved()
    except ValueError as err:
        errors.print(f"flowloss bench: error: {err}", style="red", markup=False, highlight=False)
        return 2
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        problem = _unwritable(path)
        if problem:  # found before the run, not after minutes of measuring
            errors.print(f"flowloss bench: error: {flag} {path}: {problem}", style="red", markup=False, highlight=False)
            return 2
    if args.no_progress:
        cases = run_suite(resolved)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=errors,
            transient=True,
        ) as bar:
            task = bar.add_task("flowloss bench", total=count_units(resolved))
            state = {"started": False}

            def progress(label: str) -> None:
                if state["started"]:
                    bar.advance(task)
                state["started"] = True
                bar.update(task, description=label)

            cases = run_suite(resolved, progress)
    report = build_report(resolved, cases)
    print_report(report, console)
    if args.json:
        write_json(report, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        from flowloss.bench.plot import write_plot

        write_plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    return 0

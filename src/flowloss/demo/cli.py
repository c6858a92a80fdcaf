"""``flowloss demo``: FlowRL's trajectory balance vs a GRPO baseline on an exactly enumerable problem."""

from __future__ import annotations

import argparse

from flowloss.demo.train import METHODS, DemoConfig

_DEFAULTS = DemoConfig()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the ``flowloss`` parser (``set_defaults(run=run)``)."""
    parser = subparsers.add_parser(
        "demo",
        help="distribution matching (FlowRL) vs reward maximization (GRPO) on a toy problem, exact target",
        description=(
            "Train a tabular autoregressive policy over V^L token sequences with FlowRL's trajectory-balance "
            "loss and with a GRPO-style baseline from the same start and sample budget, then score each "
            "exactly against the target p*(y) = pi_ref(y) exp(beta r(y)) / Z."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps per method")
    parser.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="seed of the problem and of sampling"
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=_DEFAULTS.beta,
        help="reward temperature of the target p* (flowrl, on z-scored rewards, uses beta * sigma*)",
    )
    parser.add_argument("--groups", type=int, default=_DEFAULTS.groups, help="groups per step")
    parser.add_argument(
        "--group-size", type=int, default=_DEFAULTS.group_size, help="responses per group (K)"
    )
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam learning rate of the policy")
    parser.add_argument(
        "--lr-log-z", type=float, default=_DEFAULTS.lr_log_z, help="Adam learning rate of log Z"
    )
    parser.add_argument(
        "--grpo-kl-coef",
        type=float,
        default=_DEFAULTS.grpo_kl_coef,
        help="GRPO baseline's k3 KL penalty to pi_ref",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(_DEFAULTS.methods),
        help=(
            "methods to train: flowrl = FlowRL's trajectory-balance loss on group z-scored rewards, as in the "
            "FlowRL recipe, at temperature beta * sigma* (sigma*: the reward's std under p*); flowrl-raw = the "
            "same loss on raw rewards at beta, whose target is exactly p*; grpo = the GRPO baseline on group "
            "z-scored advantages; reverse-kl = the reverse-KL surrogate on raw rewards"
        ),
    )
    parser.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot here")
    parser.add_argument("--json", metavar="PATH", default=None, help="write all numbers (and KL curves) here")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options; print the table; write the plot/JSON when asked. Returns 0."""
    from flowloss._console import make_console, require_cli_extra

    if not require_cli_extra("demo", plot=args.plot is not None):
        return 2
    from flowloss.demo.report import print_table, write_json, write_plot
    from flowloss.demo.train import run_demo

    config = DemoConfig(
        seed=args.seed,
        steps=args.steps,
        beta=args.beta,
        groups=args.groups,
        group_size=args.group_size,
        lr=args.lr,
        lr_log_z=args.lr_log_z,
        grpo_kl_coef=args.grpo_kl_coef,
        methods=tuple(args.methods),
    )
    console = make_console()
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

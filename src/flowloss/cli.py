"""The ``flowloss`` console script (also ``python -m flowloss``): ``flowloss bench`` and ``flowloss demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from flowloss import __version__
    from flowloss.bench.cli import register as register_bench
    from flowloss.demo.cli import register as register_demo

    parser = argparse.ArgumentParser(
        prog="flowloss", description="FlowRL losses: microbenchmarks and a distribution-matching demo."
    )
    parser.add_argument("--version", action="version", version=f"flowloss {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_bench(commands)
    register_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

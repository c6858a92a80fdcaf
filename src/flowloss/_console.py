"""The rich console the command-line tools print with."""

from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 150


def make_console(*, stderr: bool = False) -> Console:
    """A rich console; 150 columns when not writing to a terminal, so piped tables are not squeezed to 80."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=PIPED_WIDTH)
    return console

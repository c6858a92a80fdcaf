"""The rich console the command-line tools print with, and the check that the tools' own dependencies are there.

rich (tables, progress) and matplotlib (``--plot``) come with flowloss's optional ``cli`` extra; the library
needs neither, and `import flowloss` imports neither.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

PIPED_WIDTH = 150
CLI_EXTRA_INSTALL = 'pip install -e ".[cli]"'


def missing_cli_modules(*, plot: bool = False) -> list[str]:
    """The command-line tools' dependencies that cannot be imported: rich, and matplotlib when ``plot``."""
    missing = []
    for name in ("rich", "matplotlib") if plot else ("rich",):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_cli_extra(command: str, *, plot: bool = False) -> bool:
    """True when ``flowloss <command>`` can run; otherwise print what to install to stderr and return False."""
    missing = missing_cli_modules(plot=plot)
    if missing:
        print(
            f"flowloss {command}: error: needs {' and '.join(missing)}, from flowloss's optional 'cli' extra: "
            f"{CLI_EXTRA_INSTALL} in a clone of flowloss (or pip install {' '.join(missing)})",
            file=sys.stderr,
        )
    return not missing


def make_console(*, stderr: bool = False) -> Console:
    """A rich console; 150 columns when not writing to a terminal, so piped tables are not squeezed to 80."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=PIPED_WIDTH)
    return console

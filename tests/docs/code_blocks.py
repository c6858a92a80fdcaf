"""The Python code blocks of the README and the docs pages, to run them as written.

A block is a fenced ```` ```python ```` block. One that is deliberately partial (a signature, a fragment of a
config) carries the marker ``<!-- sketch: why -->`` on the line before its fence and is not run; there should be
few. A block marked ``<!-- continues -->`` runs in the namespace of the block before it on the same page (a
reader following the page); every other block runs alone, in a fresh namespace.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A fence at the start of a line, or indented inside a list item (its code is dedented).
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
_SKETCH = re.compile(r"<!--\s*sketch:\s*(.+?)\s*-->\s*$")
_CONTINUES = re.compile(r"<!--\s*continues\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    sketch: str | None  # the reason, when marked as deliberately partial
    continues: bool

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        if match["lang"] not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        sketch = _SKETCH.search(before)
        blocks.append(Block(page, line, textwrap.dedent(match["code"]), sketch.group(1) if sketch else None,
                            bool(_CONTINUES.search(before))))
    return blocks


def pages(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def check_framework_page(page: str, *, max_sketches: int = 1) -> None:
    """An adapter page, in its framework's venv: every block that is not a sketch runs, and sketches stay few."""
    blocks = python_blocks(page)
    sketches = [f"{b.name}: {b.sketch}" for b in blocks if b.sketch]
    assert len(sketches) <= max_sketches, sketches
    ran = run_page(page)
    assert ran, f"no runnable Python block on {page}"
    assert len(ran) + len(sketches) == len(blocks)


def run_page(page: str) -> list[str]:
    """Run every block of ``page`` that is not a sketch; returns the names of the blocks run."""
    namespace: dict = {}
    ran = []
    for block in python_blocks(page):
        if block.sketch is not None:
            continue
        if not block.continues:
            namespace = {"__name__": "__main__"}
        exec(compile(block.code, block.name, "exec"), namespace)  # the docs' own code, as a reader runs it
        ran.append(block.name)
    return ran

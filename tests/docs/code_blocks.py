"""The Python code blocks of the README and the docs pages, to run them as written.

A block is a fenced ```` ```python ```` block. One that is deliberately partial (a signature, a fragment of a
config) carries the marker ``<!-- sketch: why -->`` on the line before its fence and is not run; there should be
few. A block marked ``<!-- continues -->`` runs in the namespace of the block before it on the same page (a
reader following the page); every other block runs alone, in a fresh namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
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
        if match.group(1) not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        sketch = _SKETCH.search(before)
        blocks.append(Block(page, line, match.group(2), sketch.group(1) if sketch else None,
                            bool(_CONTINUES.search(before))))
    return blocks


def pages(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


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

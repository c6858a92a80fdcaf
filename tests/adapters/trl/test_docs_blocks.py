"""The Python blocks of ``docs/adapters/trl.md`` run as written, in the TRL venv (see
``tests/docs/test_code_blocks.py`` for the core pages)."""

from __future__ import annotations

from tests.docs.code_blocks import python_blocks, run_page

PAGE = "docs/adapters/trl.md"


def test_the_python_blocks_of_the_trl_page_run_as_written(adapter):
    blocks = python_blocks(PAGE)
    ran = run_page(PAGE)
    assert ran, "no runnable Python block on the page"
    assert len(ran) + sum(1 for b in blocks if b.sketch) == len(blocks)
    assert sum(1 for b in blocks if b.sketch) <= 1, [f"{b.name}: {b.sketch}" for b in blocks if b.sketch]

"""Every Python block of the README and of the docs pages runs as written (adapter pages: in their framework's
venv, `tests/adapters/<framework>/test_docs_blocks.py`); tests/test_typing.py type-checks the README's example."""

from __future__ import annotations

import pytest

import flowloss
from tests.docs.code_blocks import pages, python_blocks, run_page

CORE_PAGES = ["README.md", *pages("docs/*.md")]
# Deliberately partial blocks stay few: at most this many over all the pages above.
MAX_SKETCHES = 4


@pytest.fixture(autouse=True)
def _restore_strict_mode():
    before = flowloss.is_strict()
    yield
    flowloss.set_strict(before)


@pytest.mark.parametrize("page", [p for p in CORE_PAGES if python_blocks(p)])
def test_the_python_blocks_of_a_page_run_as_written(page, capsys):
    assert run_page(page) or all(b.sketch for b in python_blocks(page))


def test_partial_blocks_are_marked_and_few():
    sketches = [b for page in CORE_PAGES for b in python_blocks(page) if b.sketch]
    assert len(sketches) <= MAX_SKETCHES, [f"{b.name}: {b.sketch}" for b in sketches]


def test_the_readme_runs_a_whole_update():
    (block,) = python_blocks("README.md")
    assert "optimizer.step()" in block.code and "LogZHead(" in block.code and block.sketch is None

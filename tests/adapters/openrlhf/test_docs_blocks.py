"""The Python blocks of ``docs/adapters/openrlhf.md`` run as written, in the OpenRLHF venv (see
``tests/docs/test_code_blocks.py`` for the core pages)."""

from __future__ import annotations

from tests.docs.code_blocks import check_framework_page


def test_the_python_blocks_of_the_openrlhf_page_run_as_written(adapter):
    check_framework_page("docs/adapters/openrlhf.md")

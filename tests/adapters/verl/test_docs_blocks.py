"""The Python blocks of ``docs/adapters/verl.md`` run as written, in the verl venv (see
``tests/docs/test_code_blocks.py`` for the core pages)."""

from __future__ import annotations

from framework_required import require_framework


def test_the_python_blocks_of_the_verl_page_run_as_written(tmp_path, monkeypatch):
    require_framework("verl")
    from tests.docs.code_blocks import check_framework_page

    monkeypatch.chdir(tmp_path)  # the checkpoint snippet reads a relative placeholder path
    check_framework_page("docs/adapters/verl.md")

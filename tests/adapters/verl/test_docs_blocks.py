"""The Python blocks of ``docs/adapters/verl.md`` run as written, in the verl venv (see
``tests/docs/test_code_blocks.py`` for the core pages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _require_framework(module: str):
    path = Path(__file__).parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_adapters_conftest", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers.require_framework(module)


def test_the_python_blocks_of_the_verl_page_run_as_written(tmp_path, monkeypatch):
    _require_framework("verl")
    from tests.docs.code_blocks import check_framework_page

    monkeypatch.chdir(tmp_path)  # the checkpoint snippet reads a relative placeholder path
    check_framework_page("docs/adapters/verl.md")

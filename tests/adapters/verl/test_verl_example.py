"""docs/adapters/verl.md's CPU example (examples/verl_flowrl.py) really runs and gives a finite loss."""

from __future__ import annotations

import importlib.util
import math
import runpy
from pathlib import Path


def _require_framework(module: str):
    path = Path(__file__).parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_adapters_conftest", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers.require_framework(module)


def test_example_runs(capsys):
    _require_framework("verl")
    example = Path(__file__).parents[3] / "examples" / "verl_flowrl.py"
    loss = runpy.run_path(str(example), run_name="flowrl_example")["main"]()
    assert math.isfinite(loss) and loss > 0
    assert "FlowRL loss" in capsys.readouterr().out

"""docs/adapters/verl.md's CPU example (examples/verl_flowrl.py) really runs and gives a finite loss."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

from framework_required import require_framework


def test_example_runs(capsys):
    require_framework("verl")
    example = Path(__file__).parents[3] / "examples" / "verl_flowrl.py"
    loss = runpy.run_path(str(example), run_name="flowrl_example")["main"]()
    assert math.isfinite(loss) and loss > 0
    assert "FlowRL loss" in capsys.readouterr().out

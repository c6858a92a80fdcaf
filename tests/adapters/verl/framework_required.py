"""``require_framework`` for the verl tests, from ``tests/adapters/conftest.py``.

The verl conftest takes ``tests/adapters`` off ``sys.path`` (see there), and the verl venv has a ``tests`` package
of its own in site-packages, so the shared helper is loaded from its file, once, for every verl test module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_adapters_conftest", Path(__file__).parents[1] / "conftest.py")
assert _spec is not None and _spec.loader is not None
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

require_framework = _helpers.require_framework

__all__ = ["require_framework"]

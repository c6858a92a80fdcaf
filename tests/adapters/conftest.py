"""Adapter tests run against the real frameworks, each in its own virtual environment (``make test-adapters``).

Outside CI a missing framework skips its tests; under CI (``CI=true``) or ``FLOWLOSS_REQUIRE_FRAMEWORKS=1`` it
fails them, so a broken install can never turn into a green run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def frameworks_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("FLOWLOSS_REQUIRE_FRAMEWORKS") == "1"


def require_framework(module: str) -> ModuleType:
    """Import ``module`` or skip (outside CI) / fail (in CI) with the import error."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a framework failing at import time
        if frameworks_required():
            pytest.fail(f"framework module {module!r} is required here but failed to import: {exc!r}")
        pytest.skip(f"{module} not importable: {exc!r}")

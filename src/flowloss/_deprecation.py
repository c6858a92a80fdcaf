"""Deprecated names: each warns once per call site with the version that removes it (one place sets both)."""

from __future__ import annotations

import warnings

DEPRECATED_IN = "0.2.0"
REMOVED_IN = "0.3.0"


def warn_deprecated(what: str, instead: str, *, stacklevel: int = 3) -> None:
    """``DeprecationWarning``: "`what` is deprecated since 0.2.0 and will be removed in 0.3.0: use `instead`"."""
    warnings.warn(
        f"{what} is deprecated since {DEPRECATED_IN} and will be removed in {REMOVED_IN}: {instead}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )

"""Strict mode: value checks that need to read a tensor's contents on the host.

Every public function always checks what it can see without reading device memory (types, shapes, dtypes,
devices, options): those checks cost nothing and run on every call. Checks of *values* (finiteness of the
inputs at unmasked positions, labels inside the vocabulary, 0/1 masks, a positive normalizer tensor) would
need ``bool(tensor)`` / ``.item()``: a host synchronisation that stalls the GPU queue in the middle of a
training step, rules out CUDA graphs and breaks ``torch.compile`` graphs. So they run only in strict mode.

Outside strict mode a bad value is never hidden and never read out of bounds: it shows up as NaN in the
output (a label outside ``[0, V)`` gives a NaN log-prob; a NaN or inf input at an unmasked position gives a
NaN or inf loss) and in ``return_stats``. Strict mode raises instead, with a message that names the argument
and the offending position. Turn it on

* globally for a debugging run: ``FLOWLOSS_STRICT=1`` in the environment (on: ``1``, ``true``, ``yes``, ``on``;
  off: unset, empty, ``0``, ``false``, ``no``, ``off``; any other value is ignored with a warning naming the
  variable), or ``flowloss.set_strict(True)``;
* for a block: ``with flowloss.strict_mode(): ...``;
* for one call: ``strict=True`` on the functions that take it (``strict=False`` turns it off for that call).

Why not strict by default: a training library runs inside the step that it must not slow down, and the
frameworks it plugs into (TRL, verl, OpenRLHF, Liger) do not synchronise in their losses either. A NaN loss
is what every trainer already watches for; strict mode tells you where it came from.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_ENV = "FLOWLOSS_STRICT"
ON_VALUES = ("1", "true", "yes", "on")
OFF_VALUES = ("", "0", "false", "no", "off")


def strict_from_environment(value: str | None) -> bool:
    """Whether ``FLOWLOSS_STRICT=value`` turns strict mode on (case and surrounding spaces ignored).

    A value in neither list (``"none"``, ``"disable"``, a typo such as ``"flase"``) leaves strict mode off, with
    a warning that names the variable and the accepted values: it is never read as "on" by accident.
    """
    text = (value or "").strip().lower()
    if text in ON_VALUES:
        return True
    if text not in OFF_VALUES:
        warnings.warn(
            f"{_ENV}={value!r} is not a known setting; strict mode stays off. Use one of {ON_VALUES} to turn it "
            f"on, or one of {tuple(v for v in OFF_VALUES if v)} (or leave it unset) for off.",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


_enabled = strict_from_environment(os.environ.get(_ENV))


def set_strict(enabled: bool) -> None:
    """Turn strict mode on or off for the whole process (the default comes from ``FLOWLOSS_STRICT``)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__} {enabled!r}")
    _enabled = enabled


def is_strict(strict: bool | None = None) -> bool:
    """Whether value checks run: the per-call ``strict`` when given (True/False), else the global setting."""
    if strict is None:
        return _enabled
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be None or a bool, got {type(strict).__name__} {strict!r}")
    return strict


@contextmanager
def strict_mode(enabled: bool = True) -> Iterator[None]:
    """``with strict_mode(): ...`` runs the block with strict mode on (or off with ``enabled=False``)."""
    global _enabled
    previous = _enabled
    set_strict(enabled)
    try:
        yield
    finally:
        _enabled = previous

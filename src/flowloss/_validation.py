"""Argument checks shared by the public functions.

Two kinds (see `flowloss.strict`):

* metadata checks (type, shape, dtype, device, option values): always on, free, never read device memory;
* value checks (``*_values`` helpers below): read tensor contents, so they run only in strict mode.

Every check raises ``ValueError`` (bad shape, value or option) or ``TypeError`` (bad type or dtype) with a
message that names the argument and shows the shapes/dtypes involved.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def describe(t: torch.Tensor) -> str:
    """``shape=(2, 3) dtype=torch.float32 device=cpu``: the facts an error message needs."""
    return f"shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"


# ------------------------------------------------------------------------------------------------------
# Python options (numbers, flags, choices): exact types, so that a config typo fails at once.


def _is_numpy_bool(value: object) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def _is_real(value: object) -> bool:
    # numpy floating/integer scalars are numbers.Real; bool and numpy bools are refused as numbers.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_numpy_bool(value)


def as_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = True,
) -> float:
    """``value`` as a Python float (ints and numpy scalars accepted) inside ``[low, high]``, else raise.

    The message states the accepted range, e.g. "`eps_low` must be a number in [0.0, 1.0), got 1.5".
    """
    if isinstance(value, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a Python number, got a tensor ({describe(value)}); reading its value would "
            "synchronise with the device: pass float(...) once, outside the training step"
        )
    ok = _is_real(value)
    number = float(value) if ok else math.nan  # type: ignore[arg-type]
    if ok and finite and not math.isfinite(number):
        ok = False
    if ok and low is not None:
        ok = number >= low if low_inclusive else number > low
    if ok and high is not None:
        ok = number <= high if high_inclusive else number < high
    if not ok or math.isnan(number):
        if low is None and high is None:
            bound = "a finite number" if finite else "a number"
        elif high is None:
            bound = f"a number {'>=' if low_inclusive else '>'} {low!r}" + (" (finite)" if finite else "")
        elif low is None:
            bound = f"a number {'<=' if high_inclusive else '<'} {high!r}"
        else:
            lo = "-inf" if low is None else repr(float(low))
            hi = "inf" if high is None else repr(float(high))
            left = "[" if (low_inclusive and low is not None) else "("
            right = "]" if (high_inclusive and high is not None) else ")"
            bound = f"a number in {left}{lo}, {hi}{right}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}")
    return number


def as_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool (or numpy bool), else TypeError: ``"false"`` or ``0`` is never read as a flag."""
    if isinstance(value, bool):
        return value
    if _is_numpy_bool(value):
        return bool(value)
    raise TypeError(f"`{name}` must be a bool (True/False), got {type(value).__name__} {value!r}")


def as_index(name: str, value: object) -> int:
    """``value`` as a Python int inside the int64 range (numpy integers accepted; bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(f"`{name}` must fit in int64 [-2**63, 2**63 - 1], got {number}")
    return number


def require_choice(name: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def require_finite_number(name: str, value: object) -> float:
    """A finite Python number (ints and numpy scalars accepted); returned as float."""
    return as_number(name, value)


def as_temperature(value: object) -> float:
    """A sampling temperature: finite, with ``1/T`` finite in float32 (``T >= 2**-126``, the smallest normal).

    Smaller values (``1e-45``) round to 0 in the float32 kernels and would silently give NaN.
    """
    try:
        return as_number("temperature", value, low=torch.finfo(torch.float32).tiny)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`temperature` must be a finite number > 0 (at least 2**-126, the smallest normal float32), "
            f"got {value!r}"
        ) from err


# ------------------------------------------------------------------------------------------------------
# Tensor metadata (always checked; never reads device memory).


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a floating-point tensor (fp16/bf16/fp32/fp64), got {describe(t)}")


def require_float_tensor(name: str, value: object) -> torch.Tensor:
    require_tensor(name, value)
    require_float(name, value)  # type: ignore[arg-type]
    return value  # type: ignore[return-value]


def require_ndim(name: str, t: torch.Tensor, ndims: Iterable[int], meaning: str) -> None:
    ndims = tuple(ndims)
    if t.dim() not in ndims:
        raise ValueError(f"`{name}` must be {meaning}, got {describe(t)}")


def require_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `{ref_name}` {tuple(ref.shape)}, got {tuple(t.shape)}"
        )


def require_same_device(tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in tensors if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"`{name}` is on {t.device} but `{first_name}` is on {first.device}; move them to one device"
            )


def as_bool_mask(
    name: str, mask: object, like_name: str, like: torch.Tensor, *, strict: bool = False
) -> torch.Tensor:
    """A response mask (bool, or integer/float 0/1) of ``like``'s shape, as bool.

    A non-bool mask is read as ``mask != 0``; strict mode also refuses values other than 0 and 1.
    """
    require_tensor(name, mask)
    assert isinstance(mask, torch.Tensor)
    require_same_shape(name, mask, like_name, like)
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex:
        raise TypeError(f"`{name}` must be bool or 0/1 values, got {describe(mask)}")
    if strict and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"`{name}` must hold only 0/1 (or be bool), got other values in {describe(mask)}")
    return mask != 0


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (the precision all losses accumulate in)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# ------------------------------------------------------------------------------------------------------
# Value checks (strict mode only: each reads device memory).


def check_finite_values(checks: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise for the first ``(name, tensor)`` holding a non-finite value; one host sync when all are finite."""
    if not checks:
        return
    if bool(torch.stack([torch.isfinite(t).all() for _, t in checks]).all()):
        return
    for name, t in checks:
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"`{name}` must be finite, found {bad} non-finite value(s) in {describe(t)}")


def check_finite_where(mask: torch.Tensor, tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Raise for non-finite values at positions where ``mask`` is True (messages say "at unmasked positions")."""
    checks = [
        (f"{name} (at unmasked positions)", torch.where(mask, t.detach(), t.new_zeros(())))
        for name, t in tensors
        if t is not None
    ]
    check_finite_values(checks)


"""Argument checks shared by the public functions.

Every check raises ``ValueError`` (bad shape, value or option) or ``TypeError`` (bad type or dtype) with a
message that names the argument and shows the shapes/dtypes involved, so a user never meets a NaN or a crash
deep inside a kernel instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: torch.Tensor) -> str:
    """``shape=(2, 3) dtype=torch.float32 device=cpu``: the facts an error message needs."""
    return f"shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a floating-point tensor (fp16/bf16/fp32/fp64), got {describe(t)}")


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


def require_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"`{name}` must be finite, found {bad} non-finite value(s) in {describe(t)}")


def as_bool_mask(name: str, mask: torch.Tensor, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """Validate a response mask (bool, or integer/float 0/1) of ``like``'s shape and return it as bool."""
    require_tensor(name, mask)
    require_same_shape(name, mask, like_name, like)
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex:
        raise TypeError(f"`{name}` must be bool or 0/1 values, got {describe(mask)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"`{name}` must hold only 0/1 (or be bool), got other values in {describe(mask)}")
    return mask.bool()


def require_choice(name: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def require_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a number {bound}, got {value!r}")


def require_finite_number(name: str, value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (-float("inf") < value < float("inf"))
    ):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (the precision all losses accumulate in)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32

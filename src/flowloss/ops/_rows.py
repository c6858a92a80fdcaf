"""Row blocks: 2-D views of ``[N, V]`` or ``[B, T, V]`` logits (and of their gradient buffer), never copies.

A ``[B, T, V]`` tensor is *flattenable* when it can be viewed as ``[B*T, V]`` (decided from its strides, no
exception handling, so ``torch.compile`` can trace it); ``logits[:, :-1]`` of a ``[B, T+1, V]`` tensor is not,
and its blocks then stay inside one sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def can_flatten(t: torch.Tensor) -> bool:
    """Whether ``t`` (2-D or 3-D) can be viewed as ``[N, t.shape[-1]]`` without a copy."""
    if t.dim() <= 2:
        return True
    b, s, _ = t.shape
    return b <= 1 or s <= 1 or t.stride(0) == t.stride(1) * s


def flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[N, V]`` without a copy, or None when its strides do not allow it."""
    if t.dim() == 2:
        return t
    if not can_flatten(t):
        return None
    return t.view(-1, t.shape[-1])


def segments(kept: list[bool] | None, n: int, skip_at_least: int) -> list[tuple[int, int, bool]]:
    """Split rows ``0:n`` into ``(lo, hi, kept)`` runs: ``kept=False`` for runs of at least ``skip_at_least``
    consecutive skipped rows (never read), ``kept=True`` for the rest (shorter skipped runs inside them are
    computed and zeroed, which keeps blocks full). ``kept`` is a host-side list (CPU tensors only: reading it
    from a device would synchronise); None means every row is kept."""
    if kept is None or n == 0 or all(kept):
        return [(0, n, True)]
    out: list[tuple[int, int, bool]] = []
    lo = i = 0
    while i < n:
        if kept[i]:
            i += 1
            continue
        j = i
        while j < n and not kept[j]:
            j += 1
        if j - i >= skip_at_least:
            if i > lo:
                out.append((lo, i, True))
            out.append((i, j, False))
            lo = j
        i = j
    if lo < n:
        out.append((lo, n, True))
    return out


def row_blocks(
    shape: torch.Size, flat_ok: bool, rows: int, kept: list[bool] | None = None
) -> Iterator[tuple[int, int, tuple, bool]]:
    """``(lo, hi, index, kept)``: flat rows ``lo:hi`` are ``t[index]`` (2-D) for ``t`` of ``shape``.

    Kept runs come in blocks of at most ``rows`` rows; a long run of skipped rows comes as ``kept=False``
    blocks, which forward never reads and backward only zeroes. When ``t`` cannot be flattened as a view,
    blocks stay inside one sequence: ``index = (b, slice(t0, t1))``.
    """
    n = shape[0] if len(shape) == 2 else shape[0] * shape[1]
    seq = None if (flat_ok or len(shape) == 2) else shape[1]
    for lo, hi, is_kept in segments(kept, n, skip_at_least=max(1, rows // 2)):
        step = rows if is_kept else hi - lo
        start = lo
        while start < hi:
            stop = min(hi, start + step)
            if seq is None:
                index: tuple = (slice(start, stop),)
            else:
                b = start // seq
                stop = min(stop, (b + 1) * seq)
                index = (b, slice(start - b * seq, stop - b * seq))
            yield start, stop, index, is_kept
            start = stop


def pick(t: torch.Tensor, flat: torch.Tensor | None, index: tuple) -> torch.Tensor:
    """The 2-D block ``index`` of ``t`` (through its flat view when there is one)."""
    return (flat if flat is not None else t)[index]

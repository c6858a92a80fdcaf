"""Penalties ``g(delta)`` applied to the trajectory-balance residual.

All are convex, zero at ``delta = 0`` and scaled so that ``g(delta) = delta^2 + O(delta^3)`` near 0, so swapping
the penalty keeps the loss scale (and Proposition 1 to first order) while changing the tails:

* ``"squared"``:      ``delta^2`` (FlowRL, trajectory balance);
* ``"shifted_cosh"``: ``2 (cosh(delta) - 1)`` (torchgfn's shifted-cosh alternative; heavier tails);
* ``"linex"``:        ``2 (exp(a delta) - a delta - 1) / a^2`` (torchgfn's linex, asymmetric; ``a = linex_alpha``);
* ``"huber"``:        ``delta^2`` for ``|delta| <= k``, ``k (2 |delta| - k)`` beyond (bounded gradient;
  ``k = huber_delta``).

``cosh``/``exp`` tails overflow to ``inf`` in float32 past ``|delta| ~ 88``: that is the true value out of range.
The options are checked by `flowloss.FlowRLOptions`.
"""

from __future__ import annotations

import torch

from flowloss.options import PENALTIES, Penalty


def apply_penalty(delta: torch.Tensor, penalty: Penalty, *, linex_alpha: float, huber_delta: float) -> torch.Tensor:
    """Elementwise ``g(delta)`` (see the module docstring)."""
    if penalty == "squared":
        return delta * delta
    if penalty == "shifted_cosh":
        return 2.0 * (torch.cosh(delta) - 1.0)
    if penalty == "linex":
        a = linex_alpha
        return 2.0 * torch.expm1(a * delta).sub(a * delta) / (a * a)
    if penalty == "huber":
        k = huber_delta
        absd = delta.abs()
        return torch.where(absd <= k, delta * delta, k * (2.0 * absd - k))
    raise ValueError(f"`penalty` must be one of {PENALTIES}, got {penalty!r}")

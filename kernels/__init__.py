"""Triton kernels (no autograd, no loss logic). Importable as ``flowloss.kernels``.

- ``logprob_forward``: per-row log-prob of the chosen token, log-sum-exp and entropy in one pass.
- ``logprob_backward``: ``dlogits`` recomputed from the saved log-sum-exp (optionally in place).
- ``linear_logprob_forward``: the same from hidden states and the ``lm_head`` weight, logits never stored.
- ``linear_logprob_backward``: ``d_hidden``, ``d_weight``, ``d_bias`` of it, deterministic, bounded scratch.
- ``tb_forward`` / ``tb_backward``: the trajectory-balance loss's per-sequence part, one launch each way.

Importing this package never needs triton; the launchers below are ``None`` when triton is missing
(``HAS_TRITON`` tells which), and importing a kernel module directly raises ``ImportError`` then.
"""

from __future__ import annotations

try:
    from .linear_logprob_backward import linear_logprob_backward
    from .linear_logprob_forward import linear_logprob_forward
    from .logprob_backward import logprob_backward
    from .logprob_forward import logprob_forward
    from .tb_loss import tb_backward, tb_forward

    HAS_TRITON = True
except ImportError:  # triton not installed (e.g. macOS/Windows CPU builds)
    logprob_forward = None
    logprob_backward = None
    linear_logprob_forward = None
    linear_logprob_backward = None
    tb_forward = None
    tb_backward = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "linear_logprob_backward",
    "linear_logprob_forward",
    "logprob_backward",
    "logprob_forward",
    "tb_backward",
    "tb_forward",
]

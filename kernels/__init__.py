"""Triton kernels (no autograd, no loss logic). Importable as ``flowloss.kernels``; importing it needs triton.

- ``logprob_forward``: per-row log-prob of the chosen token, log-sum-exp and entropy in one pass.
- ``logprob_backward``: ``dlogits`` recomputed from the saved log-sum-exp (optionally in place).
- ``linear_logprob_forward``: the same from hidden states and the ``lm_head`` weight, logits never stored.
- ``linear_logprob_backward``: ``d_hidden``, ``d_weight``, ``d_bias`` of it, deterministic, bounded scratch
  (its chunk plan: ``linear_logprob_plan``).
- ``tb_forward`` / ``tb_backward``: the trajectory-balance loss's per-sequence part, one launch each way.
- ``configs``: the launch configuration of each family per GPU target, and the device's target.

Every launcher runs its kernels under the device of its tensors (``launch.on_device``). Whether triton can be
used at all is decided in one place, ``flowloss.ops.dispatch.triton_available``, before anything here is imported.
"""

from __future__ import annotations

__all__: list[str] = []

# Installed, this folder is `flowloss.kernels`. From the root of a flowloss checkout (a script's or pytest's path)
# it is also reachable as a top-level `kernels`, the import name of Hugging Face's `kernels` package, which
# transformers probes for by importing it: under that name it stays empty, so the probe finds no usable package
# (no version) instead of failing on a missing triton or picking up these launchers.
if __name__ == "flowloss.kernels":
    from .linear_logprob_backward import linear_logprob_backward
    from .linear_logprob_forward import linear_logprob_forward
    from .logprob_backward import logprob_backward
    from .logprob_forward import logprob_forward
    from .tb_loss import tb_backward, tb_forward

    __all__ = [
        "linear_logprob_backward",
        "linear_logprob_forward",
        "logprob_backward",
        "logprob_forward",
        "tb_backward",
        "tb_forward",
    ]

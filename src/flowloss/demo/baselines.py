"""BASELINE (not part of FlowRL): a GRPO-style clipped policy-gradient loss, for the demo's comparison only.

GRPO (Shao et al. 2024, DeepSeekMath) maximizes reward with group-normalized advantages
``A_i = (r_i - mean_g) / (std_g + eps)`` and PPO's clipped ratio, per token ``t`` of response ``i``::

    rho_it = pi_theta(y_it) / pi_old(y_it)
    loss   = -(1/B) sum_i (1/|y_i|) sum_t min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
             + kl_coef * (1/B) sum_i (1/|y_i|) sum_t k3_it,  k3 = exp(q) - q - 1,  q = log pi_ref - log pi

(sequence-mean of token-means, as in the GRPO paper; ``k3`` is its unbiased KL estimator, off by default as in
recent GRPO/DAPO practice and FlowRL's own runs). It is written here, in the demo, and nowhere in the library.
"""

from __future__ import annotations

import torch

# PPO/DAPO clip ratios, the same values FlowRL's recipe uses for its importance weights.
GRPO_EPS_LOW = 0.2
GRPO_EPS_HIGH = 0.28


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = GRPO_EPS_LOW,
    eps_high: float = GRPO_EPS_HIGH,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """GRPO's clipped surrogate: ``[B, T]`` log-probs and mask, ``[B]`` advantages -> 0-dim.

    Gradients flow into ``logprobs`` only.
    On-policy (``old = logprobs.detach()``, ``kl_coef = 0``) the gradient
    is ``-(1/B) sum_i A_i (1/|y_i|) sum_t grad log pi(y_it)``: REINFORCE with the group-mean baseline.
    """
    m = mask.to(logprobs.dtype)
    lengths = m.sum(dim=-1).clamp_min(1.0)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logprobs.dtype)[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    per_token = -surrogate
    if kl_coef:
        q = ref_logprobs.detach() - logprobs
        per_token = per_token + kl_coef * (torch.exp(q) - q - 1.0)
    return ((per_token * m).sum(dim=-1) / lengths).mean()

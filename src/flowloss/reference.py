"""Plain float64 reference implementations: the oracle every fast path is tested against.

Written to be obviously right rather than fast: Python loops over sequences and tokens, one formula per line,
float64 throughout. Every function is differentiable with autograd (through float64 copies of its inputs), so
tests compare values *and* gradients. Nothing here validates its input; the public functions do.
"""

from __future__ import annotations

import math

import torch

from flowloss.options import REVERSE_KL_DEFAULTS as _RKL
from flowloss.options import TB_DEFAULTS as _D  # the defaults of the functions checked against this oracle

F64 = torch.float64


def _kept_tokens(mask_row: torch.Tensor) -> list[int]:
    return [t for t in range(mask_row.shape[0]) if bool(mask_row[t])]


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """``[B, T] -> [B]``: ``sum_t`` (or ``mean_t`` when ``normalize``) of the kept tokens; 0 for an empty row."""
    out = []
    for i in range(logprobs.shape[0]):
        tokens = _kept_tokens(mask[i])
        total = torch.zeros((), dtype=F64)
        for t in tokens:
            total = total + logprobs[i, t].to(F64)
        if normalize and tokens:
            total = total / len(tokens)
        out.append(total)
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


def group_normalize_rewards(rewards: torch.Tensor, group_ids: list[int], *, eps: float, scale: bool = True):
    """``(r - mean_g) / (std_g + eps)``, unbiased std; a group of one has mean 0 and std 1."""
    r = [float(v) for v in rewards]
    out = []
    for i, g in enumerate(group_ids):
        members = [r[j] for j, h in enumerate(group_ids) if h == g]
        n = len(members)
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(members) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in members) / (n - 1))
        out.append((r[i] - mean) / (std + eps) if scale else r[i] - mean)
    return torch.tensor(out, dtype=F64)


def importance_weights(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    eps_low: float = _D.eps_low,
    eps_high: float = _D.eps_high,
    max_weight: float = _D.max_weight,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = _D.tis_cap,
) -> torch.Tensor:
    """Per-sequence weights, one mode at a time, straight from the formulas (see ``flowloss.importance``)."""
    out = []
    for i in range(logprobs.shape[0]):
        tokens = _kept_tokens(mask[i])
        ratios = [float(logprobs[i, t]) - float(old_logprobs[i, t]) for t in tokens]
        log_sum = sum(ratios)
        log_mean = log_sum / len(tokens) if tokens else 0.0
        if mode == "none":
            log_w = 0.0
        elif mode == "sequence":
            log_w = min(log_sum, 20.0)  # the documented cap of the unclipped mode
        elif mode == "sequence_capped":
            log_w = min(log_sum, math.log(max_weight))
        elif mode == "sequence_clipped":
            log_w = min(max(log_sum, math.log(1 - eps_low)), math.log(1 + eps_high))
        elif mode == "geometric_clipped":
            log_w = min(max(log_mean, math.log(1 - eps_low)), math.log(1 + eps_high))
        else:
            raise ValueError(mode)
        if rollout_logprobs is not None:
            tis = [float(old_logprobs[i, t]) - float(rollout_logprobs[i, t]) for t in tokens]
            log_tis = sum(tis) / len(tokens) if (mode == "geometric_clipped" and tokens) else sum(tis)
            log_w = log_w + min(log_tis, math.log(tis_cap))
        out.append(math.exp(log_w))
    return torch.tensor(out, dtype=F64)


def ratio_clip_token_mask(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = _D.eps_low,
    eps_high: float = _D.eps_high,
) -> torch.Tensor:
    """Keep token ``t`` of row ``i`` unless ``A_i > 0`` and ``log(pi/pi_old) > log(1 + eps_high)``, or ``A_i < 0``
    and ``log(pi/pi_old) < log(1 - eps_low)`` (a ratio exactly on a bound is kept; a non-finite one is kept);
    masked tokens stay out."""
    kept = torch.zeros(mask.shape, dtype=torch.bool)
    for i in range(mask.shape[0]):
        a = float(advantages[i])
        for t in _kept_tokens(mask[i]):
            log_ratio = float(logprobs[i, t]) - float(old_logprobs[i, t])
            too_high = a > 0 and log_ratio > math.log1p(eps_high)
            too_low = a < 0 and log_ratio < math.log1p(-eps_low)
            kept[i, t] = not (too_high or too_low) or not math.isfinite(log_ratio)
    return kept


def penalty(delta: torch.Tensor, name: str, *, linex_alpha: float, huber_delta: float):
    if name == "squared":
        return delta**2
    if name == "shifted_cosh":
        return 2 * (torch.cosh(delta) - 1)
    if name == "linex":
        a = linex_alpha
        return 2 * (torch.exp(a * delta) - a * delta - 1) / a**2
    if name == "huber":
        k = huber_delta
        return delta**2 if abs(float(delta.detach())) <= k else k * (2 * delta.abs() - k)
    raise ValueError(name)


def trajectory_balance_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = _D.beta,
    weights: torch.Tensor | None = None,
    length_normalization: bool = _D.length_normalization,
    penalty_name: str = _D.penalty,
    reduction: str = _D.reduction,
    normalizer: float | None = None,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i w_i g(log Z_i + l_i - beta r_i - l_ref_i) / N`` over rows with at least one kept token.

    ``kept`` (default ``mask``): the tokens that enter the means (the token clip mask); ``N`` counts the rows
    with a token in ``mask``, and a row with no kept token contributes 0.
    """
    log_z = log_z.reshape(-1)
    kept = mask if kept is None else kept
    per_seq = []
    valid = []
    for i in range(logprobs.shape[0]):
        tokens = _kept_tokens(kept[i])
        valid.append(bool(_kept_tokens(mask[i])))
        lp = sum((logprobs[i, t].to(F64) for t in tokens), torch.zeros((), dtype=F64))
        ref = sum((ref_logprobs[i, t].to(F64) for t in tokens), torch.zeros((), dtype=F64))
        if length_normalization and tokens:
            lp, ref = lp / len(tokens), ref / len(tokens)
        delta = log_z[i].to(F64) + lp - beta * rewards[i].to(F64) - ref
        w = 1.0 if weights is None else weights[i].to(F64)
        g = penalty(delta, penalty_name, linex_alpha=_D.linex_alpha, huber_delta=_D.huber_delta)
        per_seq.append(w * g if tokens else torch.zeros((), dtype=F64))
    stacked = torch.stack(per_seq)
    if reduction == "none":
        return stacked if normalizer is None else stacked / normalizer
    total = stacked.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    return total / max(sum(valid), 1)


def reverse_kl_surrogate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = _RKL.beta,
    baseline: float = 0.0,
    weights: torch.Tensor | None = None,
    length_normalization: bool = _RKL.length_normalization,
) -> torch.Tensor:
    """``(1/N) sum_i w_i sg(l_i - l_ref_i - beta r_i - b) l_i`` over rows with at least one kept token."""
    terms = []
    for i in range(logprobs.shape[0]):
        tokens = _kept_tokens(mask[i])
        if not tokens:
            continue
        lp = sum((logprobs[i, t].to(F64) for t in tokens), torch.zeros((), dtype=F64))
        ref = sum((float(ref_logprobs[i, t]) for t in tokens), 0.0)
        if length_normalization:
            lp, ref = lp / len(tokens), ref / len(tokens)
        coefficient = float(lp.detach()) - ref - beta * float(rewards[i]) - baseline
        w = 1.0 if weights is None else float(weights[i])
        terms.append(w * coefficient * lp)
    if not terms:
        return torch.zeros((), dtype=F64)
    return torch.stack(terms).sum() / len(terms)


def vargrad_log_z(
    logprobs, ref_logprobs, rewards, mask, group_ids: list[int], *, beta: float, normalize: bool
):
    """``mean_k [beta r_k - (l_k - l_ref_k)]`` over the non-empty members of each row's group."""
    lp = sequence_logprob(logprobs, mask, normalize=normalize)
    ref = sequence_logprob(ref_logprobs, mask, normalize=normalize)
    out = []
    for g in group_ids:
        members = [j for j, h in enumerate(group_ids) if h == g and bool(mask[j].any())]
        values = [
            beta * float(rewards[j]) - (float(lp[j].detach()) - float(ref[j].detach())) for j in members
        ]
        out.append(sum(values) / len(values) if values else 0.0)
    return torch.tensor(out, dtype=F64)


def pool_prompt_hidden_states(
    hidden_states: torch.Tensor, prompt_mask: torch.Tensor, *, drop_last_token=False
):
    """Mean over each row's prompt tokens (optionally without the last one); zeros for an empty row."""
    out = []
    for i in range(hidden_states.shape[0]):
        tokens = _kept_tokens(prompt_mask[i])
        if drop_last_token and tokens:
            tokens = tokens[:-1]
        row = torch.zeros(hidden_states.shape[-1], dtype=F64)
        for t in tokens:
            row = row + hidden_states[i, t].to(F64)
        out.append(row / len(tokens) if tokens else row)
    return torch.stack(out)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``log softmax(z / T)[label]`` and entropy ``-sum_v p_v log p_v`` in float64.

    ``logits [N, V]``, ``labels [N]``. Rows whose label equals ``ignore_index`` give 0 and 0. Each row is
    ``z - logsumexp(z)`` of its own float64 copy, so the result is exact to float64 rounding.
    """
    logprobs, entropies = [], []
    for i in range(logits.shape[0]):
        label = int(labels[i])
        if label == ignore_index:
            logprobs.append(torch.zeros((), dtype=F64))
            entropies.append(torch.zeros((), dtype=F64))
            continue
        z = logits[i].to(F64) / temperature
        log_p = z - torch.logsumexp(z, dim=0)
        p = torch.exp(log_p)
        logprobs.append(log_p[label])
        # 0 log 0 = 0, written so that the gradient is finite too (no where(0 * -inf) in the graph)
        safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        entropies.append(-(p * safe_log_p).sum())
    if not logprobs:
        return torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64)
    return torch.stack(logprobs), torch.stack(entropies)

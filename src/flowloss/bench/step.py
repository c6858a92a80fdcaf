"""``--op step``: one whole RL update of a transformer per loss path, against the model's own share of it.

Every path runs on the same model (`flowloss.bench.step_model`), the same batch and the same optimizer, and one
*step* is always::

    reference forward and log-probs (no grad) -> policy forward and log-probs
    -> [log Z from the prompt's hidden states] -> loss -> backward -> AdamW step -> zero_grad(set_to_none=False)

The reference goes first, so that its logits are freed before the policy's exist: TRL and OpenRLHF compute the
reference log-probs in a phase of their own, never next to the policy's graph.

Paths (the rows of the table):

- ``model``: the backbone alone, the part every path shares: ``ref.model`` forward under no_grad,
  ``policy.model`` forward, backward from a random gradient on the last hidden states ``[B, L, H]``, AdamW step.
  No lm_head, no log-probs, no loss. ``step - model`` is each path's *loss path*: lm_head projections,
  log-probs, log Z, the loss and their backward.
- ``grpo-logits``: what TRL and OpenRLHF users run: ``policy(..., logits_to_keep=Lr + 1).logits`` (only the
  response positions are projected, as TRL asks), ``trl.trainer.utils.selective_log_softmax`` when trl is installed
  (otherwise the same computation in plain PyTorch: a loop over the batch rows, ``log_softmax`` of each row in
  float32, gather), the same for the reference under no_grad, then GRPO: the clipped surrogate on the group z-scored
  rewards plus ``0.04 * k3`` KL to the reference, token mean per sequence, mean over sequences (TRL's
  ``loss_type="grpo"``, ``epsilon = 0.2``).
- ``flowloss-logits``: ``policy(..., logits_to_keep=Lr + 1, output_hidden_states=True)``,
  `flowloss.token_logprobs` (``inplace_backward=True``: nothing else reads these logits), the same for the
  reference under no_grad, ``log Z = LogZHead(pool_prompt_hidden_states(last hidden states, prompt mask))``,
  `flowloss.trajectory_balance_loss` (``beta = 15``, importance weights from ``old_logprobs``).
- ``flowloss-hidden``: ``policy.model(...)`` for the hidden states only (the ``[B, Lr, V]`` logits are never built),
  `flowloss.token_logprobs_from_hidden` with ``policy.lm_head.weight``, the same for the reference, then log Z and
  the loss as above.
- ``liger-grpo``: ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` on the policy's response hidden states
  and ``lm_head.weight``, the reference's hidden states and weight passed as ``ref_input`` / ``ref_weight``
  (``loss_type="grpo"``, ``beta = 0.04``, ``epsilon = 0.2``: the GRPO loss of ``grpo-logits``).

Figures per path: the step time (median, p20-p80 over rounds that run one step of every path each, so that load
changes on a shared machine reach every path alike), tokens per second (``B L`` positions per median step; also
``valid`` non-padding tokens), peak memory *above the baseline*, the bytes allocated when a step starts (policy
weights and their gradients, kept allocated between steps, AdamW's two states, the reference weights, the log-Z
head with its gradient and states, and the batch): of the forward + backward (activations and the loss path's
temporaries, where paths differ) and of the whole step (the larger of that and the AdamW step's own temporaries,
``optimizer_peak_bytes``); on CUDA, the largest batch that fits (sequences grown at fixed ``L`` until CUDA runs
out of memory); and a check of each path from the same initial weights: its log-probs and loss against float64
(`float64_reference`, `reference_loss`), its loss and policy gradients against the other path of the same objective
(`COMPARED_WITH`).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowloss.bench import reference as ref
from flowloss.bench.memory import peak_extra_bytes
from flowloss.bench.step_model import (
    PRESETS,
    StepBatch,
    StepModels,
    build_models,
    make_batch,
    optimizer_state_bytes,
    parameter_count,
    seeded,
    tensor_bytes,
)
from flowloss.bench.timing import summarize, time_calls

FLOWRL_BETA = 15.0  # FlowRL's reward temperature (the authors' value; flowloss's default)
GRPO_EPSILON = 0.2  # PPO/GRPO clip range (TRL's and Liger's default)
GRPO_KL_BETA = 0.04  # GRPO's KL coefficient (DeepSeekMath; Liger's default)
MAX_FIT_TOKENS = 2**21  # the batch search never goes past this many tokens per step
FIT_BISECTIONS = 3  # after the first out-of-memory, halve the gap this many times (1/8 of the last fit)
MODEL_ROW = "model"
CHECK_SEED = 1234  # the log-Z head's dropout mask is the same for every path in the check


@dataclass
class StepSettings:
    temperature: float
    beta: float = FLOWRL_BETA


@dataclass
class PathOutput:
    """What a path built for one step; ``backward()`` runs its backward pass."""

    loss: torch.Tensor | None = None  # 0-dim loss
    logprobs: torch.Tensor | None = None  # [B, Lr] policy token log-probs, when the path forms them
    ref_logprobs: torch.Tensor | None = None  # [B, Lr] the reference's (no grad)
    log_z: torch.Tensor | None = None  # [B], FlowRL paths
    hidden: torch.Tensor | None = None  # model row: the backbone output and the gradient fed to it
    hidden_grad: torch.Tensor | None = None

    def backward(self) -> None:
        if self.loss is not None:
            self.loss.backward()
        else:
            torch.autograd.backward(self.hidden, self.hidden_grad)


Path = Callable[[StepModels, StepBatch, StepSettings], PathOutput]


# --- the paths ----------------------------------------------------------------------------------------------


def _model_inputs(b: StepBatch) -> dict[str, torch.Tensor]:
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids}


def _response_hidden(hidden: torch.Tensor, b: StepBatch) -> torch.Tensor:
    """``[B, L, H] -> [B, Lr, H]``: the positions whose next token is a response token."""
    return hidden[:, b.prompt_len - 1 : -1]


def model_only(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
    """The backbone's own forward and backward (the ``model`` row)."""
    with torch.no_grad():
        m.ref.model(**_model_inputs(b))
    hidden = m.policy.model(**_model_inputs(b)).last_hidden_state
    # a random stand-in for the gradient a loss would send back (a few MiB, drawn afresh each step)
    return PathOutput(hidden=hidden, hidden_grad=torch.randn_like(hidden).mul_(1e-3))


def plain_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` in plain PyTorch: a loop over batch rows, ``log_softmax`` of each row's
    ``[Lr, V]`` logits in float32 (float64 stays float64), gather of the label; ``logits / T`` first, as TRL
    divides. (TRL's own PyTorch fallback keeps bf16 rows in bf16; this twin upcasts them.)"""
    logits = logits / temperature
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = [torch.log_softmax(z.to(dtype), dim=-1).gather(-1, i[:, None]).squeeze(-1) for z, i in zip(logits, index)]
    return torch.stack(rows)


def _trl_selective(device: torch.device) -> tuple[Callable, str]:
    """``(selective(logits, index, T), note)``: TRL's when trl is importable, else the plain PyTorch twin."""
    try:
        import trl
        from trl.trainer.utils import selective_log_softmax
    except ModuleNotFoundError as err:
        if err.name not in ("trl", "trl.trainer", "trl.trainer.utils"):
            return plain_selective_log_softmax, f"trl not importable ({_short(err)}): its plain PyTorch twin ran"
        return plain_selective_log_softmax, "trl not installed: the plain PyTorch twin of TRL's helper ran"
    except Exception as err:  # an installed trl that cannot import here (a missing or mismatched dependency)
        return plain_selective_log_softmax, f"trl not importable ({_short(err)}): its plain PyTorch twin ran"
    import inspect

    if "temperature" in inspect.signature(selective_log_softmax).parameters:

        def selective(logits, index, temperature):
            return selective_log_softmax(logits, index, temperature=temperature)

    else:

        def selective(logits, index, temperature):
            return selective_log_softmax(logits / temperature, index)

    return selective, f"trl {trl.__version__} selective_log_softmax"


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = GRPO_EPSILON,
    kl_beta: float = GRPO_KL_BETA,
) -> torch.Tensor:
    """GRPO (DeepSeekMath; TRL ``loss_type="grpo"``): per token ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)
    + kl_beta (exp(ref - lp) - (ref - lp) - 1)`` with ``rho = exp(lp - old)``, averaged over each sequence's
    response tokens, then over sequences. ``[B, Lr]`` log-probs, ``[B]`` advantages, ``[B, Lr]`` bool mask."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    log_ratio_ref = ref_logprobs - logprobs
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
    per_token = (surrogate + kl_beta * kl) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def _advantages(b: StepBatch) -> torch.Tensor:
    from flowloss import group_normalize_rewards

    return group_normalize_rewards(b.rewards, b.group_size)


def build_grpo_logits(device: torch.device) -> Path:
    selective, note = _trl_selective(device)

    def grpo_logits(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
        keep = b.response_len + 1
        with torch.no_grad():
            ref_logits = m.ref(**_model_inputs(b), logits_to_keep=keep).logits[:, :-1]
            ref_logprobs = selective(ref_logits, b.response_ids, s.temperature)
            del ref_logits
        logits = m.policy(**_model_inputs(b), logits_to_keep=keep).logits[:, :-1]
        logprobs = selective(logits, b.response_ids, s.temperature)
        loss = grpo_loss(logprobs, b.old_logprobs, ref_logprobs, _advantages(b), b.response_mask)
        return PathOutput(loss=loss, logprobs=logprobs, ref_logprobs=ref_logprobs)

    grpo_logits.note = note  # type: ignore[attr-defined]
    return grpo_logits


def _log_z(m: StepModels, hidden: torch.Tensor, b: StepBatch) -> torch.Tensor:
    from flowloss import pool_prompt_hidden_states

    return m.head(pool_prompt_hidden_states(hidden, b.prompt_mask))


def _flowrl_loss(m, b, s, logprobs, ref_logprobs, log_z) -> torch.Tensor:
    from flowloss import group_normalize_rewards, trajectory_balance_loss

    r_hat = group_normalize_rewards(b.rewards, b.group_size)
    return trajectory_balance_loss(
        logprobs, ref_logprobs, r_hat, log_z, b.response_mask, beta=s.beta, old_logprobs=b.old_logprobs
    )


def flowloss_logits(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
    from flowloss import token_logprobs

    keep = b.response_len + 1
    with torch.no_grad():
        ref_logits = m.ref(**_model_inputs(b), logits_to_keep=keep).logits[:, :-1]
        ref_logprobs = token_logprobs(ref_logits, b.labels, temperature=s.temperature)
        del ref_logits
    out = m.policy(**_model_inputs(b), logits_to_keep=keep, output_hidden_states=True)
    logprobs = token_logprobs(out.logits[:, :-1], b.labels, temperature=s.temperature, inplace_backward=True)
    log_z = _log_z(m, out.hidden_states[-1], b)
    loss = _flowrl_loss(m, b, s, logprobs, ref_logprobs, log_z)
    return PathOutput(loss=loss, logprobs=logprobs, ref_logprobs=ref_logprobs, log_z=log_z)


def flowloss_hidden(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
    from flowloss import token_logprobs_from_hidden

    with torch.no_grad():
        ref_hidden = m.ref.model(**_model_inputs(b)).last_hidden_state
        ref_logprobs = token_logprobs_from_hidden(
            _response_hidden(ref_hidden, b), m.ref.lm_head.weight, b.labels, temperature=s.temperature
        )
        del ref_hidden
    hidden = m.policy.model(**_model_inputs(b)).last_hidden_state
    logprobs = token_logprobs_from_hidden(
        _response_hidden(hidden, b), m.policy.lm_head.weight, b.labels, temperature=s.temperature
    )
    log_z = _log_z(m, hidden, b)
    loss = _flowrl_loss(m, b, s, logprobs, ref_logprobs, log_z)
    return PathOutput(loss=loss, logprobs=logprobs, ref_logprobs=ref_logprobs, log_z=log_z)


def build_liger_grpo(device: torch.device) -> Path:
    import inspect

    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    options = {"beta": GRPO_KL_BETA, "epsilon_low": GRPO_EPSILON, "epsilon_high": GRPO_EPSILON, "use_ref_model": True}
    accepted = inspect.signature(LigerFusedLinearGRPOLoss).parameters
    if "loss_type" in accepted:
        options["loss_type"] = "grpo"
    losses: dict[float, Any] = {}

    def liger_grpo(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
        if s.temperature not in losses:
            extra = {"temperature": s.temperature} if "temperature" in accepted else {}
            losses[s.temperature] = LigerFusedLinearGRPOLoss(**options, **extra)
        loss_fn = losses[s.temperature]
        # without a temperature option, (h / T) W^T = (h W^T) / T puts it into the hidden states
        scale = 1.0 if "temperature" in accepted else 1.0 / s.temperature
        with torch.no_grad():
            ref_hidden = _response_hidden(m.ref.model(**_model_inputs(b)).last_hidden_state, b)
        hidden = _response_hidden(m.policy.model(**_model_inputs(b)).last_hidden_state, b)
        out = loss_fn(
            hidden * scale if scale != 1.0 else hidden,
            m.policy.lm_head.weight,
            b.response_ids,
            b.response_mask.long(),
            _advantages(b),
            old_per_token_logps=b.old_logprobs,
            ref_input=ref_hidden * scale if scale != 1.0 else ref_hidden,
            ref_weight=m.ref.lm_head.weight,
        )
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return PathOutput(loss=loss)

    if "temperature" not in accepted:
        liger_grpo.note = "this Liger has no temperature option: h / T passed"  # type: ignore[attr-defined]
    return liger_grpo


# --- one step, the float64 check, the batch search ---------------------------------------------------------


def run_step(path: Path, m: StepModels, b: StepBatch, s: StepSettings) -> None:
    """One update: the path's forward and backward, AdamW step, gradients zeroed in place (kept allocated)."""
    path(m, b, s).backward()
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=False)


def fill_old_logprobs(m: StepModels, b: StepBatch, s: StepSettings) -> None:
    """``b.old_logprobs`` := the current policy's log-probs (no grad): what the rollout's sampler reported."""
    from flowloss import token_logprobs_from_hidden

    with torch.no_grad():
        hidden = m.policy.model(**_model_inputs(b)).last_hidden_state
        lp = token_logprobs_from_hidden(
            _response_hidden(hidden, b), m.policy.lm_head.weight, b.labels, temperature=s.temperature
        )
    b.old_logprobs = lp.float()


@dataclass
class Float64Reference:
    """Log-probs of the policy and of the reference in float64 from their own last hidden states (as computed in
    the model's dtype) and lm_head weights: ``log_softmax(h W^T / T)[y]`` at the response tokens."""

    logprobs: torch.Tensor  # [B, Lr] float64, on the device
    ref_logprobs: torch.Tensor
    r_hat: torch.Tensor  # [B] float64, flowloss.reference.group_normalize_rewards (CPU)


def float64_reference(m: StepModels, b: StepBatch, s: StepSettings) -> Float64Reference:
    from flowloss import reference as flref

    out = []
    with torch.no_grad():
        for model in (m.policy, m.ref):
            hidden = _response_hidden(model.model(**_model_inputs(b)).last_hidden_state, b)
            out.append(
                ref.fused_logprobs(hidden, model.lm_head.weight, b.labels, b.response_mask, temperature=s.temperature)
            )
    groups = [i // b.group_size for i in range(b.sequences)]
    r_hat = flref.group_normalize_rewards(b.rewards.cpu(), groups, eps=1e-6)
    return Float64Reference(out[0], out[1], r_hat)


def reference_loss(impl: str, f64: Float64Reference, b: StepBatch, s: StepSettings, log_z: torch.Tensor | None):
    """The path's loss in float64 from the float64 log-probs (and the path's own log Z), or None."""
    from flowloss import reference as flref

    lp, ref_lp = f64.logprobs.cpu(), f64.ref_logprobs.cpu()
    mask, old = b.response_mask.cpu(), b.old_logprobs.cpu().double()
    if impl.startswith("flowloss"):
        if log_z is None:
            return None
        weights = flref.importance_weights(lp, old, mask, mode="sequence_clipped")
        value = flref.trajectory_balance_loss(
            lp, ref_lp, f64.r_hat, log_z.detach().cpu().double(), mask, beta=s.beta, weights=weights
        )
        return float(value)
    if impl in ("grpo-logits", "liger-grpo"):
        return float(grpo_loss(lp, old, ref_lp, f64.r_hat, mask))
    return None


def largest_fit(fits: Callable[[int], bool], start: int, unit: int, limit: int) -> dict[str, Any]:
    """Largest number of sequences (a multiple of ``unit``, at most ``limit``) for which ``fits`` is true,
    assuming that fitting is monotone: double from ``start`` until the first failure, then bisect the last gap
    `FIT_BISECTIONS` times. Returns ``{"sequences": best or None, "probes": [[sequences, fits], ...],
    "bounded": whether the search stopped at ``limit`` without a failure}``."""
    probes: list[list] = []
    best, bad = None, None
    size = start
    while size <= limit:
        ok = fits(size)
        probes.append([size, ok])
        if not ok:
            bad = size
            break
        best = size
        size *= 2
    if best is not None and bad is not None:
        for _ in range(FIT_BISECTIONS):
            mid = (best + bad) // 2 // unit * unit
            if mid <= best or mid >= bad:
                break
            ok = fits(mid)
            probes.append([mid, ok])
            if ok:
                best = mid
            else:
                bad = mid
    return {"sequences": best, "probes": probes, "bounded": bad is None}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# --- the case ------------------------------------------------------------------------------------------------


def _grad_snapshot(m: StepModels) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in m.policy.parameters()]


def _grad_rel_diff(m: StepModels, snapshot: list[torch.Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over every policy parameter, in float32."""
    num = den = 0.0
    for p, g_ref in zip(m.policy.parameters(), snapshot):
        num += float((p.grad.float() - g_ref.float()).pow(2).sum())
        den += float(g_ref.float().pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


# Which path each path's loss and policy gradients are compared with (the same objective, another route).
COMPARED_WITH = {"flowloss-hidden": "flowloss-logits", "liger-grpo": "grpo-logits"}


def _baseline(m: StepModels, b: StepBatch, device: torch.device) -> dict[str, Any]:
    policy = list(m.policy.parameters())
    head = list(m.head.parameters())
    parts = {
        "policy_weights_bytes": tensor_bytes(policy),
        "policy_grad_bytes": tensor_bytes(p.grad for p in policy if p.grad is not None),
        "optimizer_state_bytes": optimizer_state_bytes(m.optimizer),
        "ref_weights_bytes": tensor_bytes(m.ref.parameters()),
        "logz_head_bytes": tensor_bytes(head) + tensor_bytes(p.grad for p in head if p.grad is not None),
        "batch_bytes": b.nbytes(),
    }
    parts["total_bytes"] = sum(parts.values())
    parts["measured_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    parts["what"] = (
        "allocated when a step starts: policy weights and gradients (kept allocated: zero_grad(set_to_none=False)),"
        " AdamW exp_avg and exp_avg_sq, frozen reference weights, log-Z head (weights, gradients; its AdamW states"
        " are in optimizer_state_bytes), the batch; the peak column is the step's maximum above this"
    )
    return parts


def step_case(
    impls: list,
    *,
    preset: str,
    dtype_key: str,
    sequences: int,
    group_size: int,
    seq_len: int,
    device: torch.device,
    warmup: int,
    reps: int,
    temperature: float,
    seed: int,
    measure_memory: bool,
    progress: Callable[[str], None],
    skip_reason: str | None = None,
) -> dict[str, Any]:
    """Build the model and batch, check every path against float64 and each other, then time and size each step.
    ``impls``: the `flowloss.bench.impls.Impl` entries of op ``step`` to run (the ``model`` row always runs);
    ``skip_reason``: why the case cannot run here (every row is listed as skipped with it)."""
    from flowloss.bench.config import DTYPES

    dtype = DTYPES[dtype_key]
    label = f"step {preset} {dtype_key}"
    shape = PRESETS[preset]
    settings = StepSettings(temperature=temperature)
    case: dict[str, Any] = {
        "op": "step",
        "preset": preset,
        "model": {
            "architecture": "transformers Qwen2ForCausalLM, random weights",
            "parameters": parameter_count(preset),
            **{k: shape[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")},
            "num_attention_heads": shape["num_attention_heads"],
            "num_key_value_heads": shape["num_key_value_heads"],
            "tie_word_embeddings": shape["tie_word_embeddings"],
        },
        "dtype": dtype_key,
        "device": device.type,
        "sequences": sequences,
        "group_size": group_size,
        "prompts": sequences // group_size,
        "seq_len": seq_len,
        "temperature": temperature,
        "flowrl_beta": settings.beta,
        "grpo": {"epsilon": GRPO_EPSILON, "kl_beta": GRPO_KL_BETA, "loss_type": "grpo"},
        "optimizer": "torch.optim.AdamW(lr=1e-6), policy and log-Z head",
        "token": "one position of the padded [B, L] batch (valid_tokens: the non-padding ones)",
        "reference": (
            "float64 log_softmax(h W^T / T)[y] from each model's own last hidden states and lm_head weight; losses"
            " from those log-probs: flowloss.reference.trajectory_balance_loss (with the path's log Z) or GRPO"
        ),
    }
    progress(f"{label}: build model and batch")
    batch = make_batch(sequences, group_size, seq_len, shape["vocab_size"], seed=seed, device=device)
    case.update(prompt_len=batch.prompt_len, response_len=batch.response_len, **batch.counts())
    model_source = "ref.model and policy.model forward, backward from a random gradient on the hidden states, AdamW"

    def skip_all(status: str, reason: str) -> dict[str, Any]:
        rows = [(MODEL_ROW, model_source)] + [(i.name, i.source) for i in impls]
        case["results"] = [{"impl": n, "source": src, "status": status, "reason": reason} for n, src in rows]
        return case

    if skip_reason:
        return skip_all("skipped", skip_reason)
    try:
        models = build_models(preset, dtype, device, seed=seed)
        fill_old_logprobs(models, batch, settings)
        f64 = float64_reference(models, batch, settings)
    except Exception as err:
        if not _is_oom(err):
            raise
        _free(device)
        return skip_all("error", "out of memory while building the models and the float64 reference")

    paths: list[tuple[str, str, Any]] = [(MODEL_ROW, model_source, None)]
    results: dict[str, dict[str, Any]] = {}
    for impl in impls:
        reason = impl.skip_reason(device)
        if reason:
            results[impl.name] = {"impl": impl.name, "source": impl.source, "status": "skipped", "reason": reason}
            continue
        paths.append((impl.name, impl.source, impl))

    # 1. every path once from the same weights: loss, log-probs and gradients, no optimizer step
    built: dict[str, Path] = {}
    snapshots: dict[str, list[torch.Tensor]] = {}
    wanted = set(COMPARED_WITH.values())
    for name, source, impl in paths:
        progress(f"{label}: {name}")
        record: dict[str, Any] = {"impl": name, "source": source, "status": "ok", "reason": ""}
        results[name] = record
        try:
            fn = model_only if impl is None else impl.build(device)
            built[name] = fn
            if getattr(fn, "note", ""):
                record["note"] = fn.note
            if impl is None:
                continue
            models.optimizer.zero_grad(set_to_none=False)
            with seeded(CHECK_SEED, device):
                out = fn(models, batch, settings)
            out.backward()
            record["loss"] = float(out.loss.detach())
            expected = reference_loss(name, f64, batch, settings, out.log_z)
            record["max_abs_err_loss"] = None if expected is None else abs(record["loss"] - expected)
            record["max_abs_err_logprobs"] = None
            if out.logprobs is not None:
                diff = (out.logprobs.detach().double() - f64.logprobs).abs()
                record["max_abs_err_logprobs"] = float(torch.where(batch.response_mask, diff, 0).max())
            del out
            if name in wanted:
                snapshots[name] = _grad_snapshot(models)
            other = COMPARED_WITH.get(name)
            if other in snapshots:
                record["compared_with"] = other
                record["loss_diff"] = abs(record["loss"] - results[other]["loss"])
                record["grad_rel_diff"] = _grad_rel_diff(models, snapshots[other])
        except Exception as err:
            results[name] = {**record, "status": "error", "reason": "out of memory" if _is_oom(err) else _short(err)}
            built.pop(name, None)
        finally:
            models.optimizer.zero_grad(set_to_none=False)
            _free(device)
    snapshots.clear()
    del f64
    case["memory_baseline"] = _baseline(models, batch, device)

    if measure_memory:  # what the AdamW step alone adds (foreach temporaries), the same for every path
        case["optimizer_peak_bytes"], _ = peak_extra_bytes(models.optimizer.step, device=device)
        models.optimizer.zero_grad(set_to_none=False)

    # 2. size each step, warm each up, then time them in rounds, one step of every row per round, so that a change
    #    in the machine's load during the run reaches every row alike (weights move with every step; the figures
    #    do not depend on their values)
    def fail(name: str, err: Exception) -> None:
        results[name] = {**results[name], "status": "error", "reason": "out of memory" if _is_oom(err) else _short(err)}
        built.pop(name, None)

    calls: dict[str, Callable[[], None]] = {}
    for name, fn in list(built.items()):
        progress(f"{label}: {name} (memory, warm-up)")
        record = results[name]

        def call(fn=fn) -> None:
            run_step(fn, models, batch, settings)

        def fwd_bwd(fn=fn) -> None:
            fn(models, batch, settings).backward()

        try:
            if measure_memory:
                # forward + backward, where the paths differ; the whole step's peak is the larger of that and the
                # AdamW step's, which runs after the forward's tensors are freed
                record["peak_mem_fwdbwd_bytes"], record["memory_method"] = peak_extra_bytes(fwd_bwd, device=device)
                if record["peak_mem_fwdbwd_bytes"] is not None and case.get("optimizer_peak_bytes") is not None:
                    record["peak_mem_bytes"] = max(record["peak_mem_fwdbwd_bytes"], case["optimizer_peak_bytes"])
                models.optimizer.zero_grad(set_to_none=False)
            for _ in range(warmup):
                call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            calls[name] = call
        except Exception as err:
            fail(name, err)
        finally:
            models.optimizer.zero_grad(set_to_none=False)
            _free(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(reps):
        progress(f"{label}: timed steps, round {rep + 1} of {reps}")
        for name, call in calls.items():
            if name not in built:
                continue
            try:
                samples[name].append(time_calls(call, device=device, warmup=0, reps=1).median)
            except Exception as err:
                fail(name, err)
                models.optimizer.zero_grad(set_to_none=False)
                _free(device)
    for name in built:
        record = results[name]
        record["step_ms"] = summarize(samples[name]).as_dict()
        seconds = record["step_ms"]["median"] * 1e-3
        record["tokens_per_s"] = batch.tokens / seconds
        record["valid_tokens_per_s"] = case["valid_tokens"] / seconds

    # 3. CUDA: the largest batch each path fits
    for name, fn in built.items():
        record = results[name]
        if record["status"] != "ok":
            continue
        if device.type != "cuda" or not measure_memory:
            record["max_fit"] = None
            record["max_fit_reason"] = "CUDA only" if device.type != "cuda" else "--no-memory"
            continue
        progress(f"{label}: {name} (largest batch)")
        try:
            record["max_fit"] = _search_fit(fn, models, settings, case, device, seed)
        except Exception as err:  # anything but out-of-memory: say so, keep the row's other figures
            record["max_fit"], record["max_fit_reason"] = None, f"search failed: {_short(err)}"
        finally:
            models.optimizer.zero_grad(set_to_none=False)
            _free(device)

    ordered = [results[MODEL_ROW]] + [results[i.name] for i in impls if i.name in results]
    _add_step_derived(ordered)
    case["results"] = ordered
    return case


def _search_fit(fn: Path, models: StepModels, settings: StepSettings, case: dict, device, seed: int) -> dict:
    """`largest_fit` of whole steps of ``fn`` at ``case``'s ``L`` and ``G``, from ``case``'s ``B`` up: a batch
    fits when its step (forward, backward, AdamW) runs without an out-of-memory error. After each try, gradients
    are zeroed (an interrupted backward leaves partial sums), garbage collected and the CUDA cache emptied, so the
    next try starts from the baseline. Only out-of-memory errors count as "does not fit"; others propagate."""
    seq_len, group = case["seq_len"], case["group_size"]

    def fits(sequences: int) -> bool:
        batch = None
        try:
            batch = make_batch(sequences, group, seq_len, models.vocab_size, seed=seed + sequences, device=device)
            run_step(fn, models, batch, settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous failure surfaces here, inside the try
            return True
        except Exception as err:
            if not _is_oom(err):
                raise
            return False
        finally:
            del batch
            models.optimizer.zero_grad(set_to_none=False)
            _free(device)

    limit = max(case["sequences"], MAX_FIT_TOKENS // seq_len // group * group)
    found = largest_fit(fits, case["sequences"], group, limit)
    best = found["sequences"]
    return {**found, "tokens": None if best is None else best * seq_len, "seq_len": seq_len}


def _add_step_derived(results: list[dict[str, Any]]) -> None:
    model = results[0] if results and results[0].get("step_ms") else None
    for r in results:
        if r["status"] != "ok" or "step_ms" not in r or model is None or r is model:
            continue
        extra = r["step_ms"]["median"] - model["step_ms"]["median"]
        r["loss_path_ms"] = extra
        r["loss_path_fraction"] = extra / r["step_ms"]["median"]

"""The loss paths of ``--op step`` (the rows of its table): one RL update's forward and loss, each as its users run it.

Every path is ``fn(models, batch, settings) -> PathOutput`` and computes, in this order, the reference's forward and
token log-probs under ``no_grad`` (first, so that its logits are freed before the policy's exist, as TRL and
OpenRLHF compute them in a phase of their own), the policy's, [log Z,] and the loss; `flowloss.bench.step` adds the
backward and the AdamW step, times and sizes it. ``docs/benchmarks.md`` ("One RL update") describes each row.
The log-prob paths the adapters choose between are ``trl-fused-head`` (TRL's own), ``flowloss-logits`` and
``flowloss-hidden``, all with the same FlowRL loss; ``grpo-logits`` and ``liger-grpo`` are the GRPO baselines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flowloss.bench.impls import TRL_CHUNK_COLUMNS, Impl, noted
from flowloss.bench.step_model import StepBatch, StepModels

if TYPE_CHECKING:  # transformers: the optional `step` extra
    from transformers import Qwen2ForCausalLM

FLOWRL_BETA = 15.0  # FlowRL's reward temperature (the authors' value; flowloss's default)
GRPO_EPSILON = 0.2  # PPO/GRPO clip range (TRL's and Liger's default)
GRPO_KL_BETA = 0.04  # GRPO's KL coefficient (DeepSeekMath; Liger's default)


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
        elif self.hidden is not None:
            torch.autograd.backward(self.hidden, self.hidden_grad)
        else:
            raise ValueError("PathOutput has neither a loss nor hidden states to backpropagate from")


Path = Callable[[StepModels, StepBatch, StepSettings], PathOutput]


def model_inputs(b: StepBatch) -> dict[str, torch.Tensor]:
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids}


def response_hidden(hidden: torch.Tensor, b: StepBatch) -> torch.Tensor:
    """``[B, L, H] -> [B, Lr, H]``: the positions whose next token is a response token."""
    return hidden[:, b.prompt_len - 1 : -1]


def model_only(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
    """The backbone's own forward and backward (the ``model`` row): no lm_head, no log-probs, no loss."""
    with torch.no_grad():
        m.ref.model(**model_inputs(b))
    hidden = m.policy.model(**model_inputs(b)).last_hidden_state
    # a random stand-in for the gradient a loss would send back (a few MiB, drawn afresh each step)
    return PathOutput(hidden=hidden, hidden_grad=torch.randn_like(hidden).mul_(1e-3))


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, epsilon: float = GRPO_EPSILON,
              kl_beta: float = GRPO_KL_BETA) -> torch.Tensor:  # fmt: skip
    """GRPO (DeepSeekMath; TRL ``loss_type="grpo"``): per token ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)
    + kl_beta (exp(ref - lp) - (ref - lp) - 1)`` with ``rho = exp(lp - old)``, averaged over each sequence's
    response tokens, then over sequences. ``[B, Lr]`` log-probs, ``[B]`` advantages, ``[B, Lr]`` bool mask."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    log_ratio_ref = ref_logprobs - logprobs
    per_token = (surrogate + kl_beta * (torch.exp(log_ratio_ref) - log_ratio_ref - 1)) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def _advantages(b: StepBatch) -> torch.Tensor:
    from flowloss import group_normalize_rewards

    return group_normalize_rewards(b.rewards, b.group_size)


def plain_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` in plain PyTorch: a loop over batch rows, ``log_softmax`` of each row's
    ``[Lr, V]`` logits in float32 (float64 stays float64), gather of the label; ``logits / T`` first, as TRL
    divides. (TRL's own PyTorch fallback keeps bf16 rows in bf16; this twin upcasts them.)"""
    logits = logits / temperature
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = [torch.log_softmax(z.to(dtype), dim=-1).gather(-1, i[:, None]).squeeze(-1) for z, i in zip(logits, index)]
    return torch.stack(rows)


def _trl_selective() -> tuple[Callable, str]:
    """``(selective(logits, index, T), note)``: TRL's when trl is importable, else the plain PyTorch twin."""
    try:
        import trl
        from trl.trainer.utils import selective_log_softmax
    except Exception as err:  # absent, or installed but not importable here (a missing or mismatched dependency)
        absent = isinstance(err, ModuleNotFoundError) and err.name in ("trl", "trl.trainer", "trl.trainer.utils")
        what = "trl not installed" if absent else f"trl not importable ({type(err).__name__}: {err})"[:300]
        return plain_selective_log_softmax, f"{what}: the plain PyTorch twin of TRL's helper ran"
    note = f"trl {trl.__version__} selective_log_softmax"
    if "temperature" in inspect.signature(selective_log_softmax).parameters:
        return (lambda z, i, t: selective_log_softmax(z, i, temperature=t)), note
    return (lambda z, i, t: selective_log_softmax(z / t, i)), note


def build_grpo_logits(device: torch.device) -> Path:
    selective, note = _trl_selective()

    def grpo_logits(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
        keep = b.response_len + 1
        with torch.no_grad():
            ref_logits = m.ref(**model_inputs(b), logits_to_keep=keep).logits[:, :-1]
            ref_logprobs = selective(ref_logits, b.response_ids, s.temperature)
            del ref_logits
        logits = m.policy(**model_inputs(b), logits_to_keep=keep).logits[:, :-1]
        logprobs = selective(logits, b.response_ids, s.temperature)
        loss = grpo_loss(logprobs, b.old_logprobs, ref_logprobs, _advantages(b), b.response_mask)
        return PathOutput(loss=loss, logprobs=logprobs, ref_logprobs=ref_logprobs)

    return noted(grpo_logits, note)


def _flowrl(m: StepModels, b: StepBatch, s: StepSettings, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
            hidden: torch.Tensor) -> PathOutput:  # fmt: skip
    """log Z from the prompt's pooled last hidden states, then `flowloss.trajectory_balance_loss`."""
    from flowloss import group_normalize_rewards, pool_prompt_hidden_states, trajectory_balance_loss

    log_z = m.head(pool_prompt_hidden_states(hidden, b.prompt_mask))
    r_hat = group_normalize_rewards(b.rewards, b.group_size)
    loss = trajectory_balance_loss(logprobs, ref_logprobs, r_hat, log_z, b.response_mask, beta=s.beta,
                                   old_logprobs=b.old_logprobs)  # fmt: skip
    return PathOutput(loss=loss, logprobs=logprobs, ref_logprobs=ref_logprobs, log_z=log_z)


def flowloss_logits(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
    from flowloss import token_logprobs

    keep = b.response_len + 1
    with torch.no_grad():
        ref_logits = m.ref(**model_inputs(b), logits_to_keep=keep).logits[:, :-1]
        ref_logprobs = token_logprobs(ref_logits, b.labels, temperature=s.temperature)
        del ref_logits
    out = m.policy(**model_inputs(b), logits_to_keep=keep, output_hidden_states=True)
    logprobs = token_logprobs(out.logits[:, :-1], b.labels, temperature=s.temperature, inplace_backward=True)
    return _flowrl(m, b, s, logprobs, ref_logprobs, out.hidden_states[-1])


def hidden_logprobs(model: Qwen2ForCausalLM, b: StepBatch, s: StepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(response log-probs [B, Lr], last hidden states [B, L, H])`` through `flowloss.token_logprobs_from_hidden`."""
    from flowloss import token_logprobs_from_hidden

    hidden = model.model(**model_inputs(b)).last_hidden_state
    weight = model.lm_head.weight
    lp = token_logprobs_from_hidden(response_hidden(hidden, b), weight, b.labels, temperature=s.temperature)
    return lp, hidden


def flowloss_hidden(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
    with torch.no_grad():
        ref_logprobs, _ = hidden_logprobs(m.ref, b, s)
    logprobs, hidden = hidden_logprobs(m.policy, b, s)
    return _flowrl(m, b, s, logprobs, ref_logprobs, hidden)


def build_trl_fused_head(device: torch.device) -> Path:
    """TRL's fused head (``trl.trainer.utils.add_fused_lm_head``, what ``FlowRLTrainer`` inherits from GRPO) as it
    runs on CUDA: ``ChunkedLogProbFunction`` on the response positions' hidden states and the lm_head weight,
    ``32768`` vocabulary columns a tile; log Z from the same forward's hidden states."""
    from trl.kernels import ChunkedLogProbFunction

    def logprobs_of(model: Qwen2ForCausalLM, b: StepBatch, s: StepSettings) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model.model(**model_inputs(b)).last_hidden_state
        rows, labels = response_hidden(hidden, b)[b.response_mask], b.response_ids[b.response_mask]
        head = model.lm_head
        out = ChunkedLogProbFunction.apply(rows, head.weight, head.bias, labels, s.temperature, TRL_CHUNK_COLUMNS,
                                           None, 1.0, ())  # fmt: skip
        return out[0].new_zeros(b.response_mask.shape).masked_scatter(b.response_mask, out[0]), hidden

    def trl_fused_head(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
        with torch.no_grad():
            ref_logprobs, _ = logprobs_of(m.ref, b, s)
        logprobs, hidden = logprobs_of(m.policy, b, s)
        return _flowrl(m, b, s, logprobs, ref_logprobs, hidden)

    import trl

    return noted(trl_fused_head, f"trl {trl.__version__} ChunkedLogProbFunction, log-probs only")


def build_liger_grpo(device: torch.device) -> Path:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    options: dict[str, Any] = {"beta": GRPO_KL_BETA, "epsilon_low": GRPO_EPSILON, "epsilon_high": GRPO_EPSILON}
    options["use_ref_model"] = True
    accepted = inspect.signature(LigerFusedLinearGRPOLoss).parameters
    if "loss_type" in accepted:
        options["loss_type"] = "grpo"
    has_t = "temperature" in accepted
    losses: dict[float, Any] = {}

    def liger_grpo(m: StepModels, b: StepBatch, s: StepSettings) -> PathOutput:
        if s.temperature not in losses:
            extra = {"temperature": s.temperature} if has_t else {}
            losses[s.temperature] = LigerFusedLinearGRPOLoss(**options, **extra)
        scale = 1.0 if has_t else 1.0 / s.temperature  # (h / T) W^T = (h W^T) / T
        with torch.no_grad():
            ref_hidden = response_hidden(m.ref.model(**model_inputs(b)).last_hidden_state, b)
        hidden = response_hidden(m.policy.model(**model_inputs(b)).last_hidden_state, b)
        out = losses[s.temperature](
            hidden * scale if scale != 1.0 else hidden, m.policy.lm_head.weight, b.response_ids,
            b.response_mask.long(), _advantages(b), old_per_token_logps=b.old_logprobs,
            ref_input=ref_hidden * scale if scale != 1.0 else ref_hidden, ref_weight=m.ref.lm_head.weight,
        )  # fmt: skip
        return PathOutput(loss=out[0] if isinstance(out, (tuple, list)) else out)

    if not has_t:
        noted(liger_grpo, "this Liger has no temperature option: h / T passed")
    return liger_grpo


# Which path each path's loss and policy gradients are compared with (the same objective, another route).
COMPARED_WITH = {"flowloss-hidden": "flowloss-logits", "trl-fused-head": "flowloss-logits", "liger-grpo": "grpo-logits"}

STEP_IMPLS: tuple[Impl, ...] = (
    Impl("grpo-logits", "step", "model(..., logits_to_keep) logits -> trl selective_log_softmax (plain PyTorch "
         "without trl) -> GRPO loss", build_grpo_logits),
    Impl("flowloss-logits", "step", "model(..., logits_to_keep) logits -> flowloss.token_logprobs -> "
         "flowloss.trajectory_balance_loss", lambda d: flowloss_logits),
    Impl("flowloss-hidden", "step", "model.model(...) hidden states -> flowloss.token_logprobs_from_hidden -> "
         "flowloss.trajectory_balance_loss", lambda d: flowloss_hidden),
    Impl("trl-fused-head", "step", "model.model(...) hidden states -> trl.kernels.ChunkedLogProbFunction (TRL's "
         "fused head) -> flowloss.trajectory_balance_loss", build_trl_fused_head, needs=("trl.kernels",)),
    Impl("liger-grpo", "step", "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on hidden states and "
         "lm_head.weight", build_liger_grpo, needs=("liger_kernel.chunked_loss",)),
)  # fmt: skip

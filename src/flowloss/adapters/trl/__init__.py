"""FlowRL in TRL: ``FlowRLTrainer`` (a ``GRPOTrainer`` subclass) and ``FlowRLConfig`` (a ``GRPOConfig``).

A GRPO script switches to FlowRL by changing the trainer and config classes::

    from flowloss.adapters.trl import FlowRLConfig, FlowRLTrainer
    args = FlowRLConfig(output_dir="out", num_generations=8, flowrl_beta=15.0)
    trainer = FlowRLTrainer(model="Qwen/Qwen2.5-0.5B", reward_funcs=my_reward, args=args, train_dataset=ds)

TRL generates, scores and batches exactly as for GRPO; only the loss is replaced. For each micro-batch
(``B`` completions of ``T`` tokens, prompts of ``P`` tokens) the trainer computes::

    delta_i = log Z_phi(x_i) + mean_t log pi_theta(y_it) - flowrl_beta * r_hat_i - mean_t log pi_ref(y_it)
    loss    = sum_i w_i * delta_i^2 / (N / W)          (x G / S when training)

with everything taken from TRL's batch: ``log pi_theta [B, T]`` from the policy's forward,
``log pi_ref [B, T]`` = ``ref_per_token_logps``, ``r_hat [B]`` = ``advantages`` (TRL's group z-score of the
summed rewards), ``w [B]`` from ``old_per_token_logps`` when TRL keeps them (off-policy; ``w = 1``
on-policy), and ``log Z_phi(x) [B]`` from a `LogZHead` on the prompt's mean last hidden
state. ``N`` is the number of valid sequences in the whole generation batch over all ``W`` processes,
``G`` the gradient accumulation steps and ``S`` TRL's ``steps_per_generation``: with the default ``S = G``
the gradients of an optimizer step are those of the mean over every sequence of the step (data-parallel
ranks average their gradients). The math is `flowloss.trajectory_balance_loss`.

The package keeps three jobs apart:

* the translation: ``config`` (`FlowRLConfig` -> `flowloss.FlowRLOptions` / ``LogZHeadOptions``), ``loss``
  (the loss call, `flowrl_loss_from_grpo_inputs`), ``logprobs`` (the log-prob call: ``flowrl_logprobs`` =
  ``"framework"`` / ``"logits"`` / ``"hidden"``) and ``trainer`` (`FlowRLTrainer`, which wires them);
* ``_compat``: every patch of TRL internals, with the TRL version it was written for (trl 1.16.0);
* launchers: none of its own; a TRL script (``examples/trl_*.py``) or ``TrlParser((FlowRLConfig,))`` is one.
"""

from flowloss.adapters.common import (
    LOG_Z_HEAD_FILE,
    LOG_Z_HEAD_NAME,
    HiddenStateCapture,
    LogZHeadOptions,
    attach_log_z_head,
    check_adapter_options,
    global_normalizer,
    load_log_z_head,
    save_log_z_head,
    split_log_z_head_state,
)
from flowloss.adapters.trl._compat import exclude_from_weight_sync
from flowloss.adapters.trl.config import FlowRLConfig
from flowloss.adapters.trl.logprobs import LOGPROB_PATHS
from flowloss.adapters.trl.loss import NUM_SEQUENCES_KEY, flowrl_loss_from_grpo_inputs
from flowloss.adapters.trl.trainer import FlowRLTrainer

__all__ = [
    "LOGPROB_PATHS",
    "LOG_Z_HEAD_FILE",
    "LOG_Z_HEAD_NAME",
    "NUM_SEQUENCES_KEY",
    "FlowRLConfig",
    "FlowRLTrainer",
    "exclude_from_weight_sync",
    "flowrl_loss_from_grpo_inputs",
]

# Importable as before the split into a package (not part of __all__).
_REEXPORTED = (HiddenStateCapture, LogZHeadOptions, attach_log_z_head, check_adapter_options, global_normalizer,
               load_log_z_head, save_log_z_head, split_log_z_head_state)

"""flowloss: FlowRL (reward-distribution matching) losses for LLM reinforcement learning.

The whole public API::

    # losses (pure functions on tensors) and their nn.Module twins (options fixed at construction)
    trajectory_balance_loss   reverse_kl_surrogate   TrajectoryBalanceLoss   ReverseKLSurrogate
    # building blocks
    length_normalize  sequence_logprobs  masked_mean  masked_sum  count_valid_sequences  reduce_sequences
    clipped_importance_weights  ratio_clip_token_mask  group_normalize_rewards
    # log-partition estimators
    LogZHead  pool_prompt_hidden_states  LogZTable  vargrad_log_z
    # per-token log-probs: from logits (fused Triton on CUDA, chunked PyTorch on CPU) or from hidden states
    # and the lm_head weight (chunked PyTorch on any device, never materializing the logits)
    token_logprobs  token_logprobs_from_hidden

``flowloss.reference`` holds the float64 oracle; ``flowloss.adapters.{trl,verl,openrlhf}`` the framework
adapters (imported on demand, never by ``import flowloss``).
"""

from flowloss.grouping import group_normalize_rewards
from flowloss.importance import clipped_importance_weights, ratio_clip_token_mask
from flowloss.log_partition import LogZHead, LogZTable, pool_prompt_hidden_states, vargrad_log_z
from flowloss.losses import reverse_kl_surrogate, trajectory_balance_loss
from flowloss.modules import ReverseKLSurrogate, TrajectoryBalanceLoss
from flowloss.ops.fused_linear import token_logprobs_from_hidden
from flowloss.ops.token_logprobs import token_logprobs
from flowloss.reductions import (
    count_valid_sequences,
    length_normalize,
    masked_mean,
    masked_sum,
    reduce_sequences,
    sequence_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "LogZHead",
    "LogZTable",
    "ReverseKLSurrogate",
    "TrajectoryBalanceLoss",
    "__version__",
    "clipped_importance_weights",
    "count_valid_sequences",
    "group_normalize_rewards",
    "length_normalize",
    "masked_mean",
    "masked_sum",
    "pool_prompt_hidden_states",
    "ratio_clip_token_mask",
    "reduce_sequences",
    "reverse_kl_surrogate",
    "sequence_logprobs",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "trajectory_balance_loss",
    "vargrad_log_z",
]

"""flowloss: FlowRL (reward-distribution matching) losses for LLM reinforcement learning.

The whole public API::

    # losses (pure functions on tensors), their options object and nn.Module twins
    trajectory_balance_loss   reverse_kl_surrogate   FlowRLOptions   ReverseKLOptions
    TrajectoryBalanceLoss   ReverseKLSurrogate
    # building blocks
    masked_mean  masked_sum  count_valid_sequences  reduce_sequences
    clipped_importance_weights  ratio_clip_token_mask  group_normalize_rewards
    # log-partition estimators
    LogZHead  pool_prompt_hidden_states  LogZTable  vargrad_log_z
    # per-token log-probs: from logits or from hidden states and the lm_head weight (logits never built)
    token_logprobs  token_logprobs_from_hidden
    # value checks that read device memory (off by default; FLOWLOSS_STRICT=1 turns them on)
    strict_mode  set_strict  is_strict
    # warned once when impl="auto" falls back from a Triton kernel for want of a checked GPU configuration
    FallbackWarning

``flowloss.reference`` holds the float64 oracle; ``flowloss.adapters.{trl,verl,openrlhf}`` the framework
adapters (imported on demand, never by ``import flowloss``). ``length_normalize`` and ``sequence_logprobs``
are deprecated aliases of ``masked_mean``/``masked_sum`` (since 0.2.0; removed in 0.3.0).
"""

from flowloss.grouping import group_normalize_rewards
from flowloss.importance import clipped_importance_weights, ratio_clip_token_mask
from flowloss.log_partition import LogZHead, LogZTable, pool_prompt_hidden_states, vargrad_log_z
from flowloss.losses import reverse_kl_surrogate, trajectory_balance_loss
from flowloss.modules import ReverseKLSurrogate, TrajectoryBalanceLoss
from flowloss.ops.dispatch import FallbackWarning
from flowloss.ops.fused_linear import token_logprobs_from_hidden
from flowloss.ops.token_logprobs import token_logprobs
from flowloss.options import FlowRLOptions, ReverseKLOptions
from flowloss.reductions import (
    count_valid_sequences,
    length_normalize,
    masked_mean,
    masked_sum,
    reduce_sequences,
    sequence_logprobs,
)
from flowloss.strict import is_strict, set_strict, strict_mode

__version__ = "0.2.0"

__all__ = [
    "FallbackWarning",
    "FlowRLOptions",
    "LogZHead",
    "LogZTable",
    "ReverseKLOptions",
    "ReverseKLSurrogate",
    "TrajectoryBalanceLoss",
    "__version__",
    "clipped_importance_weights",
    "count_valid_sequences",
    "group_normalize_rewards",
    "is_strict",
    "masked_mean",
    "masked_sum",
    "pool_prompt_hidden_states",
    "ratio_clip_token_mask",
    "reduce_sequences",
    "reverse_kl_surrogate",
    "set_strict",
    "strict_mode",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "trajectory_balance_loss",
    "vargrad_log_z",
]

# Deprecated aliases (importable, not part of __all__): length_normalize, sequence_logprobs.
_DEPRECATED = (length_normalize, sequence_logprobs)

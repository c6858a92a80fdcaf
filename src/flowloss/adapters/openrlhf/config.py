"""`FlowRLConfig`: the OpenRLHF adapter's options (no OpenRLHF import here).

The loss's `flowloss.FlowRLOptions` and the head's `flowloss.adapters.common.LogZHeadOptions` under their flat
names (``--flowrl.beta``, ``--flowrl.log_z_lr``, ...), plus four options of OpenRLHF's own.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from flowloss.adapters.common import AdapterConfig, Extra

RewardSource = Literal["advantages", "rewards"]
LogProbsPath = Literal["auto", "framework", "logits", "hidden"]

# `--flowrl.logprobs`: how the actor computes its token log-probs (see `flowloss.adapters.openrlhf.logprobs`).
LOGPROBS_PATHS: tuple[str, ...] = ("auto", "framework", "logits", "hidden")
# What "auto" means on CPU: the path measured fastest and leanest there (docs/adapters/openrlhf.md, "Log-prob
# paths"). On CUDA "auto" is OpenRLHF's own path until a device run confirms a flowloss path inside OpenRLHF.
CPU_DEFAULT = "hidden"

# Settings the adapter refuses (the trainer at set-up, the launcher before Ray starts), with the reason.
RING_ATTENTION_ERROR = (
    "the FlowRL adapter does not support ring attention (--ds.ring_attn_size > 1): each rank then holds only a "
    "slice of every packed sequence, while the log-Z head pools all of a prompt's hidden states on one rank"
)
ENTROPY_ERROR = (
    "--actor.entropy_coef {!r}: OpenRLHF would subtract an entropy bonus from the FlowRL loss, which changes the "
    "objective (FlowRL's diversity comes from the trajectory-balance target itself); leave --actor.entropy_coef "
    "unset or 0"
)
EMA_ERROR = "the FlowRL adapter does not support --train.enable_ema (the EMA copy has no log-Z head)"


class FlowRLConfig(AdapterConfig):
    """FlowRL options for OpenRLHF: ``loss`` (`flowloss.FlowRLOptions`), ``log_z_head``
    (`flowloss.adapters.common.LogZHeadOptions`) and OpenRLHF's own four.

    Flat names (``FlowRLConfig(beta=15.0)``, ``--flowrl.<name> <value>`` on the launcher): the loss's and the
    head's (see `flowloss.adapters.common`), and

    * ``rollout_tis`` (true): multiply ``w`` by ``min(pi_old / pi_rollout, tis_cap)`` when OpenRLHF passes
      vLLM's log-probs (it does with ``--algo.advantage.is_correction_level token|seq``);
    * ``reward_source`` (``"advantages"``): ``r_hat`` = masked mean of OpenRLHF's advantages (use the
      ``group_norm`` estimator), or ``"rewards"``: ``Experience.rewards`` as given (e.g. already scaled);
    * ``kl_loss`` (false): keep OpenRLHF's ``--algo.kl.use_loss`` term in the loss (FlowRL's residual already
      holds ``log pi_ref``; the authors train with the KL loss off);
    * ``logprobs`` (``"auto"``): how the actor (training, old-policy and reference forwards) computes
      ``log pi(y_t)``: ``"framework"`` (OpenRLHF's ``log_probs_from_logits`` on the fp32 logits of every
      position), ``"logits"`` (`flowloss.token_logprobs` on the model's logits of the response positions only),
      ``"hidden"`` (`flowloss.token_logprobs_from_hidden` on the lm_head's input and weight: the logits are
      never built); ``"auto"``: ``"framework"`` on CUDA (no flowloss path has run inside OpenRLHF on a GPU),
      the measured best on CPU (`CPU_DEFAULT`).
    """

    EXTRAS: ClassVar[dict[str, Extra]] = {
        "rollout_tis": Extra(True, "truncated IS against vLLM's log-probs when OpenRLHF passes them (true)"),
        "reward_source": Extra("advantages", "r_hat: masked mean of the advantages (group_norm), or "
                               "Experience.rewards as given", ("advantages", "rewards")),
        "kl_loss": Extra(False, "keep OpenRLHF's --algo.kl.use_loss KL term in the loss (false)"),
        "logprobs": Extra("auto", "the actor's token log-probs: framework (OpenRLHF's, fp32 logits of every "
                          "position), logits (flowloss.token_logprobs, response positions only), hidden "
                          "(flowloss.token_logprobs_from_hidden, logits never built); auto: framework on CUDA, "
                          f"{CPU_DEFAULT} on CPU", LOGPROBS_PATHS),
    }
    RENAMED: ClassVar[dict[str, str]] = {"drop_last_prompt_token": "log_z_drop_last_prompt_token"}
    REMOVED: ClassVar[dict[str, str]] = {
        "head_name": "the head is always the HF model's `flowrl_log_z_head` submodule (one name in every adapter)"
    }
    rollout_tis: bool
    reward_source: RewardSource
    kl_loss: bool
    logprobs: LogProbsPath

"""FlowRL for verl (>= 0.9, engine-based workers): a loss function, a registered policy loss, a log-Z head, and
flowloss's log-prob ops inside verl's engine.

The package keeps three jobs apart:

* translation: `loss` (verl's ``loss_fn(model_output, data, dp_group)`` -> `flowloss.trajectory_balance_loss`),
  `logprobs` (verl's packed micro-batch -> `flowloss.token_logprobs` / `flowloss.token_logprobs_from_hidden`),
  `head` (pooled prompt hidden states -> ``log Z``), `config` (options, the Hydra node, conflicting settings);
* integration: `engine` (`FlowRLFSDPEngine`, verl's FSDP engine with the head and the log-prob paths) and
  `register` (the V1 trainer mode, the engine and the policy loss registered in verl; the launch path);
* `_compat`: every verl internal the adapter relies on (private registries, engine build steps), with the verl
  versions it was written for.

Quick use: a module named in ``VERL_USE_EXTERNAL_MODULES`` calls ``register_flowrl({...})``; ``main_ppo`` runs
with ``trainer.v1.trainer_mode=flowrl`` and options as Hydra overrides ``+actor_rollout_ref.flowrl.<name>=<value>``
(see docs/adapters/verl.md). Importing this package imports neither verl nor its engine; ``import flowloss`` never
imports it.
"""

from __future__ import annotations

from typing import Any

from flowloss.adapters.verl.config import (
    FLOWRL_NODE,
    FlowRLConfig,
    LogZSource,  # noqa: F401 (a name of 0.1: the type of FlowRLConfig.log_z)
    check_verl_settings,
    flowrl_config_from,
    verl_conflicts,
)
from flowloss.adapters.verl.head import attach_log_z_head, packed_prompt_log_z
from flowloss.adapters.verl.loss import (
    flowrl_loss,
    make_flowrl_loss_fn,
    sequence_rewards,
    set_flowrl_loss_fn,
)
from flowloss.adapters.verl.register import (
    REGISTERED_POLICY_LOSS,
    install_flowrl_loss,
    register_flowrl,
    register_flowrl_engine,
    register_flowrl_policy_loss,
    register_flowrl_trainer,
)

__all__ = [
    "FLOWRL_NODE",
    "REGISTERED_POLICY_LOSS",
    "FlowRLConfig",
    "FlowRLFSDPEngine",  # built on first access by the module __getattr__
    "attach_log_z_head",
    "check_verl_settings",
    "flowrl_config_from",
    "flowrl_loss",
    "install_flowrl_loss",
    "make_flowrl_loss_fn",
    "packed_prompt_log_z",
    "register_flowrl",
    "register_flowrl_engine",
    "register_flowrl_policy_loss",
    "register_flowrl_trainer",
    "sequence_rewards",
    "set_flowrl_loss_fn",
    "verl_conflicts",
]


def __getattr__(name: str) -> Any:
    # FlowRLFSDPEngine subclasses a verl class: build it on first use so importing this package stays cheap.
    if name == "FlowRLFSDPEngine":
        from flowloss.adapters.verl.engine import engine_class

        cls = engine_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

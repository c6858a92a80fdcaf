"""Launching FlowRL in verl 0.9: the V1 trainer mode, the engine, the policy loss, and where options travel.

``main_ppo`` runs the trainer in a Ray TaskRunner and the model in Ray workers, all separate processes; ``import
verl`` imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` in each, so `register_flowrl` called from such a
module registers everything everywhere:

* the trainer mode ``"flowrl"`` (`register_flowrl_trainer`): verl's ``sync`` V1 trainer that, in the TaskRunner,
  merges the registered options with the Hydra node ``actor_rollout_ref.flowrl``, refuses conflicting verl
  settings before any worker starts, maps the actor role to a worker class that registers the engine with those
  options before verl builds its models, and sends FlowRL's loss to the actor workers once they exist;
* the engine `FlowRLFSDPEngine` (`register_flowrl_engine`) as verl's FSDP ``language_model`` engine;
* the policy loss ``"flowrl_old_ref"`` (`register_flowrl_policy_loss`) for verl's own trainers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from flowloss.adapters.verl import _compat
from flowloss.adapters.verl.config import FlowRLConfig, check_verl_settings, flowrl_config_from
from flowloss.adapters.verl.loss import make_flowrl_loss_fn, old_ref_policy_loss

__all__ = [
    "REGISTERED_POLICY_LOSS",
    "install_flowrl_loss",
    "register_flowrl",
    "register_flowrl_engine",
    "register_flowrl_policy_loss",
    "register_flowrl_trainer",
    "worker_class",
]

# Name of the policy loss registered in verl's registry by `register_flowrl_policy_loss`.
REGISTERED_POLICY_LOSS = "flowrl_old_ref"


def register_flowrl_policy_loss(
    flowrl: FlowRLConfig | dict[str, Any] | None = None, *, name: str = REGISTERED_POLICY_LOSS
) -> Callable:
    """Register the old-policy-as-reference TB loss in verl's registry (``policy_loss.loss_mode=<name>``).

    Call it in every worker process before the loss is looked up (e.g. from a module named in verl's
    ``VERL_USE_EXTERNAL_MODULES``, or at the top of the trainer entry point when workers share the process).
    """
    from verl.trainer.ppo.core_algos import register_policy_loss

    fn = partial(old_ref_policy_loss, flowrl=FlowRLConfig.from_any(flowrl))
    register_policy_loss(name)(fn)
    return fn


def register_flowrl_engine(
    flowrl: FlowRLConfig | dict[str, Any] | None = None,
    *,
    backend: Sequence[str] = ("fsdp", "fsdp2"),
    device: Sequence[str] = ("cuda", "npu"),
) -> type:
    """Make `FlowRLFSDPEngine` verl's ``language_model`` engine for ``backend``/``device``.

    verl builds the actor's (and the reference's) engine through ``EngineRegistry``; after this call both get
    the head (the reference's copy is unused) and the ``logprobs`` path. Call it in each worker process before
    ``init_model`` (the FlowRL trainer's actor workers do it themselves, with the options from the config).
    """
    from flowloss.adapters.verl.engine import engine_class

    flowrl = FlowRLConfig.from_any(flowrl)
    cls = type("FlowRLFSDPEngine", (engine_class(),), {"flowrl_config": flowrl, "__module__": "flowloss.adapters.verl"})
    _compat.set_engine(cls, backend, device)
    return cls


def install_flowrl_loss(trainer: Any, flowrl: FlowRLConfig | dict[str, Any] | None = None) -> Callable:
    """From a V1 trainer whose workers exist: make the actor workers compute FlowRL's loss.

    Builds the loss from the actor config verl builds its own ``ppo_loss`` from
    (``omega_conf_to_dataclass(config.actor_rollout_ref.actor)``), with ``flowrl`` merged with the config's
    ``actor_rollout_ref.flowrl`` node, and sends it to every actor worker with the worker group's ``set_loss_fn``.
    """
    from verl.utils.config import omega_conf_to_dataclass

    flowrl = flowrl_config_from(trainer.config, flowrl)
    actor_config = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    loss_fn = make_flowrl_loss_fn(actor_config, flowrl)
    trainer.actor_rollout_wg.set_loss_fn(loss_fn)
    return loss_fn


def worker_class(base: type[Any], flowrl: FlowRLConfig) -> type:
    """``base`` (verl's ``ActorRolloutRefWorker`` or a subclass) whose ``init_model`` first registers
    `FlowRLFSDPEngine` with ``flowrl`` in the worker's process, so that the actor's (and reference's) engine
    gets these options. The class carries the options; Ray pickles it by value."""

    def init_model(self: Any) -> Any:
        register_flowrl_engine(type(self).flowrl_config)
        return base.init_model(self)

    init_model.__doc__ = base.init_model.__doc__
    return type(f"FlowRL{base.__name__}", (base,), {
        "init_model": _compat.one_to_all(init_model),
        "flowrl_config": FlowRLConfig.from_any(flowrl),
        "__module__": __name__,
    })


# verl's trainer class is chosen at run time (`_compat.trainer_cls`): to a type checker the mixin's base is Any, so
# that its super() calls and verl's attributes (config, ...) type-check; at run time it is object.
_VerlTrainer: Any = object


class _FlowRLTrainerMixin(_VerlTrainer):
    """A V1 ``PPOTrainer`` running FlowRL: options merged with ``actor_rollout_ref.flowrl``, conflicting verl
    settings refused up front, FlowRL's engine options in the actor workers, FlowRL's loss installed."""

    flowrl_config: FlowRLConfig = FlowRLConfig()

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        flowrl = flowrl_config_from(config, type(self).flowrl_config)
        arr = config.actor_rollout_ref
        check_verl_settings(flowrl, actor=arr.actor, algorithm=config.get("algorithm"), model=arr.get("model"))
        self.flowrl_config = flowrl
        super().__init__(config, *args, **kwargs)

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        flowrl = flowrl_config_from(self.config, self.flowrl_config)
        _compat.wrap_actor_workers(self, lambda cls: worker_class(cls, flowrl))

    def _setup(self) -> None:
        super()._setup()
        install_flowrl_loss(self, self.flowrl_config)


def register_flowrl_trainer(
    flowrl: FlowRLConfig | dict[str, Any] | None = None, *, name: str = "flowrl", base: str = "sync"
) -> type:
    """Register a V1 trainer mode ``name`` (``trainer.v1.trainer_mode=flowrl``): verl's ``base`` mode (``"sync"``,
    ``"colocate_async"``, ...) running FlowRL (`_FlowRLTrainerMixin`). Returns the class.

    verl's ``main_ppo`` runs ``get_trainer_cls(config.trainer.v1.trainer_mode)`` in its TaskRunner process: call
    this there, e.g. from a module named in ``VERL_USE_EXTERNAL_MODULES`` (imported by ``import verl`` in every
    process), see `register_flowrl`.
    """
    flowrl = FlowRLConfig.from_any(flowrl)
    existing = _compat.registered_trainer(name)
    if existing is not None and not issubclass(existing, _FlowRLTrainerMixin):
        raise ValueError(f"trainer mode {name!r} is verl's {existing.__name__}: register FlowRL under another name")
    base_cls = _compat.trainer_cls(base)
    cls = type(f"FlowRL{base_cls.__name__}", (_FlowRLTrainerMixin, base_cls),
               {"flowrl_config": flowrl, "__module__": __name__})
    _compat.set_trainer(name, cls)  # (re-)registration of FlowRL's own mode
    return cls


def register_flowrl(flowrl: FlowRLConfig | dict[str, Any] | None = None) -> FlowRLConfig:
    """Everything ``main_ppo`` needs, in the calling process: the V1 trainer mode ``"flowrl"``
    (`register_flowrl_trainer`), the engine with the log-Z head and the log-prob paths
    (`register_flowrl_engine`, when ``log_z="head"`` or ``logprobs`` is not ``"framework"``) and the
    ``"flowrl_old_ref"`` policy loss (`register_flowrl_policy_loss`).

    Call it at import time of a module on the workers' ``PYTHONPATH`` and run ``main_ppo`` with
    ``VERL_USE_EXTERNAL_MODULES=<that module>``: ``import verl`` imports it in the driver, the TaskRunner and
    every worker, so all of them register the same options. Options set in the Hydra node
    ``actor_rollout_ref.flowrl`` (``+actor_rollout_ref.flowrl.beta=10``) override these::

        # flowrl_setup.py
        from flowloss.adapters.verl import register_flowrl
        register_flowrl({"beta": 15.0})
    """
    _compat.check_verl_version()
    flowrl = FlowRLConfig.from_any(flowrl)
    register_flowrl_trainer(flowrl)
    if flowrl.log_z == "head" or flowrl.logprobs != "framework":
        register_flowrl_engine(flowrl)
    register_flowrl_policy_loss(flowrl)
    return flowrl

"""Everything the verl adapter takes from verl beyond its documented extension points, in one place.

Written for and checked with **verl 0.9.1** (transformers 5.10, tensordict 0.10, Ray 2.60, peft 0.21). On a verl
upgrade, check this file first: each function names the verl internal it relies on.

* private registries: ``EngineRegistry._engines`` (``EngineRegistry.register`` refuses to replace verl's own FSDP
  entry) and the V1 trainers' ``TRAINER_REGISTRY`` (``register_trainer`` refuses to replace a mode);
* the V1 trainer's worker mapping ``PPOTrainer.role_worker_mapping`` (filled by ``_init_resource_pool_mgr``) and
  Ray's ``ActorClass.__ray_actor_class__`` (the class behind ``ray.remote(cls)``);
* the FSDP engine's build steps and output helpers that `FlowRLFSDPEngine` overrides or calls:
  ``_build_module``, ``_build_lora_module``, ``_build_fsdp_module``, ``_build_optimizer``,
  ``prepare_model_inputs`` / ``prepare_model_outputs`` (their ``output_args`` keys ``input_ids_rmpad_rolled``
  and ``pad_size``), ``_gather_and_unpad_packed``, ``get_per_tensor_param`` / ``get_per_tensor_param_shard``;
* the defaults of verl's actor config (``ActorConfig``), read from its dataclass.

Importing this module imports nothing from verl; each function imports what it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

# The verl releases this adapter was written for and tested with (CI: .ci/install-verl.sh).
VERL_VERSIONS: tuple[str, ...] = ("0.9.1",)


@functools.lru_cache(maxsize=1)
def check_verl_version() -> str:
    """verl's version; warns once when it is not one of `VERL_VERSIONS` (the internals above may differ)."""
    import verl

    version = str(getattr(verl, "__version__", "unknown"))
    if version not in VERL_VERSIONS:
        warnings.warn(
            f"flowloss.adapters.verl was written for verl {', '.join(VERL_VERSIONS)}; this is verl {version}. "
            "It reaches into verl internals (listed in flowloss/adapters/verl/_compat.py) that may have changed.",
            RuntimeWarning,
            stacklevel=3,
        )
    return version


# -- the engine ---------------------------------------------------------------------------------------------


def engine_base() -> type:
    """verl's FSDP language-model engine, the base class of `FlowRLFSDPEngine`."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    return FSDPEngineWithLMHead


def set_engine(cls: type, backends: Sequence[str], devices: Sequence[str]) -> None:
    """Make ``cls`` the ``language_model`` engine for each backend/device (overwrites verl's own entry)."""
    from verl.workers.engine.base import EngineRegistry

    engines = EngineRegistry._engines.setdefault("language_model", {})
    for backend in backends:
        for device in devices:
            engines.setdefault(backend, {})[device] = cls


def device_type() -> str:
    """The accelerator verl runs on (``"cuda"``, ``"npu"``, ``"cpu"``, ...): verl's platform."""
    from verl.utils.device import get_device_name

    return str(get_device_name())


def non_tensor(data: Any, key: str, default: Any) -> Any:
    """A micro-batch's non-tensor entry (``use_remove_padding``, ``temperature``, ``calculate_entropy``, ...)."""
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def gather_and_unpad(engine: Any, tensor: Any, pad_size: int) -> Any:
    """Strip the packed sequence's static / sequence-parallel pad suffix, as verl's own outputs are."""
    return engine._gather_and_unpad_packed(tensor, pad_size)


def build_optimizer(params: Any, optimizer_config: Any) -> Any:
    """verl's optimizer factory (``optim.optimizer_impl`` / ``optim.optimizer``); takes parameter groups."""
    from verl.workers.config.optimizer import build_optimizer as _build

    return _build(params, optimizer_config)


def is_fsdp1(module: Any) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


# -- the V1 trainer -----------------------------------------------------------------------------------------


def trainer_cls(mode: str) -> type:
    from verl.trainer.ppo.v1 import get_trainer_cls

    return get_trainer_cls(mode)


def registered_trainer(name: str) -> type | None:
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    return TRAINER_REGISTRY.get(name)


def set_trainer(name: str, cls: type) -> None:
    """(Re-)register a V1 trainer mode (``register_trainer`` refuses to replace one)."""
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    TRAINER_REGISTRY[name] = cls


def actor_worker_base() -> type:
    from verl.workers.engine_workers import ActorRolloutRefWorker

    return ActorRolloutRefWorker


def wrap_actor_workers(trainer: Any, make_cls: Callable[[type], type]) -> list[str]:
    """Replace every ``ActorRolloutRefWorker`` class in ``trainer.role_worker_mapping`` (actor, actor+ref,
    separate ref) by ``ray.remote(make_cls(cls))``; returns the roles replaced."""
    import ray

    base = actor_worker_base()
    replaced = []
    for role, remote_cls in list(getattr(trainer, "role_worker_mapping", {}).items()):
        cls = getattr(remote_cls, "__ray_actor_class__", remote_cls)
        if isinstance(cls, type) and issubclass(cls, base):
            trainer.role_worker_mapping[role] = ray.remote(make_cls(cls))
            replaced.append(str(role))
    return replaced


def one_to_all(fn: Callable) -> Callable:
    """verl's ``@register(dispatch_mode=Dispatch.ONE_TO_ALL)``: a worker method the worker group calls on all."""
    from verl.single_controller.base.decorator import Dispatch, register

    return register(dispatch_mode=Dispatch.ONE_TO_ALL)(fn)


# -- verl's config ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def actor_defaults() -> dict[str, Any]:
    """The defaults of verl's ``ActorConfig`` fields FlowRL checks (clip ratios, entropy, policy loss)."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    out = {f.name: f.default for f in dataclasses.fields(ActorConfig) if f.default is not dataclasses.MISSING}
    out["policy_loss.loss_mode"] = next(f.default for f in dataclasses.fields(PolicyLossConfig)
                                        if f.name == "loss_mode")
    return out


def to_container(node: Any) -> dict[str, Any]:
    """A Hydra/OmegaConf node (or a mapping) as a plain dict, interpolations resolved."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - verl depends on omegaconf
        return dict(node)
    if isinstance(node, DictConfig):
        # to_container is typed as any container (dict | list | str | None); a DictConfig gives a dict (used only
        # where omegaconf is installed: in the verl venv, not in the lint venv)
        return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type, unused-ignore]
    return dict(node)

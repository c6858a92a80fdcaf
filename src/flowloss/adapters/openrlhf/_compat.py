"""Workarounds for OpenRLHF's internals: every patch the adapter applies to OpenRLHF, in one place.

Written for and tested with openrlhf 0.11.2 (`OPENRLHF_TESTED`; the ``openrlhf`` extra allows >= 0.11). What each
piece relies on, so that a new OpenRLHF release can be checked against this list:

* `head_attached_on_prepare`: ``DeepspeedStrategy.prepare((actor, cfg))`` builds the actor's optimizer
  (``PolicyModelActor.init_model_from_pretrained``); the head must exist before it.
* `log_z_lr_on_optimizer`: ``DeepspeedStrategy._get_model_parameters(model, *, optim, weight_decay)`` (private)
  returns ``(raw_model, param_groups)``, the groups DeepSpeed's optimizer is built from.
* `hf_exports_without_head`: ``strategy.save_model(model, tokenizer, output_dir)`` writes every HF export.
* `flowrl_flags_on_parser`: ``openrlhf.cli.train_ppo_ray`` builds one ``argparse`` parser in its ``__main__``
  block and calls ``parse_args()`` once.
* `launcher_print`: the launcher prints "Recommend setting ..." about a KL loss FlowRL drops.
* `gpu_stand_ins`: importing ``openrlhf.cli.train_ppo_ray`` imports ``flash_attn`` (``openrlhf.models``) and
  ``vllm`` (``openrlhf.trainer.ray``) at module level, both GPU-only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from flowloss.adapters.common import (
    attach_log_z_head,
    find_log_z_head,
    log_z_head_detached,
    split_log_z_head_groups,
)

__all__ = [
    "GPU_ONLY_PACKAGES",
    "OPENRLHF_TESTED",
    "flowrl_flags_on_parser",
    "flowrl_on_prepare",
    "gpu_stand_ins",
    "head_attached_on_prepare",
    "hf_exports_without_head",
    "instance_override",
    "launcher_print",
    "log_z_lr_on_optimizer",
    "missing_gpu_packages",
    "missing_package_message",
    "split_log_z_param_groups",
]

OPENRLHF_TESTED = ("0.11.2",)
# Imported by openrlhf at module level, installable only with a GPU: {module: pip name}.
GPU_ONLY_PACKAGES = {"flash_attn": "flash-attn", "vllm": "vllm"}
_PIP_NAMES = {**GPU_ONLY_PACKAGES, "ring_flash_attn": "ring-flash-attn", "liger_kernel": "liger-kernel"}


def openrlhf_version() -> str | None:
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_package_message(missing: str | None, what: str = "flowloss.adapters.openrlhf") -> str:
    """The error for a failed import of OpenRLHF or of a package it imports, naming that package."""
    top = (missing or "").split(".")[0]
    version = openrlhf_version()
    if version is None or top == "openrlhf":
        return f"{what} needs OpenRLHF, which is not installed: pip install -e '.[openrlhf]' (from a flowloss clone)"
    if top in GPU_ONLY_PACKAGES:  # name every missing one, not only the first import that failed
        names = [m for m in GPU_ONLY_PACKAGES if m == top or m in missing_gpu_packages()]
        listed = " and ".join(f"`{m}`" for m in names)
        pips = " ".join(GPU_ONLY_PACKAGES[m] for m in names)
        verb = "are" if len(names) > 1 else "is"
        return (f"{what} needs {listed}, which OpenRLHF {version} imports and which {verb} not installed here "
                f"(GPU-only: a CUDA machine): pip install {pips}")
    pip = _PIP_NAMES.get(top, top.replace("_", "-"))
    return f"{what} needs `{top}`, which OpenRLHF {version} imports and which is not installed here: pip install {pip}"


# ------------------------------------------------------------------------------------------------------------
# Import-time stand-ins for the GPU-only packages: `--help` and the flag checks on any machine.


class _Unavailable:
    """A name of a GPU-only package that is not installed: calling or instantiating it raises."""

    package = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{cls.__qualname__} needs `{cls.package}`, which is not installed (a GPU-only package)")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        top = self.__name__.split(".")[0]
        value = type(name, (_Unavailable,), {"package": top, "__qualname__": f"{self.__name__}.{name}"})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: tuple[str, ...]) -> None:
        self.packages = packages

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def missing_gpu_packages() -> tuple[str, ...]:
    """The GPU-only packages OpenRLHF imports (`GPU_ONLY_PACKAGES`) that are not installed."""
    return tuple(name for name in GPU_ONLY_PACKAGES if importlib.util.find_spec(name) is None)


@contextlib.contextmanager
def gpu_stand_ins() -> Iterator[tuple[str, ...]]:
    """While active, the GPU-only packages OpenRLHF imports at module level (`GPU_ONLY_PACKAGES`) that are not
    installed import as stand-ins whose every name raises when called; yields the missing ones (empty: nothing
    done). Afterwards the stand-ins and every module imported with them (openrlhf's, this adapter's) are removed
    from ``sys.modules`` again, so nothing keeps them. Only to build OpenRLHF's parser: nothing can train."""
    missing = missing_gpu_packages()
    if not missing:
        yield missing
        return
    finder = _StandInFinder(missing)
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        yield missing
    finally:
        sys.meta_path.remove(finder)
        tainted = (*missing, "openrlhf", "flowloss.adapters.openrlhf.")
        for name in set(sys.modules) - before:
            if name.split(".")[0] in tainted or name.startswith(tainted[-1]):
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent in sys.modules and getattr(sys.modules[parent], child, None) is not None:
                    with contextlib.suppress(AttributeError):
                        delattr(sys.modules[parent], child)


# ------------------------------------------------------------------------------------------------------------
# Instance-level overrides of OpenRLHF's strategy (the worker's set-up and checkpoints).


@contextlib.contextmanager
def instance_override(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.<name> = value`` inside the block; restore the instance attribute (or its absence) after."""
    missing = object()
    saved = vars(obj).get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, saved)


def _is_actor(item: Any) -> bool:
    from openrlhf.models import Actor

    return isinstance(item, Actor)


@contextlib.contextmanager
def head_attached_on_prepare(strategy: Any, config: Any) -> Iterator[None]:
    """While active, ``strategy.prepare((actor, cfg))`` attaches the head to the policy before DeepSpeed (and so
    before the optimizer is built). ``config``: a ``FlowRLConfig``."""
    original = strategy.prepare

    def prepare(*models: Any, **kwargs: Any) -> Any:
        for item in models:
            if isinstance(item, tuple) and item and _is_actor(item[0]):
                attach_log_z_head(item[0].model, config.log_z_head)
        return original(*models, **kwargs)

    with instance_override(strategy, "prepare", prepare):
        yield


def split_log_z_param_groups(groups: list[Any], model: nn.Module, log_z_lr: float) -> list[dict[str, Any]]:
    """OpenRLHF's optimizer groups with the log-Z head's parameters moved to groups of their own at ``log_z_lr``.

    Each group ``{"params": ps, **options}`` becomes ``{"params": ps without the head, **options}`` plus, when it
    held head parameters, ``{"params": those, **options, "lr": log_z_lr}`` (so OpenRLHF's weight-decay split is
    kept for the head too: `flowloss.adapters.common.split_log_z_head_groups`). A plain list of parameters is one
    group. Empty groups are left out.
    """
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": list(groups)}]
    rest, moved = split_log_z_head_groups(groups, model, log_z_lr)
    if not moved:
        raise ValueError("the log-Z head's parameters are in none of OpenRLHF's optimizer groups (are they frozen?)")
    return [group for group in rest if group["params"]] + moved


@contextlib.contextmanager
def log_z_lr_on_optimizer(strategy: Any, log_z_lr: float | None) -> Iterator[None]:
    """While active, the optimizer ``strategy.prepare`` builds for a model holding the log-Z head has the head in
    groups of its own at ``log_z_lr`` (`split_log_z_param_groups`); nothing changes with ``log_z_lr=None``."""
    original = getattr(strategy, "_get_model_parameters", None)
    if log_z_lr is None or original is None:
        if log_z_lr is not None:
            raise ValueError("--flowrl.log_z_lr: this OpenRLHF strategy has no _get_model_parameters to patch "
                             f"(written for openrlhf {', '.join(OPENRLHF_TESTED)})")
        yield
        return

    def get_model_parameters(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raw_model, groups = original(model, *args, **kwargs)
        try:
            find_log_z_head(raw_model)
        except ValueError:  # another model (a critic): unchanged
            return raw_model, groups
        optim = kwargs.get("optim", args[0] if args else None) or getattr(strategy, "optim", "adam")
        if optim == "muon":
            raise ValueError("--flowrl.log_z_lr cannot be used with --actor.optim muon: DeepSpeed's Muon regroups "
                             "every parameter into its own two groups and overrides their learning rates")
        return raw_model, split_log_z_param_groups(groups, raw_model, log_z_lr)

    with instance_override(strategy, "_get_model_parameters", get_model_parameters):
        yield


@contextlib.contextmanager
def flowrl_on_prepare(strategy: Any, config: Any) -> Iterator[None]:
    """`head_attached_on_prepare` and `log_z_lr_on_optimizer` (``config.log_z_head.lr``) together: what the
    policy worker wraps OpenRLHF's ``init_model_from_pretrained`` in."""
    with head_attached_on_prepare(strategy, config), log_z_lr_on_optimizer(strategy, config.log_z_head.lr):
        yield


@contextlib.contextmanager
def hf_exports_without_head(strategy: Any) -> Iterator[None]:
    """While active, every ``strategy.save_model(model, ...)`` (HF export) runs with the head detached."""
    export = strategy.save_model

    def save_model(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with log_z_head_detached(model):
            return export(model, *args, **kwargs)

    with instance_override(strategy, "save_model", save_model):
        yield


# ------------------------------------------------------------------------------------------------------------
# OpenRLHF's launcher: its argument parser and one of its prints.


@contextlib.contextmanager
def flowrl_flags_on_parser(on_parser: Callable[[argparse.ArgumentParser, list[str]], list[str]],
                           on_parsed: Callable[[argparse.ArgumentParser, argparse.Namespace], None]) -> Iterator[None]:
    """While active, the first ``ArgumentParser.parse_args`` (OpenRLHF's launcher's) first calls
    ``on_parser(parser, argv)`` (add flags, check them; returns the argv to parse), parses, then calls
    ``on_parsed(parser, namespace)`` (which may ``parser.error``). Later parsers are left alone."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(parser: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]  # the launcher's, restored
        argv = on_parser(parser, list(sys.argv[1:] if args is None else args))
        parsed = original(parser, argv, namespace)
        on_parsed(parser, parsed)
        return parsed

    # patched on the class for the launcher's one call; ours has no overloads (and mypy refuses method assignment)
    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]  # restored


_KL_ADVICE = "Recommend setting"  # OpenRLHF's advice on --algo.kl.estimator, about a KL loss FlowRL drops
_KL_NOTE = ("[FlowRL] OpenRLHF's KL loss is dropped: FlowRL's residual already holds log pi_ref "
            "(--algo.kl.estimator only changes the logged KL; --flowrl.kl_loss true keeps the KL loss)")


def launcher_print(keep_kl_advice: Callable[[], bool]) -> Callable[..., None]:
    """A ``print`` for the launcher's globals: OpenRLHF's k1 advice becomes FlowRL's note unless
    ``keep_kl_advice()`` (``--flowrl.kl_loss true``)."""

    def print_(*values: Any, **kwargs: Any) -> None:
        advice = values and isinstance(values[0], str) and values[0].startswith(_KL_ADVICE) and "KL" in values[0]
        if advice and not keep_kl_advice():
            values = (_KL_NOTE,)
        print(*values, **kwargs)

    return print_

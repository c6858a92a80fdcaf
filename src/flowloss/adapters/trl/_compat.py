"""Workarounds for TRL internals: everything here patches or reaches into code that TRL does not promise to keep.

Written for and tested with **trl 1.16.0**, transformers 5.10 and peft 0.21.2 (``.ci/install-trl.sh``); the
``trl`` extra is bounded to ``trl>=1.16,<1.17`` for that reason. Each function names the TRL code it depends on,
so a new TRL release is checked here and nowhere else:

* `reference_policy` -- ``trl.trainer.grpo_trainer.create_model_from_path`` (how ``GRPOTrainer.__init__`` builds
  its reference model);
* `copy_peft_adapter_as_reference`, `reload_top_level_adapter` -- TRL's ``"ref"`` PEFT adapter convention and
  transformers' ``Trainer._load_from_checkpoint`` with adapter sub-folders;
* `exclude_from_weight_sync` -- ``trl.generation.vllm_generation.VLLMGeneration._iter_named_params``;
* `headless_sync_ref_callbacks` -- ``trl.trainer.callbacks.SyncRefModelCallback`` (zips parameters strictly);
* `allow_adapter_on_lm_head` -- ``GRPOTrainer.__init__``'s refusal of a PEFT adapter on ``lm_head``;
* `wrap_fused_forward`, `FusedCausalLMOutput`, `maybe_gather_lm_head_ctx` -- the ``fused_lm_head=True`` forward
  protocol of ``trl.trainer.utils.add_fused_lm_head``;
* `destroy_process_group_at_exit` -- accelerate never destroys the default process group.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import os
import types
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:  # peft: optional (TRL's `peft` extra)
    from peft import PeftModel

from flowloss.adapters.common import LOG_Z_HEAD_NAME, log_z_head_detached

__all__ = [
    "WRITTEN_FOR",
    "FusedCausalLMOutput",
    "allow_adapter_on_lm_head",
    "copy_peft_adapter_as_reference",
    "destroy_process_group_at_exit",
    "exclude_from_weight_sync",
    "headless_sync_ref_callbacks",
    "is_adapter_layer",
    "is_peft_model",
    "maybe_gather_lm_head_ctx",
    "reference_policy",
    "reload_top_level_adapter",
    "wrap_fused_forward",
]

# The versions this module was written for and is tested with in CI.
WRITTEN_FOR = {"trl": "1.16.0", "transformers": "5.10", "peft": "0.21.2"}


def _fused_output_class() -> type:
    from trl.trainer.utils import FusedCausalLMOutput as cls

    return cls


def FusedCausalLMOutput(**fields: Any) -> Any:
    """TRL's ``FusedCausalLMOutput`` (what ``_get_per_token_logps_and_entropies`` reads ``log_probs``,
    ``entropy`` and ``aux_loss`` from)."""
    return _fused_output_class()(**fields)


def maybe_gather_lm_head_ctx(*params: torch.nn.Parameter | None) -> contextlib.AbstractContextManager:
    """TRL's gather of ZeRO-3 partitioned ``lm_head`` parameters (a null context elsewhere)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx as gather

    return gather(*params)


def is_peft_model(model: object) -> TypeGuard[PeftModel]:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, IA3, ...) wrapping a module: its output is not ``module.weight @ x``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft not installed
        return False
    return isinstance(module, BaseTunerLayer)


# ----------------------------------------------------------------------------------------------------------
# The reference policy.


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


@contextlib.contextmanager
def reference_policy(trainer: Any, model: Any, ref_model: nn.Module | str | None) -> Iterator[None]:
    """While TRL's ``__init__`` runs, hand it our reference instead of a model reloaded from the policy's path.

    TRL 1.16 builds the reference with ``create_model_from_path(config._name_or_path)``: it fails for a model
    built in memory (``_name_or_path == ""``) and silently reloads the file on disk for a model whose weights
    were changed in memory. The reference is instead a frozen copy of ``trainer.model`` taken when TRL asks
    for it (the policy as given, after ``Trainer.__init__``, before any step, head or patch), or ``ref_model``.
    """
    import trl.trainer.grpo_trainer as grpo

    original = grpo.create_model_from_path
    policy_pending = isinstance(model, str)  # TRL's first call loads the policy itself

    def create_model_from_path(model_id: str, *args: Any, **kwargs: Any) -> nn.Module:
        nonlocal policy_pending
        if policy_pending:
            policy_pending = False
            return original(model_id, *args, **kwargs)
        if isinstance(ref_model, str):
            return _frozen(original(ref_model, *args, **kwargs))
        if ref_model is not None:
            return _frozen(ref_model)
        return _frozen(copy.deepcopy(trainer.model))

    grpo.create_model_from_path = create_model_from_path
    try:
        yield
    finally:
        grpo.create_model_from_path = original


def _lora_b_is_zero(model: nn.Module, adapter: str) -> bool:
    """Whether every ``lora_B`` (or ``lora_embedding_B``) of ``adapter`` is zero: the adapter is the identity."""
    marker = f".{adapter}"
    found = False
    for name, param in model.named_parameters():
        if ("lora_B" in name or "lora_embedding_B" in name) and marker in name:
            found = True
            if bool(param.detach().ne(0).any()):
                return False
    return found


def copy_peft_adapter_as_reference(model: PeftModel) -> None:
    """A pretrained PEFT adapter: add a frozen copy named ``"ref"``, which TRL uses for ``ref_per_token_logps``.

    TRL 1.16 makes this copy only when ``args.beta != 0``, and FlowRL keeps ``args.beta = 0``: without it the
    reference would be the base model with the adapter disabled, not the policy the trainer was given.

    A LoRA adapter with ``target_parameters`` (peft >= 0.17): peft before 0.20 allows one such adapter per model
    (peft#3340), so TRL then skips the copy and uses the base model (trl#5222). FlowRL does the same when that is
    exact -- the adapter is still the identity (every ``lora_B`` zero), so the base model *is* the policy -- and
    otherwise refuses: a reference that silently differs from the policy as given changes FlowRL's target. With
    peft >= 0.20 the copy is made, as TRL does.
    """
    if "ref" in model.peft_config:
        return
    default = model.peft_config["default"]
    if getattr(default, "target_parameters", None):
        import peft
        from packaging.version import Version

        if Version(peft.__version__) < Version("0.20.0"):
            if _lora_b_is_zero(model, "default"):
                return  # the reference is the base model (adapter disabled), which equals the policy as given
            raise ValueError(
                f"peft {peft.__version__} allows one LoRA adapter with `target_parameters` per model (peft#3340), "
                "so FlowRLTrainer cannot keep a frozen copy of this already-trained adapter as the reference, and "
                "the base model is not the policy you gave. Upgrade to peft>=0.20, or merge the adapter "
                "(`merge_and_unload()`) and pass the merged model with a `peft_config`."
            )
    model.add_adapter("ref", default)
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)


def reload_top_level_adapter(model: nn.Module, checkpoint_dir: str) -> None:
    """Load a PEFT checkpoint's top-level adapter into ``model``'s active adapter when sub-folders hold others.

    A run that starts from a trained adapter saves it at the top level and its frozen ``"ref"`` copy in
    ``ref/``; transformers' ``Trainer._load_from_checkpoint`` then loads only the sub-folder adapters, and a
    resumed run would silently go on from the adapter the new trainer was built with.
    """
    if not is_peft_model(model) or not os.path.isdir(checkpoint_dir):
        return
    names = ("adapter_model.safetensors", "adapter_model.bin")
    top = any(os.path.isfile(os.path.join(checkpoint_dir, n)) for n in names)
    subfolders = any(os.path.isfile(os.path.join(checkpoint_dir, d, n)) for d in os.listdir(checkpoint_dir)
                     for n in names)
    if top and subfolders:
        model.load_adapter(checkpoint_dir, model.active_adapter, is_trainable=True)


@contextlib.contextmanager
def allow_adapter_on_lm_head(enabled: bool) -> Iterator[None]:
    """Lift ``GRPOTrainer.__init__``'s refusal of a PEFT adapter on ``lm_head`` (only for a path that runs the
    model's own ``lm_head`` forward, where the adapter is exact).

    TRL 1.16 refuses it because its fused head multiplies by ``lm_head.weight`` directly. The check is
    ``isinstance(model.get_output_embeddings(), BaseTunerLayer)`` on the module global ``BaseTunerLayer``; TRL's
    ``cast_lm_head_to_fp32`` uses the same global for its own refusal, which `FlowRLTrainer` repeats.
    """
    if not enabled:
        yield
        return
    import trl.trainer.grpo_trainer as grpo

    original = getattr(grpo, "BaseTunerLayer", None)
    if original is None:
        yield
        return

    class _NoTunerLayer:  # isinstance(x, _NoTunerLayer) is always False
        pass

    grpo.BaseTunerLayer = _NoTunerLayer
    try:
        yield
    finally:
        grpo.BaseTunerLayer = original


# ----------------------------------------------------------------------------------------------------------
# Callbacks, vLLM sync, process group.


def headless_sync_ref_callbacks(trainer: Any) -> int:
    """Make TRL's ``SyncRefModelCallback`` skip the log-Z head; returns how many callbacks were changed.

    TRL 1.16's ``SyncRefModelCallback._sync_target_model`` zips ``ref.parameters()`` with ``policy.parameters()``
    (``strict=True``); the policy also carries the head, so the first sync raised ``zip() argument 2 is longer
    than argument 1``. The head is hidden from the policy's module tree during each sync (the order of the other
    parameters is the reference's, which is a copy of the policy taken before the head was attached).
    """
    from trl.trainer.callbacks import SyncRefModelCallback

    changed = 0
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SyncRefModelCallback) and not getattr(callback, "_flowrl_headless", False):
            original = callback.on_step_end

            def on_step_end(args: Any, state: Any, control: Any, _original: Callable = original, **kwargs: Any):
                model = kwargs.get("model")
                context = log_z_head_detached(model) if model is not None else contextlib.nullcontext()
                with context:
                    return _original(args, state, control, **kwargs)

            callback.on_step_end = on_step_end
            callback._flowrl_headless = True
            changed += 1
    return changed


def exclude_from_weight_sync(vllm_generation: Any, name_fragment: str = LOG_Z_HEAD_NAME) -> None:
    """Keep every parameter whose name contains ``name_fragment`` out of TRL's policy -> vLLM weight sync.

    TRL's ``VLLMGeneration.sync_weights`` (server and colocate modes, FSDP, DeepSpeed, PEFT) walks
    ``_iter_named_params()``; this filters that walk on the instance (the gathers still run on every rank).
    """
    original: Callable[[], Iterator[tuple[str, torch.Tensor]]] = vllm_generation._iter_named_params

    def _iter_named_params() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in original():
            if name_fragment not in name:
                yield name, param

    vllm_generation._iter_named_params = _iter_named_params


_EXIT_HOOK: list[bool] = []


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits (once per process).

    Neither ``Trainer.train`` nor accelerate destroys it (``accelerator.end_training()`` would, if the script
    called it): its gloo/TCPStore threads are then torn down by the C++ runtime after Python has finalized,
    which can abort a rank that has finished training ("terminate called without an active exception").
    Destroying the group in an ``atexit`` hook joins them while the interpreter is still alive; a script
    that destroys it itself is unaffected.
    """
    if not _EXIT_HOOK:
        _EXIT_HOOK.append(True)
        atexit.register(_destroy_process_group)


# ----------------------------------------------------------------------------------------------------------
# The fused-LM-head forward protocol.


def wrap_fused_forward(model: nn.Module, handler: Callable[..., Any]) -> None:
    """Route ``model(..., labels=..., fused_lm_head=True)`` to ``handler(model, trl_forward, *args, **kwargs)``.

    TRL 1.16's ``add_fused_lm_head`` replaces ``model.forward`` (an instance attribute) with a method taking
    ``fused_lm_head``, ``labels``, ``shift_labels`` and ``num_items_in_batch``; ``_get_per_token_logps_and_entropies``
    calls ``model(**inputs, labels=labels, fused_lm_head=True)`` through every wrapper (PEFT, DDP, DeepSpeed) and
    reads ``log_probs``, ``entropy`` and ``aux_loss`` of the result. The handler gets TRL's forward: calling it
    with ``fused_lm_head=False`` runs the model's original forward. Idempotent. The wrapper keeps the model class's
    signature (``generate`` validates its keyword arguments against it).
    """
    if getattr(model, "_flowrl_fused_forward", False):
        return
    trl_forward = model.forward
    if not isinstance(trl_forward, types.MethodType) or getattr(trl_forward, "__func__", None) is getattr(
        type(model), "forward", None
    ):
        warnings.warn(
            f"{type(model).__name__}.forward is not TRL's fused-LM-head forward (trl {WRITTEN_FOR['trl']} patches it "
            "in GRPOTrainer.__init__); FlowRL's log-prob paths answer fused_lm_head=True calls themselves",
            stacklevel=2,
        )

    @functools.wraps(type(model).forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return handler(self, trl_forward, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    # torch types nn.Module.__setattr__'s value as Tensor | Module; a plain attribute is allowed (and meant) here
    model._flowrl_fused_forward = True  # type: ignore[assignment]

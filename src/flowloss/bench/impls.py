"""The implementations ``flowloss bench`` compares, each with the reason it cannot run here (if any).

Every implementation is called the way its framework calls it, from the installed package (nothing is copied
into this repository), and adapted to one signature:

- op ``logprobs``: ``fn(logits [N, V], case) -> logp [N]`` (float32, 0 at masked rows);
- op ``fused_linear``: ``fn(hidden [N, H], weight [V, H], case) -> logp [N]``;
- op ``loss``: ``fn(logprobs, ref_logprobs, rewards, log_z, mask, old_logprobs) -> loss`` (the PyTorch path of
  ``trajectory_balance_loss``, entry ``flowloss``, always runs beside these);
- op ``step``: ``fn(models, batch, settings) -> PathOutput``, one RL update's forward and loss
  (`flowloss.bench.step`; the paths live there, transformers is imported only when one is built);

(a callable may carry a ``note`` attribute, copied into the results, e.g. how a helper had to be loaded)

where ``case`` carries ``labels`` (``-100`` at masked rows), ``safe_labels`` (0 there), ``keep [N]`` and
``temperature``. Helpers without a temperature argument get ``logits / T`` (what TRL, verl and OpenRLHF do before
calling them; verl and OpenRLHF divide in place on the model's output, which a benchmark's leaf tensor forbids, so
here the division allocates like the naive path's). Helpers without masking get ``safe_labels`` and their output
is zeroed at masked rows with ``torch.where``, as callers do; that cost is part of the timing.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Fn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """One implementation of one op: how to tell whether it can run, and how to build its callable."""

    name: str
    op: str
    source: str  # where the code comes from, shown in --help and the JSON
    skip_reason: Callable[[torch.device], str | None]
    build: Callable[[torch.device], Fn]


def _missing(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module.split('.')[0]} not installed"


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device"


def _never(device: torch.device) -> str | None:
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def _masked(out: torch.Tensor, case: Any) -> torch.Tensor:
    out = out.float().reshape(-1)
    return torch.where(case.keep, out, torch.zeros_like(out))


def _first_output(out: Any) -> torch.Tensor:
    """Losses come back as a tensor or as ``(loss, z_loss, ...)`` depending on the library and its version."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --- naive PyTorch and torch.compile -------------------------------------------------------------------------


def naive_logprobs(logits: torch.Tensor, case: Any) -> torch.Tensor:
    """``log_softmax(logits.float() / T, -1).gather(-1, labels)``: the expression most RL code starts from."""
    out = torch.log_softmax(logits.float() / case.temperature, dim=-1).gather(-1, case.safe_labels[:, None])
    return _masked(out, case)


def naive_fused(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
    """``log_softmax((hidden @ W^T).float() / T).gather(...)``: logits materialized, then the naive log-prob."""
    return naive_logprobs(hidden @ weight.T, case)


def _build_compiled(fn: Fn) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        # A fresh cache per case: otherwise shapes x dtypes x grad modes can pass Dynamo's recompile limit, after
        # which it silently runs the function eagerly and "compile" would time the naive path.
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    return build


def _compile_skip(device: torch.device) -> str | None:
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        return "TORCHDYNAMO_DISABLE=1 is set"
    if device.type == "cpu":
        import shutil

        if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
            return "no C++ compiler on PATH (Inductor's CPU backend needs one)"
    return None


# --- flowloss ------------------------------------------------------------------------------------------------


def _flowloss_skip(module: str) -> Callable[[torch.device], str | None]:
    def skip(device: torch.device) -> str | None:
        try:
            importlib.import_module(module)
        except ImportError as err:
            return f"{module} not importable ({type(err).__name__}: {err})"
        return None

    return skip


def _flowloss_triton_skip(device: torch.device) -> str | None:
    reason = _flowloss_skip("flowloss.ops.token_logprobs")(device)
    if reason:
        return reason
    if device.type != "cuda":
        return "the Triton kernel needs a CUDA device (its CPU check runs under TRITON_INTERPRET=1 in the tests)"
    from flowloss.ops.dispatch import triton_available

    return None if triton_available("logits") else "triton not installed"


def _build_flowloss(impl: str) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        from flowloss.ops.token_logprobs import token_logprobs

        def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
            return token_logprobs(logits, case.labels, temperature=case.temperature, impl=impl)

        return fn

    return build


def _build_flowloss_fused(device: torch.device) -> Fn:
    from flowloss.ops.fused_linear import token_logprobs_from_hidden

    def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
        return token_logprobs_from_hidden(hidden, weight, case.labels, temperature=case.temperature)

    return fn


def _build_fused_loss(device: torch.device) -> Fn:
    from flowloss.losses import trajectory_balance_loss

    def fn(lp, ref_lp, rewards, log_z, mask, old):  # the loss's defaults, as the PyTorch entry uses them
        return trajectory_balance_loss(lp, ref_lp, rewards, log_z, mask, old_logprobs=old, impl="triton")

    return fn


def _fused_loss_skip(device: torch.device) -> str | None:
    reason = _flowloss_skip("flowloss.ops.fused_tb")(device)
    if reason:
        return reason
    if device.type != "cuda":
        return "the Triton kernel needs a CUDA device (its CPU check runs under TRITON_INTERPRET=1 in the tests)"
    return None if importlib.util.find_spec("triton") is not None else "triton not installed"


# --- frameworks (called from the installed packages) ---------------------------------------------------------


def _build_trl(device: torch.device) -> Fn:
    from trl.trainer.utils import selective_log_softmax

    takes_t = _accepts(selective_log_softmax, "temperature")

    def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
        if takes_t:
            return _masked(selective_log_softmax(logits, case.safe_labels, temperature=case.temperature), case)
        return _masked(selective_log_softmax(logits / case.temperature, case.safe_labels), case)

    return fn


def _build_verl(name: str) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        module = importlib.import_module("verl.utils.torch_functional")
        helper = getattr(module, name)

        def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
            return _masked(helper(logits / case.temperature, case.safe_labels), case)

        return fn

    return build


def _verl_skip(name: str) -> Callable[[torch.device], str | None]:
    def skip(device: torch.device) -> str | None:
        reason = _missing("verl")
        if reason:
            return reason
        try:
            module = importlib.import_module("verl.utils.torch_functional")
        except Exception as err:
            return f"verl.utils.torch_functional not importable ({type(err).__name__}: {err})"
        return None if hasattr(module, name) else f"this verl has no torch_functional.{name}"

    return skip


def _load_openrlhf_helper() -> tuple[Callable, str]:
    """``openrlhf.models.utils.log_probs_from_logits``; falls back to loading that one file when the package's
    ``__init__`` pulls in a training dependency that is missing (e.g. peft), and says so."""
    try:
        module = importlib.import_module("openrlhf.models.utils")
        return module.log_probs_from_logits, ""
    except ImportError as err:
        spec = importlib.util.find_spec("openrlhf")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = os.path.join(next(iter(spec.submodule_search_locations)), "models", "utils.py")
        file_spec = importlib.util.spec_from_file_location("_flowloss_bench_openrlhf_utils", path)
        if file_spec is None or file_spec.loader is None:
            raise
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module.log_probs_from_logits, f"models/utils.py loaded alone ({err})"


def _openrlhf_skip(device: torch.device) -> str | None:
    reason = _missing("openrlhf")
    if reason:
        return reason
    try:
        _load_openrlhf_helper()
    except Exception as err:
        return f"openrlhf.models.utils.log_probs_from_logits not importable ({type(err).__name__}: {err})"
    return None


def _build_openrlhf(device: torch.device) -> Fn:
    helper, note = _load_openrlhf_helper()

    def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
        # OpenRLHF divides by T in place (`logits.div_(temperature)`); pass T = 1 and divide out of place.
        return _masked(helper(logits / case.temperature, case.safe_labels), case)

    fn.note = note  # type: ignore[attr-defined]
    return fn


def _build_liger(device: torch.device) -> Fn:
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
        loss = liger_cross_entropy(logits / case.temperature, case.labels, ignore_index=-100, reduction="none")
        return _masked(-_first_output(loss), case)

    return fn


def _build_liger_fused(device: torch.device) -> Fn:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
        # (hidden / T) @ W^T == (hidden @ W^T) / T: the temperature enters through the hidden states.
        loss = liger_fused_linear_cross_entropy(
            hidden / case.temperature, weight, case.labels, ignore_index=-100, reduction="none"
        )
        return _masked(-_first_output(loss), case)

    return fn


def _build_cce_fused(device: torch.device) -> Fn:
    from cut_cross_entropy import linear_cross_entropy

    def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
        # Its default gradient filter (filter_eps="auto") is kept: the library as users call it.
        loss = linear_cross_entropy(hidden / case.temperature, weight, case.labels, ignore_index=-100, reduction="none")
        return _masked(-_first_output(loss), case)

    return fn


def _build_flash_attn(device: torch.device) -> Fn:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
        return _masked(-_first_output(cross_entropy_loss(logits / case.temperature, case.labels)), case)

    return fn


def _build_step(name: str) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        from flowloss.bench import step

        builders = {
            "grpo-logits": step.build_grpo_logits,
            "flowloss-logits": lambda d: step.flowloss_logits,
            "flowloss-hidden": lambda d: step.flowloss_hidden,
            "liger-grpo": step.build_liger_grpo,
        }
        return builders[name](device)

    return build


def _liger_grpo_skip(device: torch.device) -> str | None:
    reason = _missing("liger_kernel")
    if reason:
        return reason
    try:
        importlib.import_module("liger_kernel.chunked_loss")
    except Exception as err:
        return f"liger_kernel.chunked_loss not importable ({type(err).__name__}: {err})"
    return None


IMPLS: tuple[Impl, ...] = (
    Impl("naive", "logprobs", "torch.log_softmax(logits.float() / T).gather", _never, lambda d: naive_logprobs),
    Impl(
        "compile", "logprobs", "torch.compile of the naive expression", _compile_skip, _build_compiled(naive_logprobs)
    ),
    Impl(
        "flowloss-triton",
        "logprobs",
        'flowloss.ops.token_logprobs(impl="triton")',
        _flowloss_triton_skip,
        _build_flowloss("triton"),
    ),
    Impl(
        "flowloss-chunked",
        "logprobs",
        'flowloss.ops.token_logprobs(impl="chunked")',
        _flowloss_skip("flowloss.ops.token_logprobs"),
        _build_flowloss("chunked"),
    ),
    Impl("trl", "logprobs", "trl.trainer.utils.selective_log_softmax", lambda d: _missing("trl"), _build_trl),
    Impl(
        "verl",
        "logprobs",
        "verl.utils.torch_functional.logprobs_from_logits",
        _verl_skip("logprobs_from_logits"),
        _build_verl("logprobs_from_logits"),
    ),
    Impl(
        "verl-v2",
        "logprobs",
        "verl.utils.torch_functional.logprobs_from_logits_v2",
        _verl_skip("logprobs_from_logits_v2"),
        _build_verl("logprobs_from_logits_v2"),
    ),
    Impl("openrlhf", "logprobs", "openrlhf.models.utils.log_probs_from_logits", _openrlhf_skip, _build_openrlhf),
    Impl(
        "liger",
        "logprobs",
        'liger_kernel.transformers.functional.liger_cross_entropy(reduction="none")',
        lambda d: _first(_missing("liger_kernel"), _needs_cuda(d)),
        _build_liger,
    ),
    Impl(
        "flash-attn",
        "logprobs",
        "flash_attn.ops.triton.cross_entropy.cross_entropy_loss",
        lambda d: _first(_missing("flash_attn"), _needs_cuda(d)),
        _build_flash_attn,
    ),
    Impl("naive", "fused_linear", "naive log-prob of hidden @ W^T", _never, lambda d: naive_fused),
    Impl(
        "compile", "fused_linear", "torch.compile of the naive expression", _compile_skip, _build_compiled(naive_fused)
    ),
    Impl(
        "flowloss-fused",
        "fused_linear",
        "flowloss.ops.fused_linear.token_logprobs_from_hidden",
        _flowloss_skip("flowloss.ops.fused_linear"),
        _build_flowloss_fused,
    ),
    Impl(
        "liger-fused",
        "fused_linear",
        'liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(reduction="none")',
        lambda d: _first(_missing("liger_kernel"), _needs_cuda(d)),
        _build_liger_fused,
    ),
    Impl(
        "cce-fused",
        "fused_linear",
        'cut_cross_entropy.linear_cross_entropy(reduction="none")',
        lambda d: _first(_missing("cut_cross_entropy"), _needs_cuda(d)),
        _build_cce_fused,
    ),
    Impl(
        "flowloss-fused-loss",
        "loss",
        'flowloss.trajectory_balance_loss(impl="triton") (2 Triton launches + 1-4 ops)',
        _fused_loss_skip,
        _build_fused_loss,
    ),
    Impl(
        "grpo-logits",
        "step",
        "model(..., logits_to_keep) logits -> trl selective_log_softmax (plain PyTorch without trl) -> GRPO loss",
        _never,
        _build_step("grpo-logits"),
    ),
    Impl(
        "flowloss-logits",
        "step",
        "model(..., logits_to_keep) logits -> flowloss.token_logprobs -> flowloss.trajectory_balance_loss",
        _never,
        _build_step("flowloss-logits"),
    ),
    Impl(
        "flowloss-hidden",
        "step",
        "model.model(...) hidden states -> flowloss.token_logprobs_from_hidden -> flowloss.trajectory_balance_loss",
        _never,
        _build_step("flowloss-hidden"),
    ),
    Impl(
        "liger-grpo",
        "step",
        "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on hidden states and lm_head.weight",
        _liger_grpo_skip,
        _build_step("liger-grpo"),
    ),
)

IMPL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(i.name for i in IMPLS))


def impls_for(op: str, selected: tuple[str, ...] | None) -> list[Impl]:
    """The implementations of ``op``, in table order, restricted to ``selected`` names when given."""
    return [i for i in IMPLS if i.op == op and (selected is None or i.name in selected)]

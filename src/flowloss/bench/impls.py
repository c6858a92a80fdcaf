"""The implementations ``flowloss bench`` compares, each with the reason it cannot run here (if any).

Every implementation is called the way its library or framework calls it, from the installed package (nothing is
copied into this repository), and adapted to one signature per op:

- ``logprobs``: ``fn(logits [N, V], case) -> logp [N]`` (float32, 0 at masked rows);
- ``fused_linear``: ``fn(hidden [N, H], weight [V, H], case) -> logp [N]``;
- ``loss``: ``fn(logprobs, ref_logprobs, rewards, log_z, mask, old_logprobs) -> loss``;
- ``step``: one RL update's paths, in `flowloss.bench.step_paths` (they need transformers).

``case`` carries ``labels`` (``-100`` at masked rows), ``safe_labels`` (0 there), ``keep [N]`` and ``temperature``.
Helpers without a temperature argument get ``logits / T`` (what TRL, verl and OpenRLHF do before calling them;
verl and OpenRLHF divide in place on the model's output, which a benchmark's leaf tensor forbids, so here the
division allocates as the naive path's does); the fused ones get ``hidden / T`` (``(h / T) W^T = (h W^T) / T``).
Helpers without masking get ``safe_labels`` and their output is zeroed at masked rows with ``torch.where``, as
callers do; that cost is part of the timing. A callable may carry a ``note``, copied into the results.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

Fn = Callable[..., Any]
F = TypeVar("F", bound=Callable[..., Any])
FILTER_EPS = 2.0**-10  # flowloss-fused-filter: the tile filter's bound on the dropped gradient per row
TRL_CHUNK_COLUMNS = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16 (that module needs datasets)
TRITON_ON_CPU = "the Triton kernel needs a CUDA device (its CPU check runs under TRITON_INTERPRET=1 in the tests)"


def importable(module: str) -> str | None:
    """None when ``module`` imports here, else why not (``"<package> not installed"`` when it is absent)."""
    top = module.split(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return f"{top} not installed"
        importlib.import_module(module)
    except Exception as err:  # an installed package whose import fails (a missing or mismatched dependency)
        return f"{module} not importable ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of one op: what it needs to run, and how to build its callable for a device."""

    name: str
    op: str
    source: str  # where the code comes from, shown in --help, the tables and the JSON
    build: Callable[[torch.device], Fn]
    needs: tuple[str, ...] = ()  # modules that must import
    cuda: str | None = None  # the reason given off CUDA, when it needs a CUDA device
    check: Callable[[torch.device], str | None] | None = None  # any further reason
    always: bool = False  # runs whatever --impl selects (the loss's PyTorch path, the baseline of its op)

    def skip_reason(self, device: torch.device) -> str | None:
        for module in self.needs:
            if reason := importable(module):
                return reason
        if self.cuda and device.type != "cuda":
            return self.cuda
        return self.check(device) if self.check else None


def noted(fn: F, note: str) -> F:
    """``fn`` carrying ``note`` as its attribute ``note`` (copied into its results with ``getattr(fn, "note")``)."""
    vars(fn)["note"] = note
    return fn


def _masked(out: torch.Tensor, case: Any) -> torch.Tensor:
    out = out.float().reshape(-1)
    return torch.where(case.keep, out, torch.zeros_like(out))


def _first(out: Any) -> torch.Tensor:
    """Losses come back as a tensor or as ``(loss, z_loss, ...)`` depending on the library and its version."""
    return out[0] if isinstance(out, (tuple, list)) else out


def accepts(fn: Callable, name: str) -> bool:
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


def _compiled(fn: Fn) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        # A fresh cache per case: otherwise shapes x dtypes x grad modes can pass Dynamo's recompile limit, after
        # which it silently runs the function eagerly and "compile" would time the naive path.
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    return build


def _compile_skip(device: torch.device) -> str | None:
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        return "TORCHDYNAMO_DISABLE=1 is set"
    compilers = (os.environ.get("CXX", "g++"), "c++", "clang++")
    if device.type == "cpu" and not any(shutil.which(c) for c in compilers):
        return "no C++ compiler on PATH (Inductor's CPU backend needs one)"
    return None


# --- flowloss ------------------------------------------------------------------------------------------------


def _triton_logits_skip(device: torch.device) -> str | None:
    from flowloss.ops.dispatch import triton_available

    return None if triton_available("logits") else "triton not installed"


def _flowloss_logits(impl: str) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        from flowloss.ops.token_logprobs import token_logprobs

        return lambda logits, case: token_logprobs(logits, case.labels, temperature=case.temperature, impl=impl)

    return build


def _flowloss_fused(impl: str) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        from flowloss.ops.fused_linear import token_logprobs_from_hidden

        return lambda h, w, case: token_logprobs_from_hidden(h, w, case.labels, temperature=case.temperature,
                                                             impl=impl)

    return build


class _LaunchedLinearLogprobs(torch.autograd.Function):
    """The fused lm_head Triton launchers (`flowloss.kernels`) with a chosen backward plan, under autograd: what
    `flowloss.token_logprobs_from_hidden` runs on CUDA, minus its checks, with ``tuning`` passed to the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, tuning):
        from flowloss.kernels import linear_logprob_forward

        order = torch.argsort((labels < 0).to(torch.int8), stable=True)  # kept rows first, on the device
        logp, lse2, _ = linear_logprob_forward(hidden, weight, None, labels, temperature=temperature, order=order)
        ctx.save_for_backward(hidden, weight, labels, lse2, order)
        ctx.temperature, ctx.tuning = temperature, tuning
        return logp

    @staticmethod
    def backward(ctx, grad):
        from flowloss.kernels import linear_logprob_backward

        hidden, weight, labels, lse2, order = ctx.saved_tensors
        dh, dw, _ = linear_logprob_backward(
            hidden, weight, None, labels, lse2, grad, temperature=ctx.temperature, order=order, need_bias=False,
            **ctx.tuning,
        )  # fmt: skip
        return dh, dw, None, None, None


def _launchers_skip(device: torch.device) -> str | None:
    """The launchers run on CUDA, and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``: a check, not a
    benchmark)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from flowloss.ops.dispatch import triton_available  # the package's one Triton check

        return None if triton_available("linear") else "triton not installed"
    return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU, as a check)"


def _flowloss_plan(**tuning: Any) -> Callable[[torch.device], Fn]:
    """``tuning`` values may be functions of ``(hidden, weight)``: they are evaluated per call."""

    def build(device: torch.device) -> Fn:
        def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
            plan = {k: v(hidden, weight) if callable(v) else v for k, v in tuning.items()}
            return _LaunchedLinearLogprobs.apply(hidden, weight, case.labels, case.temperature, plan)

        return noted(fn, ", ".join(f"{k}={'per shape' if callable(v) else v}" for k, v in tuning.items()))

    return build


def tb_loss(impl: Literal["pytorch", "triton"]) -> Fn:
    """``trajectory_balance_loss(lp, ref, rewards, log_z, mask, old_logprobs=old, impl=impl)`` with the loss's
    defaults: ``"pytorch"`` (its PyTorch ops) or ``"triton"`` (the fused kernels)."""
    from flowloss.losses import trajectory_balance_loss

    def call(lp, ref, r, z, m, old):
        return trajectory_balance_loss(lp, ref, r, z, m, old_logprobs=old, impl=impl)

    return call


# --- frameworks and kernel libraries (called from the installed packages) ------------------------------------


def _trl_logits(device: torch.device) -> Fn:
    from trl.trainer.utils import selective_log_softmax

    if accepts(selective_log_softmax, "temperature"):
        return lambda z, case: _masked(selective_log_softmax(z, case.safe_labels, temperature=case.temperature), case)
    return lambda z, case: _masked(selective_log_softmax(z / case.temperature, case.safe_labels), case)


def _trl_chunked(device: torch.device) -> Fn:
    """TRL's fused head (``add_fused_lm_head``) calls ``ChunkedLogProbFunction`` on the kept positions only where
    Triton runs (CUDA), and on every position with label 0 elsewhere; the same here, log-probs only."""
    from trl.kernels import ChunkedLogProbFunction, chunked_logprob

    compact = getattr(chunked_logprob, "_use_triton", lambda d: d.type == "cuda")(device)

    def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
        if compact:
            rows, labels = hidden[case.keep], case.labels[case.keep]
        else:
            rows, labels = hidden, case.safe_labels
        t = case.temperature
        logp = ChunkedLogProbFunction.apply(rows, weight, None, labels, t, TRL_CHUNK_COLUMNS, None, 1.0, ())
        if compact:
            return logp[0].new_zeros(case.keep.shape).masked_scatter(case.keep, logp[0].float())
        return _masked(logp[0], case)

    return noted(fn, "compact (kept rows only), as TRL on CUDA" if compact else "every row, as TRL off CUDA")


def _verl(name: str) -> Callable[[torch.device], Fn]:
    def build(device: torch.device) -> Fn:
        helper = getattr(importlib.import_module("verl.utils.torch_functional"), name)
        return lambda z, case: _masked(helper(z / case.temperature, case.safe_labels), case)

    return build


def _verl_has(name: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        module = importlib.import_module("verl.utils.torch_functional")
        return None if hasattr(module, name) else f"this verl has no torch_functional.{name}"

    return check


def _load_openrlhf_helper() -> tuple[Callable, str]:
    """``openrlhf.models.utils.log_probs_from_logits``; falls back to loading that one file when the package's
    ``__init__`` pulls in a training dependency that is missing (e.g. flash_attn), and says so."""
    try:
        return importlib.import_module("openrlhf.models.utils").log_probs_from_logits, ""
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


def _openrlhf_check(device: torch.device) -> str | None:
    if importlib.util.find_spec("openrlhf") is None:
        return "openrlhf not installed"
    try:
        _load_openrlhf_helper()
    except Exception as err:
        return f"openrlhf.models.utils.log_probs_from_logits not importable ({type(err).__name__}: {err})"
    return None


def _openrlhf(device: torch.device) -> Fn:
    helper, note = _load_openrlhf_helper()

    def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
        # OpenRLHF divides by T in place (`logits.div_(temperature)`); pass T = 1 and divide out of place.
        return _masked(helper(logits / case.temperature, case.safe_labels), case)

    return noted(fn, note)


def _liger(device: torch.device) -> Fn:
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(logits: torch.Tensor, case: Any) -> torch.Tensor:
        loss = liger_cross_entropy(logits / case.temperature, case.labels, ignore_index=-100, reduction="none")
        return _masked(-_first(loss), case)

    return fn


def _liger_fused(device: torch.device) -> Fn:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
        loss = liger_fused_linear_cross_entropy(
            hidden / case.temperature, weight, case.labels, ignore_index=-100, reduction="none"
        )
        return _masked(-_first(loss), case)

    return fn


def _cce_fused(device: torch.device) -> Fn:
    from cut_cross_entropy import linear_cross_entropy

    def fn(hidden: torch.Tensor, weight: torch.Tensor, case: Any) -> torch.Tensor:
        # Its default gradient filter (filter_eps="auto") is kept: the library as users call it.
        loss = linear_cross_entropy(hidden / case.temperature, weight, case.labels, ignore_index=-100, reduction="none")
        return _masked(-_first(loss), case)

    return fn


def _flash_attn(device: torch.device) -> Fn:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return lambda z, case: _masked(-_first(cross_entropy_loss(z / case.temperature, case.labels)), case)


NEEDS_CUDA = "needs a CUDA device"
IMPLS: tuple[Impl, ...] = (
    Impl("naive", "logprobs", "torch.log_softmax(logits.float() / T).gather", lambda d: naive_logprobs),
    Impl("compile", "logprobs", "torch.compile of the naive expression", _compiled(naive_logprobs),
         check=_compile_skip),
    Impl("flowloss-triton", "logprobs", 'flowloss.ops.token_logprobs(impl="triton")', _flowloss_logits("triton"),
         needs=("flowloss.ops.token_logprobs",), cuda=TRITON_ON_CPU, check=_triton_logits_skip),
    Impl("flowloss-chunked", "logprobs", 'flowloss.ops.token_logprobs(impl="chunked")', _flowloss_logits("chunked"),
         needs=("flowloss.ops.token_logprobs",)),
    Impl("trl", "logprobs", "trl.trainer.utils.selective_log_softmax", _trl_logits, needs=("trl.trainer.utils",)),
    Impl("verl", "logprobs", "verl.utils.torch_functional.logprobs_from_logits", _verl("logprobs_from_logits"),
         needs=("verl.utils.torch_functional",), check=_verl_has("logprobs_from_logits")),
    Impl("verl-v2", "logprobs", "verl.utils.torch_functional.logprobs_from_logits_v2",
         _verl("logprobs_from_logits_v2"), needs=("verl.utils.torch_functional",),
         check=_verl_has("logprobs_from_logits_v2")),
    Impl("openrlhf", "logprobs", "openrlhf.models.utils.log_probs_from_logits", _openrlhf, check=_openrlhf_check),
    Impl("liger", "logprobs", 'liger_kernel.transformers.functional.liger_cross_entropy(reduction="none")', _liger,
         needs=("liger_kernel",), cuda=NEEDS_CUDA),
    Impl("flash-attn", "logprobs", "flash_attn.ops.triton.cross_entropy.cross_entropy_loss", _flash_attn,
         needs=("flash_attn",), cuda=NEEDS_CUDA),
    Impl("naive", "fused_linear", "naive log-prob of hidden @ W^T", lambda d: naive_fused),
    Impl("compile", "fused_linear", "torch.compile of the naive expression", _compiled(naive_fused),
         check=_compile_skip),
    Impl("flowloss-fused", "fused_linear", "flowloss.token_logprobs_from_hidden, impl='auto' (what a user gets)",
         _flowloss_fused("auto"), needs=("flowloss.ops.fused_linear",)),
    Impl("flowloss-fused-triton", "fused_linear", "flowloss.token_logprobs_from_hidden(impl='triton'): the fused "
         "Triton kernels, exact plan", _flowloss_fused("triton"), needs=("flowloss.ops.fused_linear",),
         check=_launchers_skip),
    Impl("flowloss-fused-chunked", "fused_linear", "flowloss.token_logprobs_from_hidden(impl='chunked'): block "
         "GEMMs in PyTorch", _flowloss_fused("chunked"), needs=("flowloss.ops.fused_linear",)),
    Impl("flowloss-fused-onepass", "fused_linear",
         "flowloss.kernels launchers, scratch budget raised so the fp32 [N, H] dH buffer fits: one recompute",
         _flowloss_plan(max_scratch_bytes=lambda h, w: 4 * h.numel() + 512 * 2**20), check=_launchers_skip),
    Impl("flowloss-fused-filter", "fused_linear", "flowloss.kernels launchers, exact plan, filter_eps = 2^-10",
         _flowloss_plan(filter_eps=FILTER_EPS), check=_launchers_skip),
    Impl("trl-chunked", "fused_linear", "trl.kernels.ChunkedLogProbFunction (TRL's fused lm_head), 32768 columns "
         "a tile", _trl_chunked, needs=("trl.kernels",)),
    Impl("liger-fused", "fused_linear",
         'liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(reduction="none")', _liger_fused,
         needs=("liger_kernel",), cuda=NEEDS_CUDA),
    Impl("cce-fused", "fused_linear", 'cut_cross_entropy.linear_cross_entropy(reduction="none")', _cce_fused,
         needs=("cut_cross_entropy",), cuda=NEEDS_CUDA),
    Impl("flowloss", "loss", 'flowloss.trajectory_balance_loss, PyTorch path (impl="pytorch")',
         lambda d: tb_loss("pytorch"), always=True),
    Impl("flowloss-fused-loss", "loss",
         'flowloss.trajectory_balance_loss, fused Triton kernels (impl="triton": 2 launches + 1-4 ops)',
         lambda d: tb_loss("triton"), needs=("flowloss.ops.fused_tb",), cuda=TRITON_ON_CPU,
         check=lambda d: importable("triton")),
)  # fmt: skip

"""Build each case's inputs, run every implementation on them, and collect the figures as plain dicts.

A case is one op at one shape and dtype. Per implementation: one checked call (forward + backward, errors against
the float64 reference), the forward timed under ``torch.no_grad`` (how reference/old log-probs are computed), the
forward + backward timed (training), and the peak extra memory of each. Derived figures:

- bytes that must move at least (log-prob op), counted on what the op must touch: with ``K`` kept rows of ``N``
  (the masked rows are never read), forward ``K V s`` (one read of the kept rows, ``s`` bytes per element),
  forward + backward ``(2 K + N) V s`` (the kept rows read again, and every row of ``dlogits`` written, zeros
  included); effective GB/s is that over the median time, and ``copy`` is the GB/s of ``dst.copy_(logits)``
  measured on the same tensor (``2 N V s`` bytes), so ``GB/s / copy`` is the fraction of what this device's
  memory system delivers (counting every row instead read ~20 % high at 20 % masked rows);
- FLOPs of the fused-linear op: ``2 N H V`` forward, ``6 N H V`` forward + backward (useful FLOPs: the logits
  matmul and its two gradient matmuls; a recompute in backward is not counted);
- ``speedup`` is the naive implementation's median over this one's;
- the loss (``trajectory_balance_loss`` with importance weights from ``old_logprobs``, ``[B, T]`` with
  ``B T = N``) is reported as a fraction of the log-prob op's forward + backward time at the same ``N``.

``--op step`` (a whole RL update of a transformer per loss path) is built and measured by `flowloss.bench.step`,
once per dtype, after the other ops.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowloss.bench import reference as ref
from flowloss.bench.config import DTYPES, BenchConfig
from flowloss.bench.impls import Impl, impls_for
from flowloss.bench.memory import peak_extra_bytes
from flowloss.bench.timing import time_calls

Progress = Callable[[str], None]
IGNORE_INDEX = -100
LOSS_REFERENCE_MAX_TOKENS = 32768


@dataclass
class LogprobInputs:
    """What every adapter needs besides the logits / hidden states."""

    labels: torch.Tensor  # [N] int64, IGNORE_INDEX at masked rows
    safe_labels: torch.Tensor  # [N] int64, 0 at masked rows
    keep: torch.Tensor  # [N] bool
    grad_out: torch.Tensor  # [N] float32, random, 0 at masked rows
    temperature: float


def count_units(config: BenchConfig) -> int:
    """How many progress steps `run_suite` reports (one per implementation per case)."""
    total = 0
    for _n in config.n:
        for _dtype in config.dtypes:
            if "logprobs" in config.ops:
                total += len(config.v) * len(impls_for("logprobs", config.impls))
            if "fused_linear" in config.ops:
                total += len(config.v) * len(config.h) * len(impls_for("fused_linear", config.impls))
        if "loss" in config.ops:
            total += 1
    step_impls = impls_for("step", config.impls)
    if "step" in config.ops and step_impls:
        device = torch.device(config.device)
        runs = 1 + sum(1 for i in step_impls if not i.skip_reason(device))  # the model row and each path that runs
        fit = device.type == "cuda" and config.measure_memory
        # build; the check of each; the memory and warm-up of each; the rounds of timed steps; (CUDA) the batch searches
        total += len(config.step_dtypes) * (1 + 2 * runs + config.step_reps + (runs if fit else 0))
    return total


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _make_inputs(n: int, vocab: int, mask_fraction: float, temperature: float, gen: torch.Generator, device):
    keep = torch.rand(n, generator=gen) >= mask_fraction
    safe = torch.randint(0, vocab, (n,), generator=gen)
    labels = torch.where(keep, safe, torch.full_like(safe, IGNORE_INDEX))
    grad_out = torch.randn(n, generator=gen) * keep
    return LogprobInputs(
        labels=labels.to(device),
        safe_labels=torch.where(keep, safe, torch.zeros_like(safe)).to(device),
        keep=keep.to(device),
        grad_out=grad_out.to(device),
        temperature=temperature,
    )


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal fp32 drawn on ``device`` itself (no multi-GB host copy), seeded from ``gen``."""
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    local = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=local, device=device, dtype=torch.float32)


def _skipped(impl: Impl, reason: str, status: str = "skipped") -> dict[str, Any]:
    return {"impl": impl.name, "source": impl.source, "status": status, "reason": reason}


def _measure(
    call: Callable[[], torch.Tensor],
    leaves: list[torch.Tensor],
    grad_out: torch.Tensor,
    *,
    device: torch.device,
    config: BenchConfig,
) -> dict[str, Any]:
    """Time and size the forward (no grad) and forward + backward of ``call``."""

    def clear() -> None:
        for t in leaves:
            t.grad = None

    def forward() -> None:
        with torch.no_grad():
            call()

    def forward_backward() -> None:
        clear()
        call().backward(grad_out)

    out: dict[str, Any] = {}
    out["fwd_ms"] = time_calls(forward, device=device, warmup=config.warmup, reps=config.reps).as_dict()
    out["fwdbwd_ms"] = time_calls(forward_backward, device=device, warmup=config.warmup, reps=config.reps).as_dict()
    if config.measure_memory:
        clear()
        out["peak_mem_fwd_bytes"], method = peak_extra_bytes(forward, device=device)
        clear()
        out["peak_mem_fwdbwd_bytes"], _ = peak_extra_bytes(lambda: call().backward(grad_out), device=device)
        out["memory_method"] = method
    clear()
    return out


def _run_impls(
    impls: list[Impl],
    make_call: Callable[[Callable], Callable[[], torch.Tensor]],
    check: Callable[[torch.Tensor], dict[str, Any]],
    leaves: list[torch.Tensor],
    inputs: LogprobInputs,
    *,
    device: torch.device,
    config: BenchConfig,
    progress: Progress,
    label: str,
) -> list[dict[str, Any]]:
    results = []
    for impl in impls:
        progress(f"{label} {impl.name}")
        reason = impl.skip_reason(device)
        if reason:
            results.append(_skipped(impl, reason))
            continue
        try:
            fn = impl.build(device)
            call = make_call(fn)
            for t in leaves:
                t.grad = None
            with torch.no_grad():
                call()  # the no-grad graph of torch.compile is compiled here, outside any timing
            out = call()
            out.backward(inputs.grad_out)
            record = {"impl": impl.name, "source": impl.source, "status": "ok", "reason": ""}
            if getattr(fn, "note", ""):
                record["note"] = fn.note
            record.update(check(out))
            record.update(_measure(call, leaves, inputs.grad_out, device=device, config=config))
        except Exception as err:
            for t in leaves:
                t.grad = None
            reason = "out of memory" if _is_oom(err) else _short(err)
            results.append(_skipped(impl, reason, status="error"))
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(record)
    return results


def _copy_gbps(x: torch.Tensor, device: torch.device, config: BenchConfig) -> float:
    dst = torch.empty_like(x, requires_grad=False)
    src = x.detach()
    t = time_calls(lambda: dst.copy_(src), device=device, warmup=max(config.warmup, 1), reps=config.reps)
    return 2 * x.numel() * x.element_size() / (t.median * 1e-3) / 1e9


def _add_derived(case: dict[str, Any]) -> None:
    results = case["results"]
    naive = next((r for r in results if r["impl"] == "naive" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] != "ok":
            continue
        for phase in ("fwd", "fwdbwd"):
            seconds = r[f"{phase}_ms"]["median"] * 1e-3
            if naive is not None:
                r[f"speedup_vs_naive_{phase}"] = naive[f"{phase}_ms"]["median"] / r[f"{phase}_ms"]["median"]
            if case.get("min_bytes"):
                gbps = case["min_bytes"][phase] / seconds / 1e9
                r[f"gbps_{phase}"] = gbps
                r[f"copy_fraction_{phase}"] = gbps / case["copy_gbps"] if case.get("copy_gbps") else None
            if case.get("flops"):
                r[f"tflops_{phase}"] = case["flops"][phase] / seconds / 1e12
        if r.get("peak_mem_fwdbwd_bytes") is not None:
            r["mem_fwdbwd_vs_logits"] = r["peak_mem_fwdbwd_bytes"] / case["logits_bytes"]
            r["mem_fwd_vs_logits"] = r["peak_mem_fwd_bytes"] / case["logits_bytes"]


def _skip_all(impls: list[Impl], reason: str, progress: Progress, label: str) -> list[dict[str, Any]]:
    """Every implementation of a case that cannot run here, skipped with the case's reason."""
    results = []
    for impl in impls:
        progress(f"{label} {impl.name}")
        results.append(_skipped(impl, reason))
    return results


def _case_skip(need: int, device: torch.device, *, naive_extra: int = 0) -> str | None:
    """Why a case cannot run here, if it cannot. On CUDA an implementation that runs out of memory is caught and
    listed as such, so only the inputs and their gradients must fit; on CPU the kernel's OOM killer would end the
    whole run, so the naive path's fp32 working set (``naive_extra``) must fit as well."""
    if device.type != "cuda":
        need += naive_extra
    available = _available_bytes(device)
    if available is not None and need > available:
        return f"shape needs about {_gib(need)}, {_gib(available)} available on {device.type}"
    return None


def _logprobs_case(n: int, vocab: int, dtype_key: str, config: BenchConfig, device, gen, progress) -> dict:
    dtype = DTYPES[dtype_key]
    elem = torch.empty((), dtype=dtype).element_size()
    logits_bytes = n * vocab * elem
    # logits + dlogits; on CPU also the naive path's fp32 log-softmax, its gradient and a temporary
    case_skip = _case_skip(2 * logits_bytes, device, naive_extra=3 * n * vocab * 4)
    case: dict[str, Any] = {
        "op": "logprobs",
        "n": n,
        "v": vocab,
        "dtype": dtype_key,
        "device": device.type,
        "temperature": config.temperature,
        "masked_rows": None,
        "logits_bytes": logits_bytes,
        "min_bytes": {"fwd": logits_bytes, "fwdbwd": 3 * logits_bytes},
        "reference": "float64 log_softmax + gather in row blocks (flowloss.bench.reference), autograd for dlogits",
    }
    impls = impls_for("logprobs", config.impls)
    label = f"logprobs N={n} V={vocab} {dtype_key}"
    if case_skip:
        case["results"] = _skip_all(impls, case_skip, progress, label)
        return case
    inputs = _make_inputs(n, vocab, config.mask_fraction, config.temperature, gen, device)
    case["masked_rows"] = int((~inputs.keep).sum())
    kept_bytes = (n - case["masked_rows"]) * vocab * elem
    case["min_bytes"] = {"fwd": kept_bytes, "fwdbwd": 2 * kept_bytes + logits_bytes}
    logits = (_randn((n, vocab), gen, device) * 2.0).to(dtype).requires_grad_(True)
    case["copy_gbps"] = _copy_gbps(logits, device, config)

    def make_call(fn):
        return lambda: fn(logits, inputs)

    def check(out: torch.Tensor) -> dict[str, Any]:
        if out.shape != (n,):
            raise ValueError(f"returned shape {tuple(out.shape)}, expected ({n},)")
        err, err_grad = ref.logprob_errors(
            logits,
            inputs.labels,
            inputs.keep,
            inputs.grad_out,
            temperature=config.temperature,
            logp=out.detach(),
            grad=logits.grad,
        )
        return {"max_abs_err": err, "max_abs_err_grad": err_grad}

    case["results"] = _run_impls(
        impls,
        make_call,
        check,
        [logits],
        inputs,
        device=device,
        config=config,
        progress=progress,
        label=label,
    )
    _add_derived(case)
    return case


def _fused_case(n: int, vocab: int, hid: int, dtype_key: str, config: BenchConfig, device, gen, progress) -> dict:
    dtype = DTYPES[dtype_key]
    elem = torch.empty((), dtype=dtype).element_size()
    logits_bytes = n * vocab * elem
    # inputs, their gradients and the float64 reference's weight and its gradient
    need = 2 * (n + vocab) * hid * elem + 2 * vocab * hid * 8
    case_skip = _case_skip(need, device, naive_extra=2 * logits_bytes + 3 * n * vocab * 4)
    case: dict[str, Any] = {
        "op": "fused_linear",
        "n": n,
        "v": vocab,
        "h": hid,
        "dtype": dtype_key,
        "device": device.type,
        "temperature": config.temperature,
        "masked_rows": None,
        "logits_bytes": logits_bytes,
        "flops": {"fwd": 2 * n * hid * vocab, "fwdbwd": 6 * n * hid * vocab},
        "reference": "float64 (hidden @ W^T) log_softmax + gather in row blocks, autograd for dhidden and dW",
    }
    impls = impls_for("fused_linear", config.impls)
    label = f"fused_linear N={n} V={vocab} H={hid} {dtype_key}"
    if case_skip:
        case["results"] = _skip_all(impls, case_skip, progress, label)
        return case
    inputs = _make_inputs(n, vocab, config.mask_fraction, config.temperature, gen, device)
    case["masked_rows"] = int((~inputs.keep).sum())
    hidden = _randn((n, hid), gen, device).to(dtype).requires_grad_(True)
    weight = (_randn((vocab, hid), gen, device) * (2.0 / math.sqrt(hid))).to(dtype).requires_grad_(True)
    expected = ref.fused_logprobs_and_grads(
        hidden, weight, inputs.labels, inputs.keep, inputs.grad_out, temperature=config.temperature
    )

    def make_call(fn):
        return lambda: fn(hidden, weight, inputs)

    def check(out: torch.Tensor) -> dict[str, Any]:
        if out.shape != (n,):
            raise ValueError(f"returned shape {tuple(out.shape)}, expected ({n},)")
        lp, dh, dw = expected
        return {
            "max_abs_err": ref.max_abs_error(out, lp),
            "max_abs_err_grad": max(ref.max_abs_error(hidden.grad, dh), ref.max_abs_error(weight.grad, dw)),
        }

    case["results"] = _run_impls(
        impls,
        make_call,
        check,
        [hidden, weight],
        inputs,
        device=device,
        config=config,
        progress=progress,
        label=label,
    )
    _add_derived(case)
    return case


def split_tokens(n: int) -> tuple[int, int]:
    """``N -> (B, T)``, ``B T = N``: ``T`` the largest power of two dividing ``N`` with ``T <= 1024`` and, when
    ``N >= 8``, ``B >= 8`` (a loss over one sequence would not exercise the per-sequence weights)."""
    t = 1024
    while n % t or (t > 1 and n // t < 8):
        t //= 2
    return n // t, t


def _loss_case(n: int, config: BenchConfig, device, gen, progress) -> dict[str, Any]:
    from flowloss import reference as flref
    from flowloss import trajectory_balance_loss

    progress(f"loss N={n}")
    b, t = split_tokens(n)
    case: dict[str, Any] = {
        "op": "loss",
        "n": n,
        "b": b,
        "t": t,
        "dtype": "fp32",
        "device": device.type,
        "call": "trajectory_balance_loss(..., old_logprobs=old) (importance weights 'sequence_clipped')",
    }
    mask = torch.rand(b, t, generator=gen) >= config.mask_fraction
    lp = (torch.randn(b, t, generator=gen) * 0.5 - 2.0).to(device).requires_grad_(True)
    ref_lp = (torch.randn(b, t, generator=gen) * 0.5 - 2.0).to(device)
    old = (lp.detach().cpu() + 0.05 * torch.randn(b, t, generator=gen)).to(device)
    rewards = torch.randn(b, generator=gen).to(device)
    log_z = torch.randn(b, generator=gen).to(device).requires_grad_(True)
    mask = mask.to(device)
    grad_out = torch.ones((), device=device)
    expected: list[torch.Tensor] = []  # float64 loss and gradients, computed once (loops: slow)

    def pytorch_path(*args: torch.Tensor) -> torch.Tensor:
        return trajectory_balance_loss(*args[:5], old_logprobs=args[5])

    pytorch_impl = Impl("flowloss", "loss", "flowloss.trajectory_balance_loss", lambda d: None, lambda d: pytorch_path)
    case["results"] = []
    for impl in (pytorch_impl, *impls_for("loss", config.impls)):
        reason = impl.skip_reason(device)
        if reason:
            case["results"].append(_skipped(impl, reason))
            continue
        try:
            fn = impl.build(device)

            def call(fn=fn) -> torch.Tensor:
                return fn(lp, ref_lp, rewards, log_z, mask, old)

            lp.grad = log_z.grad = None
            out = call()
            out.backward()
            record: dict[str, Any] = {"impl": impl.name, "source": impl.source, "status": "ok", "reason": ""}
            if n <= LOSS_REFERENCE_MAX_TOKENS:
                if not expected:
                    lp64 = lp.detach().cpu().double().requires_grad_(True)
                    z64 = log_z.detach().cpu().double().requires_grad_(True)
                    w = flref.importance_weights(lp64.detach(), old.cpu().double(), mask.cpu(), mode="sequence_clipped")
                    loss64 = flref.trajectory_balance_loss(
                        lp64, ref_lp.cpu().double(), rewards.cpu().double(), z64, mask.cpu(), weights=w
                    )
                    loss64.backward()
                    expected.extend([loss64.detach().reshape(1), lp64.grad, z64.grad])
                record["max_abs_err"] = ref.max_abs_error(out.detach().cpu().reshape(1), expected[0])
                record["max_abs_err_grad"] = max(
                    ref.max_abs_error(lp.grad.cpu(), expected[1]), ref.max_abs_error(log_z.grad.cpu(), expected[2])
                )
                case["reference"] = "flowloss.reference.trajectory_balance_loss (float64 loops)"
            else:
                record["max_abs_err"] = record["max_abs_err_grad"] = None
                case["reference"] = f"not run: N > {LOSS_REFERENCE_MAX_TOKENS} (the float64 loop reference is slow)"
            record.update(_measure(call, [lp, log_z], grad_out, device=device, config=config))
        except Exception as err:
            record = _skipped(impl, "out of memory" if _is_oom(err) else _short(err), status="error")
        case["results"].append(record)
    return case


def _relate_loss(loss_case: dict[str, Any], logprob_case: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``loss_case`` with its time as a fraction of ``logprob_case``'s best flowloss (or naive) time."""
    out = {**loss_case, "results": [dict(r) for r in loss_case["results"]]}
    ok = {r["impl"]: r for r in logprob_case["results"] if r["status"] == "ok"}
    base_name = next((name for name in ("flowloss-triton", "flowloss-chunked", "naive") if name in ok), None)
    out["relative_to"] = {"op": "logprobs", "v": logprob_case["v"], "dtype": logprob_case["dtype"], "impl": base_name}
    for r in out["results"]:
        if r["status"] == "ok" and base_name is not None:
            r["fraction_of_logprobs_fwdbwd"] = r["fwdbwd_ms"]["median"] / ok[base_name]["fwdbwd_ms"]["median"]
    return out


def run_suite(config: BenchConfig, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run every case of ``config`` (resolved first); return one dict per case (see ``docs/benchmarks.md``)."""
    config = config.resolved()
    progress = progress or (lambda _label: None)
    device = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    cases: list[dict[str, Any]] = []
    # an op none of whose implementations was picked with --impl is left out (the loss has only flowloss's)
    ops = {op for op in config.ops if op == "loss" or impls_for(op, config.impls)}
    for n in config.n:
        loss_case = _loss_case(n, config, device, gen, progress) if "loss" in ops else None
        related = False
        for dtype_key in config.dtypes:
            for vocab in config.v:
                if "logprobs" in ops:
                    case = _logprobs_case(n, vocab, dtype_key, config, device, gen, progress)
                    cases.append(case)
                    if loss_case is not None:
                        cases.append(_relate_loss(loss_case, case))
                        related = True
                if "fused_linear" in ops:
                    for hid in config.h:
                        cases.append(_fused_case(n, vocab, hid, dtype_key, config, device, gen, progress))
        if loss_case is not None and not related:
            cases.append(loss_case)
    if "step" in ops:
        from flowloss.bench.step import step_case
        from flowloss.bench.step_model import PRESETS, split_length, state_bytes

        for dtype_key in config.step_dtypes:
            # the models and their optimizer states must fit; on CPU also the logits paths' fp32 working set
            # (logits, their gradient and a temporary), since the kernel's OOM killer would end the whole run
            logits = config.sequences * (split_length(config.seq_len)[1] + 1) * PRESETS[config.preset]["vocab_size"]
            skip = _case_skip(state_bytes(config.preset, DTYPES[dtype_key]), device, naive_extra=3 * 4 * logits)
            cases.append(
                step_case(
                    impls_for("step", config.impls),
                    skip_reason=skip,
                    preset=config.preset,
                    dtype_key=dtype_key,
                    sequences=config.sequences,
                    group_size=config.group_size,
                    seq_len=config.seq_len,
                    device=device,
                    warmup=config.step_warmup,
                    reps=config.step_reps,
                    temperature=config.temperature,
                    seed=config.seed,
                    measure_memory=config.measure_memory,
                    progress=progress,
                )
            )
    return cases

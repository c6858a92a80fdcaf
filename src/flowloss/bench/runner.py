"""Build each case's inputs, run every implementation on them, and collect the figures as plain dicts.

A case is one op at one shape and dtype. Per implementation: one checked call (forward + backward, errors against
the float64 reference), the forward timed under ``torch.no_grad`` (how reference / old log-probs are computed),
the forward + backward timed (training), and the peak extra memory of each. The derived columns (bytes the op
must move, GB/s and share of a copy, FLOPs, speed-up over naive, memory over the logits) are defined in
``docs/benchmarks.md``, "Columns". A case's inputs depend only on ``--seed`` and its shape (`case_seed`), never on
what else the run measures. ``--op step`` is built and measured by `flowloss.bench.step`, after the other ops.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowloss.bench import impls as impls_mod
from flowloss.bench import reference as ref
from flowloss.bench import step, step_paths
from flowloss.bench.config import DTYPES, BenchConfig, ResolvedConfig, Run
from flowloss.bench.impls import Impl
from flowloss.bench.memory import is_oom, peak_extra_bytes, release, short_error
from flowloss.bench.step_model import PRESETS, split_length, state_bytes
from flowloss.bench.timing import time_calls

IGNORE_INDEX = -100
LOSS_REFERENCE_MAX_TOKENS = 32768  # the float64 loss reference loops in Python: slow beyond this


def all_impls() -> tuple[Impl, ...]:
    return (*impls_mod.IMPLS, *step_paths.STEP_IMPLS)


def impl_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.name for i in all_impls()))


def impls_for(op: str, selected: tuple[str, ...] | None) -> list[Impl]:
    """The implementations of ``op`` in table order, restricted to ``selected`` names (plus the ``always`` ones)."""
    return [i for i in all_impls() if i.op == op and (selected is None or i.always or i.name in selected)]


@dataclass
class TokenInputs:
    """What every implementation gets besides the logits / hidden states."""

    labels: torch.Tensor  # [N] int64, IGNORE_INDEX at masked rows
    safe_labels: torch.Tensor  # [N] int64, 0 at masked rows
    keep: torch.Tensor  # [N] bool
    grad_out: torch.Tensor  # [N] float32, random, 0 at masked rows
    temperature: float


def case_seed(seed: int, *key: object) -> int:
    """The seed of one case's inputs, from the run's ``--seed`` and the case's shape alone (``key``)."""
    return int.from_bytes(hashlib.sha256(repr((seed, *key)).encode()).digest()[:8], "little") >> 2


def token_inputs(n: int, vocab: int, config: BenchConfig, device: torch.device) -> TokenInputs:
    """Labels, mask and upstream gradient of ``N`` rows over ``V``: the same for every op at this ``(N, V)``."""
    gen = torch.Generator().manual_seed(case_seed(config.seed, "tokens", n, vocab))
    keep = torch.rand(n, generator=gen) >= config.mask_fraction
    safe = torch.where(keep, torch.randint(0, vocab, (n,), generator=gen), 0)
    grad_out = torch.randn(n, generator=gen) * keep
    labels = torch.where(keep, safe, IGNORE_INDEX)
    return TokenInputs(labels.to(device), safe.to(device), keep.to(device), grad_out.to(device), config.temperature)


def randn(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal fp32 drawn on ``device`` itself (no multi-GB host copy)."""
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def count_units(config: ResolvedConfig) -> int:
    """How many progress steps `run_suite` reports (one per implementation per case; the step's phases)."""
    per_n = 0
    for op, shapes in (("logprobs", len(config.v)), ("fused_linear", len(config.v) * len(config.h))):
        if op in config.ops:
            per_n += shapes * len(config.dtypes) * len(impls_for(op, config.impls))
    if "loss" in config.ops:
        per_n += len(impls_for("loss", config.impls))
    total = len(config.n) * per_n
    if "step" in config.ops:
        total += len(config.step_dtypes) * step.count_units(impls_for("step", config.impls), config)
    return total


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def case_skip(need: int, device: torch.device, *, naive_extra: int = 0) -> str | None:
    """Why a case cannot run here, if it cannot. On CUDA an implementation that runs out of memory is caught and
    listed as such, so only the inputs and their gradients must fit; on CPU the kernel's OOM killer would end the
    whole run, so the naive path's fp32 working set (``naive_extra``) must fit as well."""
    need += naive_extra if device.type != "cuda" else 0
    available = available_bytes(device)
    if available is not None and need > available:
        return f"shape needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available on {device.type}"
    return None


def skipped(impl: Impl, reason: str, status: str = "skipped") -> dict[str, Any]:
    return {"impl": impl.name, "source": impl.source, "status": status, "reason": reason}


def _measure(call: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad_out: torch.Tensor, run: Run) -> dict:
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

    c = run.config
    out: dict[str, Any] = {
        "fwd_ms": time_calls(forward, device=run.device, warmup=c.warmup, reps=c.reps).as_dict(),
        "fwdbwd_ms": time_calls(forward_backward, device=run.device, warmup=c.warmup, reps=c.reps).as_dict(),
    }
    if c.measure_memory:
        clear()
        out["peak_mem_fwd_bytes"], out["memory_method"] = peak_extra_bytes(forward, device=run.device)
        clear()
        out["peak_mem_fwdbwd_bytes"], _ = peak_extra_bytes(lambda: call().backward(grad_out), device=run.device)
    clear()
    return out


def _run_impls(impls: list[Impl], make_call: Callable, check: Callable, leaves: list[torch.Tensor],
               grad_out: torch.Tensor, run: Run, label: str) -> list[dict[str, Any]]:  # fmt: skip
    """Each implementation: skipped with its reason, or checked once (forward + backward), then measured."""
    results = []
    for impl in impls:
        run.progress(f"{label} {impl.name}")
        reason = run.out_of_time() or impl.skip_reason(run.device)
        if reason:
            results.append(skipped(impl, reason))
            continue
        try:
            fn = impl.build(run.device)
            call = make_call(fn)
            for t in leaves:
                t.grad = None
            with torch.no_grad():
                call()  # the no-grad graph of torch.compile is compiled here, outside any timing
            out = call()
            out.backward(grad_out)
            record = {"impl": impl.name, "source": impl.source, "status": "ok", "reason": ""}
            if note := getattr(fn, "note", ""):
                record["note"] = note
            record.update(check(out))
            record.update(_measure(call, leaves, grad_out, run))
            results.append(record)
        except Exception as err:
            for t in leaves:
                t.grad = None
            results.append(skipped(impl, "out of memory" if is_oom(err) else short_error(err), status="error"))
        finally:
            release(run.device)
    return results


def _skip_all(impls: list[Impl], reason: str, run: Run, label: str) -> list[dict[str, Any]]:
    for impl in impls:
        run.progress(f"{label} {impl.name}")
    return [skipped(impl, reason) for impl in impls]


def _add_derived(case: dict[str, Any]) -> None:
    ok = [r for r in case["results"] if r["status"] == "ok"]
    naive = next((r for r in ok if r["impl"] == "naive"), None)
    for r in ok:
        for phase in ("fwd", "fwdbwd"):
            seconds = r[f"{phase}_ms"]["median"] * 1e-3
            if naive is not None:
                r[f"speedup_vs_naive_{phase}"] = naive[f"{phase}_ms"]["median"] / r[f"{phase}_ms"]["median"]
            if case.get("min_bytes"):
                r[f"gbps_{phase}"] = case["min_bytes"][phase] / seconds / 1e9
                r[f"copy_fraction_{phase}"] = r[f"gbps_{phase}"] / case["copy_gbps"] if case.get("copy_gbps") else None
            if case.get("flops"):
                r[f"tflops_{phase}"] = case["flops"][phase] / seconds / 1e12
        if r.get("peak_mem_fwdbwd_bytes") is not None:
            r["mem_fwdbwd_vs_logits"] = r["peak_mem_fwdbwd_bytes"] / case["logits_bytes"]
            r["mem_fwd_vs_logits"] = r["peak_mem_fwd_bytes"] / case["logits_bytes"]
            if case.get("grads_bytes"):
                r["mem_fwdbwd_vs_grads"] = r["peak_mem_fwdbwd_bytes"] / case["grads_bytes"]


def _copy_gbps(x: torch.Tensor, run: Run) -> float:
    dst, src = torch.empty_like(x, requires_grad=False), x.detach()
    c = run.config
    t = time_calls(lambda: dst.copy_(src), device=run.device, warmup=max(c.warmup, 1), reps=c.reps)
    return 2 * x.numel() * x.element_size() / (t.median * 1e-3) / 1e9


def _header(op: str, n: int, vocab: int, dtype_key: str, run: Run, reference: str, **extra: Any) -> dict[str, Any]:
    elem = DTYPES[dtype_key].itemsize
    case = {"op": op, "n": n, "v": vocab, **extra, "dtype": dtype_key, "device": run.device.type}
    case.update(temperature=run.config.temperature, masked_rows=None, logits_bytes=n * vocab * elem)
    return {**case, "reference": reference}


def _logprobs_case(n: int, vocab: int, dtype_key: str, run: Run) -> dict[str, Any]:
    dtype, label = DTYPES[dtype_key], f"logprobs N={n} V={vocab} {dtype_key}"
    reference = "float64 log_softmax + gather in row blocks (flowloss.bench.reference), autograd for dlogits"
    case = _header("logprobs", n, vocab, dtype_key, run, reference)
    logits_bytes = case["logits_bytes"]
    case["min_bytes"] = {"fwd": logits_bytes, "fwdbwd": 3 * logits_bytes}
    impls = impls_for("logprobs", run.config.impls)
    # logits + dlogits; on CPU also the naive path's fp32 log-softmax, its gradient and a temporary
    if reason := case_skip(2 * logits_bytes, run.device, naive_extra=3 * n * vocab * 4):
        return {**case, "results": _skip_all(impls, reason, run, label)}
    inputs = token_inputs(n, vocab, run.config, run.device)
    case["masked_rows"] = n - int(inputs.keep.sum())
    kept_bytes = (n - case["masked_rows"]) * vocab * dtype.itemsize
    case["min_bytes"] = {"fwd": kept_bytes, "fwdbwd": 2 * kept_bytes + logits_bytes}  # masked rows: never read
    seed = case_seed(run.config.seed, "logits", n, vocab)
    logits = (randn((n, vocab), seed, run.device) * 2.0).to(dtype).requires_grad_(True)
    case["copy_gbps"] = _copy_gbps(logits, run)

    def check(out: torch.Tensor) -> dict[str, Any]:
        if out.shape != (n,):
            raise ValueError(f"returned shape {tuple(out.shape)}, expected ({n},)")
        err, err_grad = ref.logprob_errors(logits, inputs.labels, inputs.keep, inputs.grad_out,
                                           temperature=inputs.temperature, logp=out.detach(), grad=logits.grad)
        return {"max_abs_err": err, "max_abs_err_grad": err_grad}  # fmt: skip

    case["results"] = _run_impls(impls, lambda fn: lambda: fn(logits, inputs), check, [logits], inputs.grad_out,
                                 run, label)  # fmt: skip
    _add_derived(case)
    return case


def _fused_case(n: int, vocab: int, hid: int, dtype_key: str, run: Run) -> dict[str, Any]:
    dtype, label = DTYPES[dtype_key], f"fused_linear N={n} V={vocab} H={hid} {dtype_key}"
    reference = "float64 (hidden @ W^T) log_softmax + gather in row blocks, autograd for dhidden and dW"
    case = _header("fused_linear", n, vocab, dtype_key, run, reference, h=hid)
    case["flops"] = {"fwd": 2 * n * hid * vocab, "fwdbwd": 6 * n * hid * vocab}
    case["grads_bytes"] = (n + vocab) * hid * dtype.itemsize  # dhidden + dW
    impls = impls_for("fused_linear", run.config.impls)
    # inputs, their gradients, the float64 reference's weight and its gradient; on CPU the naive working set
    need = 2 * case["grads_bytes"] + 2 * vocab * hid * 8
    if reason := case_skip(need, run.device, naive_extra=2 * case["logits_bytes"] + 3 * n * vocab * 4):
        return {**case, "results": _skip_all(impls, reason, run, label)}
    inputs = token_inputs(n, vocab, run.config, run.device)
    case["masked_rows"] = n - int(inputs.keep.sum())
    seed = case_seed(run.config.seed, "hidden", n, vocab, hid)
    hidden = randn((n, hid), seed, run.device).to(dtype).requires_grad_(True)
    weight = (randn((vocab, hid), seed + 1, run.device) * (2.0 / math.sqrt(hid))).to(dtype).requires_grad_(True)
    lp, dh, dw = ref.fused_logprobs_and_grads(hidden, weight, inputs.labels, inputs.keep, inputs.grad_out,
                                              temperature=inputs.temperature)  # fmt: skip

    def check(out: torch.Tensor) -> dict[str, Any]:
        if out.shape != (n,):
            raise ValueError(f"returned shape {tuple(out.shape)}, expected ({n},)")
        grad_err = max(ref.max_abs_error(ref.grad_of(hidden, "the hidden states"), dh),
                       ref.max_abs_error(ref.grad_of(weight, "the weight"), dw))  # fmt: skip
        return {"max_abs_err": ref.max_abs_error(out, lp), "max_abs_err_grad": grad_err}

    case["results"] = _run_impls(impls, lambda fn: lambda: fn(hidden, weight, inputs), check, [hidden, weight],
                                 inputs.grad_out, run, label)  # fmt: skip
    _add_derived(case)
    return case


def split_tokens(n: int) -> tuple[int, int]:
    """``N -> (B, T)``, ``B T = N``: ``T`` the largest power of two dividing ``N`` with ``T <= 1024`` and, when
    ``N >= 8``, ``B >= 8`` (a loss over one sequence would not exercise the per-sequence weights)."""
    t = 1024
    while n % t or (t > 1 and n // t < 8):
        t //= 2
    return n // t, t


def _loss_case(n: int, run: Run) -> dict[str, Any]:
    from flowloss import reference as flref

    b, t = split_tokens(n)
    call = "trajectory_balance_loss(..., old_logprobs=old) (importance weights 'sequence_clipped')"
    case: dict[str, Any] = {"op": "loss", "n": n, "b": b, "t": t, "dtype": "fp32", "device": run.device.type}
    case["call"] = call
    gen = torch.Generator().manual_seed(case_seed(run.config.seed, "loss", n))
    mask = torch.rand(b, t, generator=gen) >= run.config.mask_fraction
    lp, ref_lp = (torch.randn(b, t, generator=gen) * 0.5 - 2.0 for _ in range(2))
    old = lp + 0.05 * torch.randn(b, t, generator=gen)
    rewards, log_z = torch.randn(b, generator=gen), torch.randn(b, generator=gen)
    args64 = [x.double() for x in (lp, ref_lp, rewards, log_z)]
    lp, ref_lp, old, rewards, log_z, mask = (x.to(run.device) for x in (lp, ref_lp, old, rewards, log_z, mask))
    lp.requires_grad_(True)
    log_z.requires_grad_(True)
    expected: list[torch.Tensor] = []  # float64 loss and gradients, computed once (loops: slow)
    if n <= LOSS_REFERENCE_MAX_TOKENS:
        case["reference"] = "flowloss.reference.trajectory_balance_loss (float64 loops)"
        lp64, ref64, r64, z64 = args64
        lp64.requires_grad_(True)
        z64.requires_grad_(True)
        weights = flref.importance_weights(lp64.detach(), old.cpu().double(), mask.cpu(), mode="sequence_clipped")
        loss64 = flref.trajectory_balance_loss(lp64, ref64, r64, z64, mask.cpu(), weights=weights)
        loss64.backward()
        expected = [loss64.detach().reshape(1), ref.grad_of(lp64, "the log-probs"), ref.grad_of(z64, "log Z")]
    else:
        case["reference"] = f"not run: N > {LOSS_REFERENCE_MAX_TOKENS} (the float64 loop reference is slow)"

    def check(out: torch.Tensor) -> dict[str, Any]:
        if not expected:
            return {"max_abs_err": None, "max_abs_err_grad": None}
        grad_err = max(ref.max_abs_error(ref.grad_of(lp, "the log-probs").cpu(), expected[1]),
                       ref.max_abs_error(ref.grad_of(log_z, "log Z").cpu(), expected[2]))  # fmt: skip
        err = ref.max_abs_error(out.detach().cpu().reshape(1), expected[0])
        return {"max_abs_err": err, "max_abs_err_grad": grad_err}

    def make_call(fn: Callable) -> Callable[[], torch.Tensor]:
        return lambda: fn(lp, ref_lp, rewards, log_z, mask, old)

    grad_out = torch.ones((), device=run.device)
    case["results"] = _run_impls(impls_for("loss", run.config.impls), make_call, check, [lp, log_z], grad_out,
                                 run, f"loss N={n}")  # fmt: skip
    return case


def _relate_loss(loss_case: dict[str, Any], logprob_case: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``loss_case`` with its time as a fraction of ``logprob_case``'s best flowloss (or naive) time."""
    out = {**loss_case, "results": [dict(r) for r in loss_case["results"]]}
    ok = {r["impl"]: r for r in logprob_case["results"] if r["status"] == "ok"}
    base = next((name for name in ("flowloss-triton", "flowloss-chunked", "naive") if name in ok), None)
    out["relative_to"] = {"op": "logprobs", "v": logprob_case["v"], "dtype": logprob_case["dtype"], "impl": base}
    for r in out["results"]:
        if r["status"] == "ok" and base is not None:
            r["fraction_of_logprobs_fwdbwd"] = r["fwdbwd_ms"]["median"] / ok[base]["fwdbwd_ms"]["median"]
    return out


def run_suite(config: BenchConfig, progress: Callable[[str], None] | None = None,
              on_case: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Run every case of ``config`` (resolved first); return one dict per case (``docs/benchmarks.md``, "JSON").
    ``on_case(cases so far)`` is called after each case (the CLI rewrites its JSON there: a killed run keeps what
    it measured)."""
    config = config.resolved()
    names = impl_names()
    for name in config.impls or ():
        if name not in names:
            raise ValueError(f"--impl must be among {names}, got {name!r}")
    run = Run.start(config, progress)
    cases: list[dict[str, Any]] = []

    def add(case: dict[str, Any]) -> None:
        cases.append(case)
        if on_case is not None:
            on_case(cases)

    # an op none of whose implementations was picked with --impl is left out (the loss always has its PyTorch path)
    ops = {op for op in config.ops if impls_for(op, config.impls)}
    for n in config.n:
        loss_case = _loss_case(n, run) if "loss" in ops else None
        related = False
        for dtype_key in config.dtypes:
            for vocab in config.v:
                if "logprobs" in ops:
                    add(_logprobs_case(n, vocab, dtype_key, run))
                    if loss_case is not None:
                        add(_relate_loss(loss_case, cases[-1]))
                        related = True
                for hid in config.h if "fused_linear" in ops else ():
                    add(_fused_case(n, vocab, hid, dtype_key, run))
        if loss_case is not None and not related:
            add(loss_case)
    for dtype_key in config.step_dtypes if "step" in ops else ():
        # the models and their optimizer states must fit; on CPU also the logits paths' fp32 working set
        # (logits, their gradient and a temporary), since the kernel's OOM killer would end the whole run
        logits = config.sequences * (split_length(config.seq_len)[1] + 1) * PRESETS[config.preset]["vocab_size"]
        reason = case_skip(state_bytes(config.preset, DTYPES[dtype_key]), run.device, naive_extra=3 * 4 * logits)
        add(step.step_case(impls_for("step", config.impls), dtype_key, run, skip_reason=reason))
    return cases

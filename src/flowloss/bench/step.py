"""``--op step``: check, time and size one whole RL update per loss path (`flowloss.bench.step_paths`), against
the backbone's own share of it (the ``model`` row).

The model and the batch come from `flowloss.bench.step_model`; every path runs on the same model, batch and
optimizer, and one *step* is the path's forward and loss, backward, ``AdamW.step()``, ``zero_grad(set_to_none=
False)``. Three phases: (1) every path once from the same weights, checked against float64 and against the other
path of its objective (``COMPARED_WITH``); (2) peak memory and warm-up of each, then the timed steps in rounds of
one step per path, so that a change of the machine's load reaches every row alike; (3) on CUDA, each path's
largest batch (sequences grown at fixed ``L`` until out of memory). Figures and fields: ``docs/benchmarks.md``,
"One RL update".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from flowloss.bench import reference as ref
from flowloss.bench.config import DTYPES, ResolvedConfig, Run
from flowloss.bench.impls import Impl
from flowloss.bench.memory import is_oom, peak_extra_bytes, release, short_error
from flowloss.bench.step_model import (
    PRESETS,
    StepBatch,
    StepModels,
    build_models,
    make_batch,
    optimizer_state_bytes,
    parameter_count,
    seeded,
    tensor_bytes,
)  # fmt: skip
from flowloss.bench.step_paths import (
    COMPARED_WITH,
    GRPO_EPSILON,
    GRPO_KL_BETA,
    Path,
    StepSettings,
    grpo_loss,
    hidden_logprobs,
    model_inputs,
    model_only,
    response_hidden,
)  # fmt: skip
from flowloss.bench.timing import summarize, time_calls

MAX_FIT_TOKENS = 2**21  # the batch search never goes past this many tokens per step
FIT_BISECTIONS = 3  # after the first out-of-memory, halve the gap this many times (1/8 of the last fit)
MODEL_ROW = "model"
MODEL_SOURCE = "ref.model and policy.model forward, backward from a random gradient on the hidden states, AdamW"
CHECK_SEED = 1234  # the log-Z head's dropout mask is the same for every path in the check


def count_units(impls: list[Impl], config: ResolvedConfig) -> int:
    """Progress steps of one step case: build; the check of each row; its memory and warm-up; the rounds of
    timed steps; (CUDA, with memory) the batch searches."""
    device = torch.device(config.device)
    rows = 1 + sum(1 for i in impls if not i.skip_reason(device))
    fit = rows if device.type == "cuda" and config.measure_memory else 0
    return 1 + 2 * rows + config.step_reps + fit


def run_step(path: Path, m: StepModels, b: StepBatch, s: StepSettings) -> None:
    """One update: the path's forward and backward, AdamW step, gradients zeroed in place (kept allocated)."""
    path(m, b, s).backward()
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=False)


def forward_backward(path: Path, m: StepModels, b: StepBatch, s: StepSettings) -> None:
    """The path's forward and backward alone (what its memory is measured on)."""
    path(m, b, s).backward()


def fill_old_logprobs(m: StepModels, b: StepBatch, s: StepSettings) -> None:
    """``b.old_logprobs`` := the current policy's log-probs (no grad): what the rollout's sampler reported."""
    with torch.no_grad():
        b.old_logprobs = hidden_logprobs(m.policy, b, s)[0].float()


def float64_reference(m: StepModels, b: StepBatch, s: StepSettings) -> dict[str, torch.Tensor]:
    """float64 ``log_softmax(h W^T / T)[y]`` at the response tokens of the policy and of the reference, from their
    own last hidden states (as computed in the model's dtype) and lm_head weights; the group z-scored rewards."""
    from flowloss import reference as flref

    out = {}
    with torch.no_grad():
        for key, model in (("logprobs", m.policy), ("ref_logprobs", m.ref)):
            hidden = response_hidden(model.model(**model_inputs(b)).last_hidden_state, b)
            out[key] = ref.fused_logprobs(hidden, model.lm_head.weight, b.labels, b.response_mask,
                                          temperature=s.temperature)  # fmt: skip
    groups = [i // b.group_size for i in range(b.sequences)]
    out["r_hat"] = flref.group_normalize_rewards(b.rewards.cpu(), groups, eps=1e-6)
    return out


def reference_loss(impl: str, f64: dict[str, torch.Tensor], b: StepBatch, s: StepSettings,
                   log_z: torch.Tensor | None) -> float | None:  # fmt: skip
    """The path's loss in float64 from the float64 log-probs (and the path's own log Z), or None."""
    from flowloss import reference as flref

    lp, ref_lp, r_hat = f64["logprobs"].cpu(), f64["ref_logprobs"].cpu(), f64["r_hat"]
    mask, old = b.response_mask.cpu(), b.old_logprobs.cpu().double()
    if "grpo" in impl:
        return float(grpo_loss(lp, old, ref_lp, r_hat, mask))
    if log_z is None:
        return None
    weights = flref.importance_weights(lp, old, mask, mode="sequence_clipped")
    z = log_z.detach().cpu().double()
    return float(flref.trajectory_balance_loss(lp, ref_lp, r_hat, z, mask, beta=s.beta, weights=weights))


def largest_fit(fits: Callable[[int], bool], start: int, unit: int, limit: int,
                stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:  # fmt: skip
    """Largest number of sequences (a multiple of ``unit``, at most ``limit``) for which ``fits`` is true,
    assuming that fitting is monotone: double from ``start`` until the first failure, then bisect the last gap
    `FIT_BISECTIONS` times; no probe starts once ``stop()`` is true. Returns ``{"sequences": best or None,
    "probes": [[sequences, fits], ...], "bounded": whether the search stopped without a failure (at ``limit``, or
    stopped)}``, plus ``"stopped": True`` when ``stop`` cut it short."""
    probes: list[list[Any]] = []  # [sequences, fits]
    best: int | None = None
    bad: int | None = None
    size = start
    while size <= limit:
        if stop():
            return {"sequences": best, "probes": probes, "bounded": bad is None, "stopped": True}
        ok = fits(size)
        probes.append([size, ok])
        if not ok:
            bad = size
            break
        best, size = size, size * 2
    if best is not None and bad is not None:
        for _ in range(FIT_BISECTIONS):
            mid = (best + bad) // 2 // unit * unit
            if mid <= best or mid >= bad:
                break
            if stop():
                return {"sequences": best, "probes": probes, "bounded": False, "stopped": True}
            ok = fits(mid)
            probes.append([mid, ok])
            best, bad = (mid, bad) if ok else (best, mid)
    return {"sequences": best, "probes": probes, "bounded": bad is None}


def _reason(err: BaseException) -> str:
    return "out of memory" if is_oom(err) else short_error(err)


def search_fit(fn: Path, models: StepModels, settings: StepSettings, case: dict, device: torch.device,
               seed: int, stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:  # fmt: skip
    """`largest_fit` of whole steps of ``fn`` at ``case``'s ``L`` and ``G``, from ``case``'s ``B`` up: a batch
    fits when its step (forward, backward, AdamW) runs without an out-of-memory error. After each try, gradients
    are zeroed (an interrupted backward leaves partial sums), garbage collected and the CUDA cache emptied, so the
    next try starts from the baseline. Only out-of-memory errors count as "does not fit"; others propagate."""
    seq_len, group = case["seq_len"], case["group_size"]

    def fits(sequences: int) -> bool:
        batch: StepBatch | None = None
        try:
            batch = make_batch(sequences, group, seq_len, models.vocab_size, seed=seed + sequences, device=device)
            run_step(fn, models, batch, settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous failure surfaces here, inside the try
            return True
        except Exception as err:
            if not is_oom(err):
                raise
            return False
        finally:
            batch = None
            models.optimizer.zero_grad(set_to_none=False)
            release(device)

    limit = max(case["sequences"], MAX_FIT_TOKENS // seq_len // group * group)
    found = largest_fit(fits, case["sequences"], group, limit, stop)
    best = found["sequences"]
    return {**found, "tokens": None if best is None else best * seq_len, "seq_len": seq_len}


def _grad_rel_diff(m: StepModels, snapshot: list[torch.Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over every policy parameter, in float32."""
    num = den = 0.0
    for p, g_ref in zip(m.policy.parameters(), snapshot):
        num += float((ref.grad_of(p, "a policy parameter").float() - g_ref.float()).pow(2).sum())
        den += float(g_ref.float().pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def _baseline(m: StepModels, b: StepBatch, device: torch.device) -> dict[str, Any]:
    policy, head = list(m.policy.parameters()), list(m.head.parameters())
    parts: dict[str, Any] = {
        "policy_weights_bytes": tensor_bytes(policy),
        "policy_grad_bytes": tensor_bytes(p.grad for p in policy if p.grad is not None),
        "optimizer_state_bytes": optimizer_state_bytes(m.optimizer),
        "ref_weights_bytes": tensor_bytes(m.ref.parameters()),
        "logz_head_bytes": tensor_bytes(head) + tensor_bytes(p.grad for p in head if p.grad is not None),
        "batch_bytes": b.nbytes(),
    }
    parts["total_bytes"] = sum(parts.values())
    parts["measured_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    parts["what"] = (
        "allocated when a step starts: policy weights and gradients (kept allocated: zero_grad(set_to_none=False)),"
        " AdamW exp_avg and exp_avg_sq, frozen reference weights, log-Z head (weights, gradients; its AdamW states"
        " are in optimizer_state_bytes), the batch; the peak column is the step's maximum above this"
    )
    return parts


def _case_header(preset: str, dtype_key: str, c: ResolvedConfig, settings: StepSettings) -> dict[str, Any]:
    shape = PRESETS[preset]
    model = {"architecture": "transformers Qwen2ForCausalLM, random weights", "parameters": parameter_count(preset)}
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):  # fmt: skip
        model[key] = shape[key]
    return {
        "op": "step", "preset": preset, "model": model, "dtype": dtype_key, "device": c.device,
        "sequences": c.sequences, "group_size": c.group_size, "prompts": c.sequences // c.group_size,
        "seq_len": c.seq_len, "temperature": c.temperature, "flowrl_beta": settings.beta,
        "grpo": {"epsilon": GRPO_EPSILON, "kl_beta": GRPO_KL_BETA, "loss_type": "grpo"},
        "optimizer": "torch.optim.AdamW(lr=1e-6), policy and log-Z head",
        "token": "one position of the padded [B, L] batch (valid_tokens: the non-padding ones)",
        "reference": (
            "float64 log_softmax(h W^T / T)[y] from each model's own last hidden states and lm_head weight; losses"
            " from those log-probs: flowloss.reference.trajectory_balance_loss (with the path's log Z) or GRPO"
        ),
    }  # fmt: skip


def _check(name: str, fn: Path, models: StepModels, batch: StepBatch, settings: StepSettings, f64, record: dict,
           results: dict, snapshots: dict) -> None:  # fmt: skip
    """Phase 1 for one path: one forward + backward from the initial weights, no optimizer step."""
    models.optimizer.zero_grad(set_to_none=False)
    with seeded(CHECK_SEED, batch.input_ids.device):
        out = fn(models, batch, settings)
    out.backward()
    if out.loss is None:
        raise ValueError(f"step path {name} returned no loss")
    record["loss"] = float(out.loss.detach())
    expected = reference_loss(name, f64, batch, settings, out.log_z)
    record["max_abs_err_loss"] = None if expected is None else abs(record["loss"] - expected)
    record["max_abs_err_logprobs"] = None
    if out.logprobs is not None:
        diff = (out.logprobs.detach().double() - f64["logprobs"]).abs()
        record["max_abs_err_logprobs"] = float(torch.where(batch.response_mask, diff, 0).max())
    if name in COMPARED_WITH.values():
        snapshots[name] = [ref.grad_of(p, "a policy parameter").detach().clone() for p in models.policy.parameters()]
    other = COMPARED_WITH.get(name)
    if other in snapshots:
        record["compared_with"] = other
        record["loss_diff"] = abs(record["loss"] - results[other]["loss"])
        record["grad_rel_diff"] = _grad_rel_diff(models, snapshots[other])


def step_case(impls: list, dtype_key: str, run: Run, *, skip_reason: str | None = None) -> dict[str, Any]:
    """Build the model and batch, check every path against float64 and each other, then time and size each step.
    ``impls``: the `flowloss.bench.impls.Impl` entries of op ``step`` to run (the ``model`` row always runs);
    ``skip_reason``: why the case cannot run here (every row is listed as skipped with it)."""
    c, device = run.config, run.device
    settings = StepSettings(temperature=c.temperature)
    case = _case_header(c.preset, dtype_key, c, settings)
    label = f"step {c.preset} {dtype_key}"
    run.progress(f"{label}: build model and batch")
    batch = make_batch(c.sequences, c.group_size, c.seq_len, PRESETS[c.preset]["vocab_size"], seed=c.seed,
                       device=device)  # fmt: skip
    case.update(prompt_len=batch.prompt_len, response_len=batch.response_len, **batch.counts())

    def skip_all(status: str, reason: str) -> dict[str, Any]:
        rows = [(MODEL_ROW, MODEL_SOURCE)] + [(i.name, i.source) for i in impls]
        case["results"] = [{"impl": n, "source": src, "status": status, "reason": reason} for n, src in rows]
        return case

    if reason := skip_reason or run.out_of_time():
        return skip_all("skipped", reason)
    try:
        models = build_models(c.preset, DTYPES[dtype_key], device, seed=c.seed)
        fill_old_logprobs(models, batch, settings)
        f64 = float64_reference(models, batch, settings)
    except Exception as err:
        if _reason(err) != "out of memory":
            raise
        release(device)
        return skip_all("error", "out of memory while building the models and the float64 reference")

    results: dict[str, dict[str, Any]] = {MODEL_ROW: {"impl": MODEL_ROW, "source": MODEL_SOURCE, "status": "ok",
                                                      "reason": ""}}  # fmt: skip
    built: dict[str, Path] = {MODEL_ROW: model_only}
    snapshots: dict[str, list[torch.Tensor]] = {}

    def fail(name: str, err: BaseException) -> None:
        results[name] = {**results[name], "status": "error", "reason": _reason(err)}
        built.pop(name, None)

    # 1. every path once from the same weights: loss, log-probs and gradients, no optimizer step
    run.progress(f"{label}: {MODEL_ROW}")
    for impl in impls:
        if reason := impl.skip_reason(device):
            results[impl.name] = {"impl": impl.name, "source": impl.source, "status": "skipped", "reason": reason}
            continue
        run.progress(f"{label}: {impl.name}")
        record = results[impl.name] = {"impl": impl.name, "source": impl.source, "status": "ok", "reason": ""}
        try:
            fn = built[impl.name] = impl.build(device)
            if note := getattr(fn, "note", ""):
                record["note"] = note
            _check(impl.name, fn, models, batch, settings, f64, record, results, snapshots)
        except Exception as err:
            fail(impl.name, err)
        finally:
            models.optimizer.zero_grad(set_to_none=False)
            release(device)
    snapshots.clear()
    del f64
    case["memory_baseline"] = _baseline(models, batch, device)
    if c.measure_memory:  # what the AdamW step alone adds (foreach temporaries), the same for every path
        case["optimizer_peak_bytes"], _ = peak_extra_bytes(models.optimizer.step, device=device)
        models.optimizer.zero_grad(set_to_none=False)

    # 2. size each step (forward + backward, where the paths differ; the whole step's peak is the larger of that
    #    and the AdamW step's), warm each up, then time them in rounds of one step per path
    for name, fn in list(built.items()):
        run.progress(f"{label}: {name} (memory, warm-up)")
        record = results[name]
        try:
            if c.measure_memory:
                record["peak_mem_fwdbwd_bytes"], record["memory_method"] = peak_extra_bytes(
                    partial(forward_backward, fn, models, batch, settings), device=device)  # fmt: skip
                if record["peak_mem_fwdbwd_bytes"] is not None and case.get("optimizer_peak_bytes") is not None:
                    record["peak_mem_bytes"] = max(record["peak_mem_fwdbwd_bytes"], case["optimizer_peak_bytes"])
                models.optimizer.zero_grad(set_to_none=False)
            for _ in range(c.step_warmup):
                run_step(fn, models, batch, settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as err:
            fail(name, err)
        finally:
            models.optimizer.zero_grad(set_to_none=False)
            release(device)
    samples: dict[str, list[float]] = {name: [] for name in built}
    for rep in range(c.step_reps):
        run.progress(f"{label}: timed steps, round {rep + 1} of {c.step_reps}")
        for name, fn in list(built.items()):
            try:
                samples[name].append(time_calls(partial(run_step, fn, models, batch, settings), device=device,
                                                warmup=0, reps=1).median)  # fmt: skip
            except Exception as err:
                fail(name, err)
                models.optimizer.zero_grad(set_to_none=False)
                release(device)
    for name in built:
        record = results[name]
        record["step_ms"] = summarize(samples[name]).as_dict()
        record["tokens_per_s"] = batch.tokens / (record["step_ms"]["median"] * 1e-3)
        record["valid_tokens_per_s"] = case["valid_tokens"] / (record["step_ms"]["median"] * 1e-3)

    # 3. CUDA: the largest batch each path fits
    for name, fn in built.items():
        record = results[name]
        reason = "CUDA only" if device.type != "cuda" else "--no-memory" if not c.measure_memory else run.out_of_time()
        if reason:
            record["max_fit"], record["max_fit_reason"] = None, reason
            continue
        run.progress(f"{label}: {name} (largest batch)")
        try:
            record["max_fit"] = search_fit(fn, models, settings, case, device, c.seed,
                                           stop=lambda: run.out_of_time() is not None)  # fmt: skip
        except Exception as err:  # anything but out-of-memory: say so, keep the row's other figures
            record["max_fit"], record["max_fit_reason"] = None, f"search failed: {_reason(err)}"
        finally:
            models.optimizer.zero_grad(set_to_none=False)
            release(device)

    case["results"] = [results[MODEL_ROW]] + [results[i.name] for i in impls if i.name in results]
    model_ms = results[MODEL_ROW].get("step_ms", {}).get("median")
    for r in case["results"][1:]:
        if r["status"] == "ok" and "step_ms" in r and model_ms is not None:
            r["loss_path_ms"] = r["step_ms"]["median"] - model_ms
            r["loss_path_fraction"] = r["loss_path_ms"] / r["step_ms"]["median"]
    return case

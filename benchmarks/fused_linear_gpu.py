"""Fused lm_head + per-token log-prob: the Triton launchers against naive, Liger and Cut Cross-Entropy.

For each shape (N tokens, H hidden, V vocabulary, bf16, temperature T, a fraction of rows ignored, random upstream
gradient g per kept token) and each implementation it records:

- forward and forward+backward time (``triton.testing.do_bench``: median and 20/80 % quantiles, ms);
- useful throughput ``6 N_kept H V / t`` (forward 2 + input gradients 4; our kernels do 8-10 N H V: recomputes);
- peak extra memory of one forward+backward (``torch.cuda.max_memory_allocated`` above what was allocated before),
  in MiB and as a multiple of the ``dW + dH`` bytes;
- max |error| against float64 of the log-probs and dH on every ``check_stride``-th row and of dW on every
  ``check_stride``-th vocabulary column (float64 computed in row chunks on the GPU, once per shape).

Implementations (skipped with a reason when not installed): ``naive`` (bf16 ``h @ W^T``, fp32 log-softmax,
gather, autograd), ``liger`` (``liger_fused_linear_cross_entropy(h / T, W, y, reduction="none")``), ``cce``
(``cut_cross_entropy.linear_cross_entropy(h / T, W, y, reduction="none")``, its default gradient filter),
``flowloss`` (``flowloss.kernels.linear_logprob_forward`` / ``_backward``, exact, default scratch budget: two
recomputes), ``flowloss-onepass`` (scratch budget raised so the fp32 ``[N, H]`` dH buffer fits: one recompute),
``flowloss-filter`` (exact plan plus ``filter_eps = 2^-10``). Our launchers get ``order`` (a stable argsort of
the skip flags, built inside the timed call, as the autograd layer will). Liger and CCE see ``h / T``
(``(h / T) W^T = (h W^T) / T``); the division is inside the timed call.

Writes ``<out>.csv`` (one row per shape x implementation), ``<out>.json`` (the same plus the environment) and
``<out>.md`` (a table). Stops starting new measurements once ``--time-budget`` seconds have passed (what is done is
written). ``--device cpu`` (with ``TRITON_INTERPRET=1`` for the flowloss kernels) runs the same code at tiny shapes
with a wall-clock timer and no memory figures: a smoke test of the script, not a benchmark.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("naive", "liger", "cce", "flowloss", "flowloss-onepass", "flowloss-filter")
FILTER_EPS = 2.0**-10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[16384, 4096], help="tokens N (default 16384 4096)")
    p.add_argument(
        "--v", type=int, nargs="+", default=[151936, 32000, 262144], help="vocabulary sizes V (headline first)"
    )
    p.add_argument("--h", type=int, default=4096, help="hidden size H (default 4096)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--mask-fraction", type=float, default=0.2, help="fraction of rows ignored (label -100)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--check-stride", type=int, default=97, help="error check on every k-th row / column")
    p.add_argument("--warmup-ms", type=float, default=100.0, help="do_bench warm-up per measurement")
    p.add_argument("--rep-ms", type=float, default=500.0, help="do_bench measuring time per measurement")
    p.add_argument("--time-budget", type=float, default=330.0, help="seconds; no new measurement starts after")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (TRITON_INTERPRET=1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/fused-linear", help="output path prefix")
    args = p.parse_args(argv)
    if not 0.0 <= args.mask_fraction < 1.0:
        p.error("--mask-fraction must be in [0, 1)")
    if args.temperature <= 0 or not math.isfinite(args.temperature):
        p.error("--temperature must be a finite number > 0")
    return args


@dataclass
class Shape:
    n: int
    v: int
    h: int
    dtype: torch.dtype
    temperature: float
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor  # -100 at ignored rows
    keep: torch.Tensor  # bool [N]
    g: torch.Tensor  # fp32 [N], 0 at ignored rows

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


def make_shape(n: int, v: int, h: int, dtype: torch.dtype, args, device: torch.device) -> Shape:
    """Hidden states ~ N(0, 1), W ~ N(0, 4 / H): logits with standard deviation 2 (flowloss bench's inputs)."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=device) * (2.0 / math.sqrt(h))).to(dtype)
    keep = torch.rand(n, generator=gen, device=device) >= args.mask_fraction
    labels = torch.where(keep, torch.randint(0, v, (n,), generator=gen, device=device), -100)
    g = torch.randn(n, generator=gen, device=device) * keep
    return Shape(n, v, h, dtype, args.temperature, hidden, weight, labels, keep, g)


# --- implementations: fwd(shape) -> logp [N]; fwd_bwd(shape) -> (dH [N, H], dW [V, H]) ---


@dataclass
class Impl:
    name: str
    fwd: Callable[[Shape], torch.Tensor]
    fwd_bwd: Callable[[Shape], tuple[torch.Tensor, torch.Tensor]]
    note: str = ""


def _autograd_impl(name: str, logp_fn: Callable, note: str = "") -> Impl:
    def fwd(s: Shape) -> torch.Tensor:
        with torch.no_grad():
            return logp_fn(s, s.hidden, s.weight)

    def fwd_bwd(s: Shape):
        h = s.hidden.detach().requires_grad_(True)
        w = s.weight.detach().requires_grad_(True)
        return torch.autograd.grad(logp_fn(s, h, w), (h, w), s.g)

    return Impl(name, fwd, fwd_bwd, note)


def _naive(s: Shape, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax((h @ w.T).float() / s.temperature, dim=-1)
    return torch.where(s.keep, logp.gather(1, s.labels.clamp_min(0)[:, None])[:, 0], 0.0)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _liger(s: Shape, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(h / s.temperature, w, s.labels, ignore_index=-100, reduction="none")
    return torch.where(s.keep, -_first(loss).float(), 0.0)


def _cce(s: Shape, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(h / s.temperature, w, s.labels, ignore_index=-100, reduction="none")
    return torch.where(s.keep, -loss.float(), 0.0)


def _flowloss_impl(name: str, **backward_kwargs) -> Impl:
    from flowloss.kernels import linear_logprob_backward, linear_logprob_forward

    def order_of(s: Shape) -> torch.Tensor:
        return torch.argsort((~s.keep).to(torch.int8), stable=True)

    def fwd(s: Shape) -> torch.Tensor:
        order = order_of(s)
        return linear_logprob_forward(s.hidden, s.weight, None, s.labels, temperature=s.temperature, order=order)[0]

    def fwd_bwd(s: Shape):
        order = order_of(s)
        _, lse2, _ = linear_logprob_forward(s.hidden, s.weight, None, s.labels, temperature=s.temperature, order=order)
        kwargs = {k: (v(s) if callable(v) else v) for k, v in backward_kwargs.items()}
        dh, dw, _ = linear_logprob_backward(
            s.hidden, s.weight, None, s.labels, lse2, s.g, temperature=s.temperature, order=order, need_bias=False,
            **kwargs,
        )  # fmt: skip
        return dh, dw

    note = ", ".join(f"{k}={'per shape' if callable(v) else v}" for k, v in backward_kwargs.items())
    return Impl(name, fwd, fwd_bwd, note)


def build_impls(names: list[str], device: torch.device) -> tuple[list[Impl], dict[str, str]]:
    """The implementations that can run here, and the reason for each one that cannot."""
    impls, skipped = [], {}
    for name in names:
        if name == "naive":
            impls.append(_autograd_impl(name, _naive, "bf16 matmul, fp32 log_softmax, gather"))
        elif name in ("liger", "cce"):
            module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[name]
            if importlib.util.find_spec(module) is None:
                skipped[name] = f"{module} not installed"
            elif device.type != "cuda":
                skipped[name] = "needs CUDA"
            else:
                impls.append(_autograd_impl(name, _liger if name == "liger" else _cce, "h / T; reduction='none'"))
        elif name.startswith("flowloss"):
            if importlib.util.find_spec("triton") is None:
                skipped[name] = "triton not installed"
            elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                skipped[name] = "Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
            elif name == "flowloss":
                impls.append(_flowloss_impl(name))
            elif name == "flowloss-onepass":  # room for the fp32 [N, H] dH buffer: one recompute
                impls.append(_flowloss_impl(name, max_scratch_bytes=lambda s: 4 * s.n * s.h + 512 * 2**20))
            else:
                impls.append(_flowloss_impl(name, filter_eps=FILTER_EPS))
    return impls, skipped


# --- float64 reference on a subset ---


@dataclass
class Reference:
    rows: torch.Tensor
    cols: torch.Tensor
    logp: torch.Tensor  # [rows]
    d_hidden: torch.Tensor  # [rows, H]
    d_weight: torch.Tensor  # [cols, H]


def reference(s: Shape, stride: int, chunk: int = 1024) -> Reference:
    """float64 log-probs and dH on every ``stride``-th row, dW on every ``stride``-th column (all rows summed)."""
    dev = s.hidden.device
    rows = torch.arange(0, s.n, stride, device=dev)
    cols = torch.arange(0, s.v, stride, device=dev)
    w = s.weight.double()
    logp = torch.empty(len(rows), dtype=torch.float64, device=dev)
    d_hidden = torch.empty(len(rows), s.h, dtype=torch.float64, device=dev)
    d_weight = torch.zeros(len(cols), s.h, dtype=torch.float64, device=dev)
    for lo in range(0, s.n, chunk):
        h = s.hidden[lo : lo + chunk].double()
        log_p = torch.log_softmax(h @ w.T / s.temperature, dim=1)
        keep, y = s.keep[lo : lo + chunk], s.labels[lo : lo + chunk].clamp_min(0)
        g = s.g[lo : lo + chunk].double() * keep
        dz = -log_p.exp() * g[:, None]
        dz.scatter_add_(1, y[:, None], g[:, None])
        dz /= s.temperature
        d_weight += dz[:, cols].T @ h
        pick = rows[(rows >= lo) & (rows < lo + chunk)]
        where = torch.searchsorted(rows, pick)
        logp[where] = torch.where(keep[pick - lo], log_p[pick - lo].gather(1, y[pick - lo, None])[:, 0], 0.0)
        d_hidden[where] = dz[pick - lo] @ w
    return Reference(rows, cols, logp, d_hidden, d_weight)


# --- measurement ---


def _timer(device: torch.device, args) -> Callable[[Callable], tuple[float, float, float]]:
    if device.type == "cuda":
        from triton.testing import do_bench

        def bench(fn):
            return tuple(do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8]))

        return bench

    def wall(fn):  # CPU smoke test: a few wall-clock runs
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), max(times)

    return wall


@dataclass
class Row:
    n: int
    v: int
    h: int
    dtype: str
    impl: str
    n_kept: int = 0
    fwd_ms: float | None = None
    fwd_ms_q20: float | None = None
    fwd_ms_q80: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_ms_q20: float | None = None
    fwd_bwd_ms_q80: float | None = None
    tflops_6nhv: float | None = None
    peak_extra_mib: float | None = None
    peak_over_grads: float | None = None
    err_logp: float | None = None
    err_dh: float | None = None
    err_dw: float | None = None
    status: str = "ok"
    note: str = field(default="")


def measure(impl: Impl, s: Shape, ref: Reference, bench, device: torch.device) -> Row:
    row = Row(s.n, s.v, s.h, str(s.dtype).replace("torch.", ""), impl.name, s.n_kept, note=impl.note)
    if device.type == "cuda":
        torch.cuda.synchronize()
        impl.fwd_bwd(s)  # warm-up (compiles, autotunes) outside the memory measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        dh, dw = impl.fwd_bwd(s)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = dh.numel() * dh.element_size() + dw.numel() * dw.element_size()
        row.peak_extra_mib, row.peak_over_grads = peak / 2**20, peak / grads
    else:
        dh, dw = impl.fwd_bwd(s)
    logp = impl.fwd(s)
    row.err_logp = (logp[ref.rows].double() - ref.logp).abs().max().item()
    row.err_dh = (dh[ref.rows].double() - ref.d_hidden).abs().max().item()
    row.err_dw = (dw[ref.cols].double() - ref.d_weight).abs().max().item()
    del dh, dw, logp
    row.fwd_ms, row.fwd_ms_q20, row.fwd_ms_q80 = bench(lambda: impl.fwd(s))
    row.fwd_bwd_ms, row.fwd_bwd_ms_q20, row.fwd_bwd_ms_q80 = bench(lambda: impl.fwd_bwd(s))
    row.tflops_6nhv = 6 * s.n_kept * s.h * s.v / (row.fwd_bwd_ms * 1e-3) / 1e12
    return row


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    for module in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            env[module] = importlib.import_module(module).__version__
        except Exception:  # not installed, or no __version__
            env[module] = None
    return env


def write(rows: list[Row], skipped: dict[str, str], env: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    records = [asdict(r) for r in rows]
    with open(out + ".json", "w") as f:
        json.dump({"environment": env, "skipped": skipped, "rows": records}, f, indent=1)
    with open(out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(Row(0, 0, 0, "", "")).keys()))
        writer.writeheader()
        writer.writerows(records)

    def fmt(x, spec=".3g"):
        return "" if x is None else format(x, spec)

    lines = [
        f"fused lm_head + log-prob, {env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}",
        "",
        "| N | V | impl | fwd ms | fwd+bwd ms | TFLOP/s (6 N_kept H V) | peak extra MiB (x dW+dH) "
        "| err logp / dH / dW | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.n} | {r.v} | {r.impl} | {fmt(r.fwd_ms)} | {fmt(r.fwd_bwd_ms)} | {fmt(r.tflops_6nhv)} | "
            f"{fmt(r.peak_extra_mib, '.0f')} ({fmt(r.peak_over_grads, '.2f')}) | "
            f"{fmt(r.err_logp, '.1e')} / {fmt(r.err_dh, '.1e')} / {fmt(r.err_dw, '.1e')} | {r.status} |"
        )
    lines += [""] + [f"- {k} skipped: {v}" for k, v in skipped.items()]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    impls, skipped = build_impls(args.impls, device)
    bench = _timer(device, args)
    env = environment(device)
    rows: list[Row] = []
    for n in args.n:
        for v in args.v:
            if time.monotonic() - start > args.time_budget:
                rows += [Row(n, v, args.h, args.dtype, i.name, status="not run: time budget") for i in impls]
                continue
            s = make_shape(n, v, args.h, dtype, args, device)
            ref = reference(s, args.check_stride)
            for impl in impls:
                if time.monotonic() - start > args.time_budget:
                    rows.append(Row(n, v, args.h, args.dtype, impl.name, status="not run: time budget"))
                    continue
                try:
                    rows.append(measure(impl, s, ref, bench, device))
                except torch.cuda.OutOfMemoryError as err:  # naive at the largest V may not fit
                    rows.append(Row(n, v, args.h, args.dtype, impl.name, status=f"OOM: {str(err)[:80]}"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                last = rows[-1]
                print(
                    f"N={n} V={v} {impl.name:17s} fwd {last.fwd_ms} ms, fwd+bwd {last.fwd_bwd_ms} ms, "
                    f"peak x{last.peak_over_grads}, err {last.err_logp}/{last.err_dh}/{last.err_dw} {last.status}",
                    flush=True,
                )
            del s, ref
            write(rows, skipped, env, args.out)  # after each shape: a killed run keeps what it measured
    write(rows, skipped, env, args.out)
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    print(f"wrote {args.out}.csv/.json/.md in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

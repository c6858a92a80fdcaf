"""Peak RSS of a log-prob op's first call, each case in a fresh process (the protocol of issue 22), on CPU.

    python benchmarks/first_call_rss.py [--n 1024] [--v 151936] [--reps 5]

Per case (``naive``: ``log_softmax(x.float()).gather``; ``flowloss``: ``flowloss.token_logprobs``; forward under
``no_grad`` and forward + backward with a random upstream gradient), a new interpreter builds the fp32 logits ``[N,
V]`` and labels, imports and warms nothing else, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs
the op once and reads ``VmHWM - VmRSS before`` (the first call's extra resident memory, one-time costs such as
thread pools and code pages included; ``--warm-small`` pays those on a 2 x 64 call first), then times ``--reps``
more calls (median). Process RSS, not tensor bytes: ``flowloss bench`` reports the tensor allocator's view. Linux
only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASE = r"""
import json, sys, time
import torch
n, v, reps, impl, backward = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
warm_small = sys.argv[6] == "1"
import flowloss

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def make(n, v):
    torch.manual_seed(0)
    return torch.randn(n, v).requires_grad_(backward), torch.randint(0, v, (n,)), torch.randn(n)

def call():
    if impl == "naive":
        out = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    else:
        out = flowloss.token_logprobs(logits, labels)
    if backward:
        (g,) = torch.autograd.grad(out, logits, grad)
        return g
    return out

context = torch.enable_grad() if backward else torch.no_grad()
if warm_small:  # one call on 2 x 64 logits first: code pages, thread pools and lazy init are paid before
    logits, labels, grad = make(2, 64)
    with context:
        call()
logits, labels, grad = make(n, v)
with context:
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    result = call()
    peak = kib("VmHWM") - before
    del result
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
print(json.dumps({"peak_mib": peak / 1024, "times_s": times}))
"""


def run_case(n: int, v: int, reps: int, impl: str, backward: bool, warm_small: bool) -> dict:
    flags = ["1" if backward else "0", "1" if warm_small else "0"]
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(n), str(v), str(reps), impl, *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--warm-small",
        action="store_true",
        help="run each op once on 2 x 64 logits before the measured call (one-time costs left out)",
    )
    args = parser.parse_args()
    logits_mib = args.n * args.v * 4 / 2**20
    warm = ", after a 2 x 64 warm-up call" if args.warm_small else ""
    print(f"N={args.n} V={args.v} fp32 CPU, logits {logits_mib:,.0f} MiB, median of {args.reps} warm calls{warm}")
    for backward in (False, True):
        rows = {
            impl: run_case(args.n, args.v, args.reps, impl, backward, args.warm_small) for impl in ("naive", "flowloss")
        }
        naive_ms = statistics.median(rows["naive"]["times_s"]) * 1e3
        label = "fwd+bwd" if backward else "fwd"
        for impl, row in rows.items():
            ms = statistics.median(row["times_s"]) * 1e3
            print(
                f"  {label:8s} {impl:9s} {ms:8.1f} ms  {naive_ms / ms:5.2f}x naive  "
                f"first-call peak RSS {row['peak_mib']:8.1f} MiB ({row['peak_mib'] / logits_mib:.2f}x logits, "
                f"{row['peak_mib'] / max(rows['naive']['peak_mib'], 1e-9):.0%} of naive)"
            )


if __name__ == "__main__":
    main()

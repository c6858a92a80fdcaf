"""Memory and time of verl's log-prob passes with each ``actor_rollout_ref.flowrl.logprobs`` setting, on CPU.

Run from the repository root (not collected by pytest)::

    .venv-verl/bin/python tests/adapters/verl/logprobs_memory.py [--vocab 151936 --tokens 1024 --json out.json]

Each (setting, pass, temperature) runs in a fresh process that builds verl's real FSDP2 engine (the tests'
harness: verl_engines.py, conftest.py's CPU platform) on a Qwen2 of one layer, hidden size 64 and Qwen2's
vocabulary, runs the pass once to warm up, then once measured: the process's peak resident memory during the
pass above its resident memory right before it (Linux ``VmHWM`` after resetting it), and its CPU time (all
threads; less sensitive than wall time to other processes on a shared machine) and wall time. The
passes are verl's three: the old policy's log-probs with entropy (no grad), the reference's log-probs (no grad)
and the training step (forward and backward of FlowRL's loss, log-Z head included; gradients allocated in it).
All sequences of the batch form one micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASSES = ("old_logprobs_entropy", "ref_logprobs", "train_step")
PATHS = ("framework", "logits", "hidden")


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    import conftest  # noqa: F401  (verl's CPU platform, before verl's workers are imported)
    import torch
    from tensordict import TensorDict
    from test_verl_loss import _actor_config
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding
    from verl_engines import build_engine

    import flowloss
    from flowloss.adapters import verl as fv

    torch.manual_seed(0)
    flowrl = fv.FlowRLConfig(logprobs=args.path, log_z_dropout=0.0)
    engine = build_engine(Path(args.model_dir), flowrl, forward_only=False)
    b, p = args.sequences, args.prompt
    r = args.tokens // b - p

    def batch():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (b, p + r), generator=g)
        response_mask = torch.ones(b, r, dtype=torch.long)
        attention = torch.ones(b, p + r, dtype=torch.long)
        adv = flowloss.group_normalize_rewards(torch.randn(b, generator=g), torch.arange(b) // 4)
        data = {"prompts": ids[:, :p], "responses": ids[:, p:], "input_ids": ids, "attention_mask": attention,
                "position_ids": torch.arange(p + r).expand(b, -1).clone(), "response_mask": response_mask,
                "old_log_probs": -torch.rand(b, r, generator=g), "ref_log_prob": -torch.rand(b, r, generator=g),
                "advantages": adv.unsqueeze(1).expand(b, r).clone()}
        td = left_right_2_no_padding(TensorDict(data, batch_size=[b]))
        tu.assign_non_tensor(td, use_remove_padding=True, use_dynamic_bsz=False, micro_batch_size_per_gpu=b,
                             temperature=args.temperature, calculate_entropy=args.pass_ == "old_logprobs_entropy",
                             global_batch_size=b, use_fused_kernels=False)
        return td

    loss_fn = fv.make_flowrl_loss_fn(_actor_config(strategy="fsdp2"), flowrl)

    def run():
        if args.pass_ == "train_step":
            engine.optimizer_zero_grad()
            engine.forward_backward_batch(batch(), loss_fn)
        else:
            engine.infer_batch(batch())

    run()  # warm-up
    engine.optimizer_zero_grad()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
    before = _rss_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _rss_kib("VmHWM")
    return {"path": args.path, "pass": args.pass_, "temperature": args.temperature, "tokens": b * (p + r),
            "vocab": args.vocab, "peak_above_mib": round((peak - before) / 1024, 1), "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "resolved": engine._flowrl_logprobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the micro-batch (prompt + response)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--pass", dest="pass_", help=argparse.SUPPRESS)
    parser.add_argument("--temperature", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from verl_engines import save_tiny_qwen2_sized

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_qwen2_sized(Path(tmp) / "model", vocab=args.vocab, hidden=64, layers=1)
        for temperature in args.temperatures:
            for pass_ in PASSES:
                for path in args.paths:
                    cmd = [sys.executable, __file__, "--child", "--path", path, "--pass", pass_, "--temperature",
                           str(temperature), "--model-dir", str(model_dir), "--vocab", str(args.vocab),
                           "--tokens", str(args.tokens), "--sequences", str(args.sequences), "--prompt",
                           str(args.prompt)]
                    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        raise SystemExit(f"{path} {pass_} failed:\n{done.stderr[-3000:]}")
                    rows.append(json.loads(line[len("RESULT "):]))
                    row = rows[-1]
                    print(f"T={temperature:<4} {pass_:<22} {path:<10} peak +{row['peak_above_mib']:>8.1f} MiB "
                          f"{row['cpu_seconds']:>7.2f} s CPU {row['seconds']:>7.2f} s wall", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(), "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

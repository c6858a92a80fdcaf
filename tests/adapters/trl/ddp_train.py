"""Train the tiny FlowRL example on one or several processes (``torchrun``, gloo, CPU); write what each rank saw.

``python -m torch.distributed.run --nproc_per_node W tests/adapters/trl/ddp_train.py POLICY_DIR OUT_DIR PER_DEVICE
[LOGPROBS]``

Used by ``test_trl_ddp.py``: two processes with ``PER_DEVICE = B / 2`` must log the same losses and end with the
same weights as one process with ``PER_DEVICE = B`` (the same global batch); ``LOGPROBS`` is ``flowrl_logprobs``
(the test runs the two ranks with ``"hidden"`` against one process with ``"framework"``). Sampling is replaced by
a deterministic function of the prompt and of the completion's index in its group, so that both runs train on
the same completions; everything else (rewards, TRL's batching, the gathers, FlowRL's normalizer, DDP's gradient
all-reduce, the optimizer) is the real code. At exit each rank records whether the process group was destroyed
before the interpreter finalized (FlowRLTrainer's exit hook; the script does not destroy it).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

import trl_flowrl as example

from flowloss.adapters.trl import FlowRLTrainer
from tests.adapters.trl.helpers import with_deterministic_sampling


def _record_exit_state(out_dir: str) -> None:
    rank = os.environ.get("RANK", "0")
    Path(out_dir, f"exit-rank{rank}.txt").write_text("initialized" if dist.is_initialized() else "destroyed")


DeterministicFlowRLTrainer = with_deterministic_sampling(FlowRLTrainer)


def main(policy_dir: str, out_dir: str, per_device: int, logprobs: str) -> None:
    # Registered first, so it runs last at exit: was the process group destroyed before the interpreter went?
    atexit.register(_record_exit_state, out_dir)
    args = example.make_config(
        os.path.join(out_dir, "run"), max_steps=3, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=2, optim="sgd", learning_rate=0.05, flowrl_log_z_dropout=0.0,
        max_grad_norm=1.0, flowrl_logprobs=logprobs,
    )
    trainer = DeterministicFlowRLTrainer(
        model=policy_dir, reward_funcs=example.reward_distinct_chars, args=args,
        train_dataset=example.Dataset.from_dict({"prompt": example.PROMPTS}),
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    logs = [{k: v for k, v in r.items() if k in ("loss", "grad_norm", "reward", "flowrl/log_z_mean")}
            for r in trainer.state.log_history if "loss" in r]
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"weights-rank{rank}.pt"))
    Path(out_dir, f"logs-rank{rank}.json").write_text(json.dumps(logs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "auto")

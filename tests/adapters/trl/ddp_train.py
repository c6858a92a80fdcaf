"""Train the tiny FlowRL example on one or several processes (``torchrun``, gloo, CPU); write what each rank saw.

``python -m torch.distributed.run --nproc_per_node W tests/adapters/trl/ddp_train.py POLICY_DIR OUT_DIR PER_DEVICE``

Used by ``test_trl_ddp.py``: two processes with ``PER_DEVICE = B / 2`` must log the same losses and end with the
same weights as one process with ``PER_DEVICE = B`` (the same global batch). Sampling is replaced by a
deterministic function of the prompt and of the completion's index in its group, so that both runs train on
the same completions; everything else (rewards, TRL's batching, the gathers, FlowRL's normalizer, DDP's
gradient all-reduce, the optimizer) is the real code. At exit each rank records whether the process group was
destroyed before the interpreter finalized (FlowRLTrainer's exit hook; the script does not destroy it).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

import trl_flowrl as example

from flowloss.adapters.trl import FlowRLTrainer


def _record_exit_state(out_dir: str) -> None:
    rank = os.environ.get("RANK", "0")
    Path(out_dir, f"exit-rank{rank}.txt").write_text("initialized" if dist.is_initialized() else "destroyed")


class DeterministicFlowRLTrainer(FlowRLTrainer):
    """Completions as a function of (prompt, index in its group): identical however the batch is split."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen: Counter = Counter()
        completions = []
        vocab = self.processing_class.vocab_size
        for ids in prompt_ids:
            k = seen[tuple(ids)]
            seen[tuple(ids)] += 1
            base = sum(ids) * 31 + k * 17
            length = 2 + (base % 6)
            tokens = [3 + (base + 7 * j) % (vocab - 3) for j in range(length)]
            completions.append([*tokens, self.processing_class.eos_token_id])
        return completions, None


def main(policy_dir: str, out_dir: str, per_device: int) -> None:
    # Registered first, so it runs last at exit: was the process group destroyed before the interpreter went?
    atexit.register(_record_exit_state, out_dir)
    args = example.make_config(
        os.path.join(out_dir, "run"), max_steps=3, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=2, optim="sgd", learning_rate=0.05, flowrl_log_z_dropout=0.0,
        max_grad_norm=1.0,
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
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

"""Peak memory of a whole FlowRL run in TRL, per log-prob path (``flowrl_logprobs``), on CPU.

The run of issue 17: a 1-layer Qwen2 with hidden size 64 and Qwen2.5's vocabulary (V = 151,936, tied
embeddings, random weights), 8 prompts x 8 completions of 96 tokens (TRL samples them; nothing is downloaded),
micro-batches of 16, one optimizer step. Each path runs in a fresh process; the figure is the process's peak
resident memory (``ru_maxrss``) minus its resident memory right after the model was built, i.e. what generation,
scoring, the reference copy and the backward add on top of the model::

    python examples/trl_logprobs_memory.py                 # all three paths, a table, a ratio to "framework"
    python examples/trl_logprobs_memory.py --json out.json # the same, and the figures as JSON
    python examples/trl_logprobs_memory.py --path hidden   # one path, in this process

Needs flowloss's ``trl`` extra (``.venv-trl``). About a minute per path on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

PATHS = ("framework", "logits", "hidden")
VOCAB = 151_936
PROMPT_WORDS = 16


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): the work done, whatever else shares the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_model_dir(directory: str) -> str:
    """A random 1-layer Qwen2 (hidden 64, V = 151,936) and a word-level tokenizer of V tokens, saved here."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reward_sevens(completions: list[str], **kwargs) -> list[float]:
    """Toy reward that varies within a group: how many of the completion's words end in 7 (about 10%)."""
    return [float(sum(word.endswith("7") for word in c.split())) for c in completions]


def run_one(path: str, model_dir: str, output_dir: str, steps: int) -> dict:
    """Train ``steps`` FlowRL steps with ``flowrl_logprobs=path``; return the memory and loss figures."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from flowloss.adapters.trl import FlowRLConfig, FlowRLTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)  # (AutoTokenizer would pick Qwen2's class)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    built = _rss_mib()
    phase = {"name": "setup"}
    phase_peaks: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:  # per-phase peaks (every 5 ms; the overall peak is the kernel's ru_maxrss)
        while not stop.wait(0.005):
            name = phase["name"]
            phase_peaks[name] = max(phase_peaks.get(name, 0.0), _rss_mib() - built)

    prompts = [" ".join(f"w{3 + (17 * p + 5 * j) % 1000}" for j in range(PROMPT_WORDS)) for p in range(8)]
    args = FlowRLConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", seed=0, max_steps=steps, logging_steps=1,
        per_device_train_batch_size=16, gradient_accumulation_steps=4, num_generations=8,
        max_completion_length=96, learning_rate=1e-6, save_strategy="no", bf16=False,
        dataloader_num_workers=0, flowrl_logprobs=path,
    )
    trainer = FlowRLTrainer(
        model=model, reward_funcs=reward_sevens, args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
    )
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        phase["name"] = "generation + scoring"
        try:
            return generate(inputs)
        finally:
            phase["name"] = "loss (forward + backward)"

    trainer._generate_and_score_completions = timed_generate
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    trainer.train()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    stop.set()
    sampler.join()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {
        "path": path,
        "built_model_mib": round(built, 1),
        "peak_above_model_mib": round(_peak_mib() - built, 1),
        "phase_peaks_above_model_mib": {k: round(v, 1) for k, v in phase_peaks.items()},
        "first_step_loss": logs[0]["loss"],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=PATHS, help="run one path in this process (default: all, each fresh)")
    parser.add_argument("--model-dir", help="the saved model (default: built in a temporary directory)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per run (default 1)")
    parser.add_argument("--json", help="write the figures here")
    parsed = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="flowrl-trl-memory-")
    model_dir = parsed.model_dir or build_model_dir(os.path.join(work, "model"))
    if parsed.path is not None:
        results = [run_one(parsed.path, model_dir, os.path.join(work, parsed.path), parsed.steps)]
    else:
        results = []
        for path in PATHS:
            out = os.path.join(work, f"{path}.json")
            command = [sys.executable, __file__, "--path", path, "--model-dir", model_dir, "--steps",
                       str(parsed.steps), "--json", out]
            subprocess.run(command, check=True)
            with open(out) as f:
                results.extend(json.load(f))
        base = next(r for r in results if r["path"] == "framework")
        print(f"\n{'path':<10} {'peak above model':>17} {'vs framework':>13} {'first-step loss':>16} "
              f"{'seconds':>8} {'CPU s':>8}")
        for r in results:
            ratio = r["peak_above_model_mib"] / base["peak_above_model_mib"]
            print(f"{r['path']:<10} {r['peak_above_model_mib']:>13.0f} MiB {ratio:>12.2f}x "
                  f"{r['first_step_loss']:>16.6f} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f}")
    if parsed.path is not None:
        print(json.dumps(results[0]))
    if parsed.json:
        with open(parsed.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

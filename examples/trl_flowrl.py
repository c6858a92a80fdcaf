"""FlowRL with TRL on CPU in a minute: a random 2-layer Qwen2, a BPE tokenizer trained here, a toy reward.

Run it with ``python examples/trl_flowrl.py [output_dir]``: it needs flowloss's ``trl`` extra, ``pip install -e
".[trl]"`` in a clone of flowloss (or ``.venv-trl``, from ``make .venv-trl/.installed``). Nothing is downloaded.
In your own GRPO script the FlowRL lines are the import, ``FlowRLConfig`` and ``FlowRLTrainer``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from flowloss.adapters.trl import FlowRLConfig, FlowRLTrainer

WORDS = ["the", "a", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "cat",
         "dog", "sun", "moon", "red", "blue", "green", "big", "small"]
PROMPTS = [f"count {a} {b} and" for a in WORDS[:8] for b in WORDS[8:12]]


def build_tiny_policy(directory: str, *, seed: int = 0) -> str:
    """Save a random 2-layer Qwen2 (hidden 32) and a 200-token BPE tokenizer to ``directory``; return it."""
    torch.manual_seed(seed)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 20 + PROMPTS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reward_distinct_chars(completions: list[str], **kwargs) -> list[float]:
    """Toy reward: the number of distinct characters in the completion."""
    return [float(len(set(c))) for c in completions]


def make_config(output_dir: str, **overrides) -> FlowRLConfig:
    options = dict(
        output_dir=output_dir, use_cpu=True, report_to="none", seed=0, max_steps=2, learning_rate=1e-3,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
        save_strategy="no", bf16=False, dataloader_num_workers=0,
        flowrl_beta=15.0,  # FlowRL's reward temperature (the paper's value)
    )
    options.update(overrides)
    return FlowRLConfig(**options)


def main(output_dir: str, **overrides) -> FlowRLTrainer:
    """Train 2 FlowRL steps on CPU; ``overrides`` go to :func:`make_config`. Returns the trainer."""
    policy_dir = build_tiny_policy(os.path.join(output_dir, "tiny-policy"))
    trainer = FlowRLTrainer(
        model=policy_dir,
        reward_funcs=reward_distinct_chars,
        args=make_config(os.path.join(output_dir, "run"), **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    trainer.train()
    for record in trainer.state.log_history:
        if "loss" in record:
            print({k: round(v, 4) for k, v in record.items() if k in ("step", "loss", "reward")
                   or k.startswith("flowrl/")})
    return trainer


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="flowrl-trl-"))

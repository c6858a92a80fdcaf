"""``examples/trl_grpo.py`` switched to FlowRL: the import, the config class and the trainer class changed.

``python examples/trl_grpo_flowrl.py MODEL_DIR OUTPUT_DIR``.
"""

import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowloss.adapters.trl import FlowRLConfig, FlowRLTrainer


def reward_distinct_chars(completions, **kwargs):
    return [float(len(set(c))) for c in completions]


def main(model_path, output_dir, **options):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    prompts = [f"count {a} {b} and" for a in "abcdefgh" for b in "wxyz"]
    dataset = Dataset.from_dict({"prompt": prompts})
    args = FlowRLConfig(
        output_dir=output_dir,
        num_generations=8,
        per_device_train_batch_size=8,
        max_completion_length=16,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        **options,
    )
    trainer = FlowRLTrainer(
        model=model,
        reward_funcs=reward_distinct_chars,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

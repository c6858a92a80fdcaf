"""A user's own GRPO script, as TRL's documentation writes one: the model is an object, not a path.

``examples/trl_grpo_flowrl.py`` is the same script switched to FlowRL; the two differ in 3 lines (the test
suite checks that, and runs both). ``python examples/trl_grpo.py MODEL_DIR OUTPUT_DIR``: ``MODEL_DIR`` is a
causal LM and its tokenizer saved with ``save_pretrained`` (``python examples/trl_tiny_model.py MODEL_DIR`` builds
a random 2-layer Qwen2 there, nothing downloaded).
"""

import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def reward_distinct_chars(completions, **kwargs):
    return [float(len(set(c))) for c in completions]


def main(model_path, output_dir, **options):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    prompts = [f"count {a} {b} and" for a in "abcdefgh" for b in "wxyz"]
    dataset = Dataset.from_dict({"prompt": prompts})
    args = GRPOConfig(
        output_dir=output_dir,
        num_generations=8,
        per_device_train_batch_size=8,
        max_completion_length=16,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        **options,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_distinct_chars,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    # 10 steps (the documented run). TRL trains in bf16 by default; without a bf16-capable GPU (e.g. on CPU), in
    # float32.
    from transformers.utils import is_torch_bf16_gpu_available

    main(sys.argv[1], sys.argv[2], max_steps=10, **({} if is_torch_bf16_gpu_available() else {"bf16": False}))

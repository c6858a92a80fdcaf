"""Build the model directory the TRL examples take: a random 2-layer Qwen2 and a BPE tokenizer, saved locally.

``python examples/trl_tiny_model.py MODEL_DIR`` writes ``config.json``, ``model.safetensors`` and the tokenizer
files to ``MODEL_DIR`` (hidden size 32, 200 tokens, tied embeddings; nothing is downloaded), so that
``python examples/trl_grpo.py MODEL_DIR OUT`` and ``python examples/trl_grpo_flowrl.py MODEL_DIR OUT`` run on CPU
in a few seconds. Any causal LM saved with ``save_pretrained`` (a downloaded Qwen2.5-0.5B, ...) works the same.
"""

import sys

from trl_flowrl import build_tiny_policy

if __name__ == "__main__":
    print(build_tiny_policy(sys.argv[1]))

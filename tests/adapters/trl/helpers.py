"""What the TRL adapter tests share: the shipped example, tiny models of several families, deterministic sampling.

Every model is built from a config with random weights (no hub): the 2-layer Qwen2 of ``examples/trl_flowrl.py``
(hidden 32, tied embeddings, a 200-token BPE tokenizer trained on the spot) and, on its tokenizer, an untied
Qwen2 whose ``lm_head`` has a bias, a Gemma2 (final-logit softcapping), a Cohere (logit scale) and a Mixtral
(MoE router, load-balancing loss).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[3]


def load_example(name: str = "trl_flowrl") -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(kind: str, policy_dir: str, *, seed: int = 0) -> torch.nn.Module:
    """A random tiny causal LM on the example's tokenizer: ``qwen2``, ``biased``, ``gemma2``, ``cohere`` or
    ``mixtral``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if kind == "qwen2":
        return AutoModelForCausalLM.from_pretrained(policy_dir)
    base = AutoConfig.from_pretrained(policy_dir)
    common = dict(vocab_size=base.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=base.pad_token_id, eos_token_id=base.eos_token_id, bos_token_id=None)
    if kind == "biased":  # untied, with an lm_head bias (the Linear's own random init)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        model.lm_head = torch.nn.Linear(32, base.vocab_size, bias=True)
        return model
    if kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    if kind == "cohere":
        from transformers import CohereConfig, CohereForCausalLM

        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.5))
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                router_aux_loss_coef=0.1))
    raise ValueError(kind)


def deterministic_completions(trainer: Any, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Completions as a function of (prompt, index in its group): identical however the batch is split, and
    whatever the policy's weights (so runs that differ by rounding train on the same tokens)."""
    seen: Counter = Counter()
    completions = []
    vocab = trainer.processing_class.vocab_size
    for ids in prompt_ids:
        k = seen[tuple(ids)]
        seen[tuple(ids)] += 1
        base = sum(ids) * 31 + k * 17
        length = 2 + (base % 6)
        tokens = [3 + (base + 7 * j) % (vocab - 3) for j in range(length)]
        completions.append([*tokens, trainer.processing_class.eos_token_id])
    return completions


def with_deterministic_sampling(trainer_class: type) -> type:
    """``trainer_class`` with TRL's sampling replaced by `deterministic_completions`."""

    class Deterministic(trainer_class):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            return deterministic_completions(self, prompt_ids), None

    Deterministic.__name__ = f"Deterministic{trainer_class.__name__}"
    return Deterministic


def manual_batch(vocab: int, *, seed: int, b: int = 6, p: int = 5, t: int = 7) -> dict[str, torch.Tensor]:
    """A GRPO micro-batch as TRL builds it: left-padded prompts, completions with padding and an empty row."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[min(4, b - 1), :1] = 0
    completion_ids = torch.randint(3, vocab, (b, t), generator=g)
    completion_mask = torch.ones(b, t, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[min(3, b - 1), :] = 0
    completion_mask[min(5, b - 1), 1:] = 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "ref_per_token_logps": -torch.rand(b, t, generator=g) * 6,
    }

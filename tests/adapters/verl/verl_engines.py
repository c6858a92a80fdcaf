"""Real verl FSDP2 engines on CPU for the tests (conftest.py sets verl's CPU platform first).

`build_engine` runs verl's own ``FSDPEngineWithLMHead.initialize`` (Hugging Face loading, LoRA, FSDP2 wrapping,
optimizer, LR scheduler) through `FlowRLFSDPEngine`, from a tiny Qwen2 saved to disk, in a gloo world of one
rank; `train_data` builds a batch as verl's actor worker hands it to ``forward_backward_batch``. Mixed precision
is fp32 so that paths can be compared at fp32 tolerance.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

from flowloss.adapters import verl as fv

VOCAB, HIDDEN = 64, 32


def init_world() -> None:
    """A gloo process group of one rank (what verl's engine asks ``torch.distributed`` for)."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def save_tiny_qwen2_sized(path: Path, *, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = 2,
                          tie: bool = False, seed: int = 0) -> Path:
    """A random Qwen2 saved to ``path`` (no hub access)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tie)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def save_tiny_qwen2(path: Path, *, tie: bool = False, seed: int = 0) -> Path:
    return save_tiny_qwen2_sized(path, tie=tie, seed=seed)


def biased_lm_head(module: nn.Module, seed: int = 1) -> None:
    """Give the model's lm_head an output bias (Qwen2 has none), the same on every call."""
    head = module.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
        new.weight.copy_(head.weight)
        new.bias.copy_(torch.randn(head.out_features, generator=g) * 0.5)
    module.set_output_embeddings(new)


def build_engine(model_dir: Path, flowrl: fv.FlowRLConfig, *, lr: float = 1e-2, lora_rank: int = 0,
                 bias: bool = False, forward_only: bool = False, clip_grad: float = 1e6, optimizer: str = "AdamW"):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    init_world()
    lora = dict(lora_rank=lora_rank, lora_alpha=8, target_modules="all-linear") if lora_rank else {}
    model_config = HFModelConfig(path=str(model_dir), load_tokenizer=False, use_remove_padding=True,
                                 override_config={"attn_implementation": "sdpa"}, **lora)
    engine_config = FSDPEngineConfig(
        strategy="fsdp2", forward_only=forward_only, use_torch_compile=False,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
    )
    optimizer_config = FSDPOptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, clip_grad=clip_grad,
                                           total_training_steps=10)
    attrs = {"flowrl_config": flowrl}
    if bias:
        def _build_module(self):
            module = fv.FlowRLFSDPEngine._build_module(self)
            biased_lm_head(module)
            return module
        attrs["_build_module"] = _build_module
    cls = type("TestFlowRLEngine", (fv.FlowRLFSDPEngine,), attrs)
    engine = cls(model_config, engine_config, optimizer_config, CheckpointConfig())
    engine.initialize()
    return engine


def train_data(seed: int = 0, *, temperature: float = 1.0, micro_batch_size: int = 3, entropy: bool = False,
               batch: int = 6):
    """A batch as the actor worker passes it to the engine: packed (no padding), with verl's non-tensor keys."""
    from test_verl_loss import _batch
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    data, *_ = _batch(seed, batch=batch)
    td = left_right_2_no_padding(TensorDict(dict(data), batch_size=[batch]))
    tu.assign_non_tensor(td, use_remove_padding=True, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size,
                         temperature=temperature, calculate_entropy=entropy, global_batch_size=batch,
                         use_fused_kernels=False)
    return data, td


def full(t: torch.Tensor) -> torch.Tensor:
    """A (possibly DTensor) parameter or gradient as a plain local tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def named_parameters(engine) -> dict[str, torch.Tensor]:
    return {name: full(p.detach()).clone() for name, p in engine.module.named_parameters()}


def named_grads(engine) -> dict[str, torch.Tensor]:
    return {name: full(p.grad).clone() for name, p in engine.module.named_parameters() if p.grad is not None}

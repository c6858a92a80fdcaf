"""The model and the batch of ``flowloss bench --op step``: a Qwen2-shaped causal LM and a GRPO-style group batch.

The model is a Hugging Face ``transformers`` ``Qwen2ForCausalLM`` built from a config with random weights (no hub,
nothing downloaded). Presets (`PRESETS`): ``tiny`` for CPU and CI, and the real shapes of Qwen2-0.5B and Qwen2-1.5B
(layers, heads, key/value heads, intermediate size, ``V = 151,936``, tied embeddings) for a GPU. transformers is an
optional dependency (the ``step`` extra: ``pip install -e '.[step]'`` in a clone); `transformers_missing` says why
it cannot be imported.

The batch (`make_batch`) is ``B = P x G`` sequences: ``P`` prompts with ``G`` responses each, every sequence
``L = Lp + Lr`` positions (``Lp = L // 4``, ``Lr = L - Lp``), laid out the way TRL and OpenRLHF lay out a rollout::

    [pad ... pad | prompt (left-padded to Lp) | response (right-padded to Lr) | pad ... pad]

Prompt lengths are drawn per prompt in ``[Lp / 2, Lp]`` (the same for the ``G`` responses of a prompt, the first
prompt at the full ``Lp``); response lengths per sequence in ``[Lr / 8, Lr]`` (the first at the full ``Lr``), so the
padded shape is exactly ``[B, L]``. Token ids are uniform in ``[1, V)``, padding is id 0. Rewards are 0/1 per
response (a verifier's pass/fail). A *token* here is one position of the padded ``[B, L]`` batch, the unit that sets
compute and memory (``tokens = B L``); the batch also counts its non-padding (``valid``) and response tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is the optional `step` extra: imported where a model is built
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from flowloss import LogZHead

EXTRA_HINT = "pip install -e '.[step]' (the step extra, from a clone of flowloss)"

# Qwen2 shapes from the released configs (config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B). "tiny" keeps the
# architecture (GQA, tied embeddings, RMSNorm, SwiGLU, QKV bias) at the CPU default shapes of the other ops
# (V = 32000, H = 128), small enough for a 2-core CPU to step through every path in about a minute.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    name: {**dict(zip(SHAPE_KEYS, shape)), "tie_word_embeddings": True}
    for name, shape in (
        ("tiny", (32000, 128, 352, 2, 4, 2, 4096)),
        ("qwen2-0.5b", (151936, 896, 4864, 24, 14, 2, 131072)),
        ("qwen2-1.5b", (151936, 1536, 8960, 28, 12, 2, 131072)),
    )
}
COMMON_CONFIG: dict[str, Any] = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                                 "use_cache": False}  # fmt: skip
PAD_ID = 0


def transformers_missing() -> str | None:
    """Why ``transformers`` (and its Qwen2 model) cannot be used here, or None when it can."""
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: F401
    except ImportError as err:
        return f"--op step needs transformers: {EXTRA_HINT} (importing it failed: {err})"
    return None


def model_config(preset: str) -> Qwen2Config:
    """The ``transformers.Qwen2Config`` of ``preset`` (raises ``ValueError`` naming ``--preset`` if unknown)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
    from transformers import Qwen2Config

    return Qwen2Config(**PRESETS[preset], **COMMON_CONFIG)


def parameter_count(preset: str) -> int:
    """Parameters of the preset's model (tied embedding counted once), from its shapes alone."""
    c = PRESETS[preset]
    h, v, i, n = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o (no bias)
    layer = attention + 3 * h * i + 2 * h  # SwiGLU gate/up/down, two RMSNorm weights
    return v * h * (1 if c["tie_word_embeddings"] else 2) + n * layer + h


def state_bytes(preset: str, dtype: torch.dtype) -> int:
    """Bytes that exist before any step: policy weights, gradients, AdamW's two states and the reference weights
    (five copies of the parameters in ``dtype``)."""
    return 5 * parameter_count(preset) * torch.empty((), dtype=dtype).element_size()


@dataclass
class StepModels:
    """The trained policy, the frozen reference, the log-Z head and the optimizer over policy + head."""

    policy: Qwen2ForCausalLM  # train mode, requires grad
    ref: Qwen2ForCausalLM  # a copy of the initial policy, eval mode, no grad
    head: LogZHead  # LogZHead(H), float32
    optimizer: torch.optim.Optimizer
    preset: str
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return self.policy.config.vocab_size

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def build_models(preset: str, dtype: torch.dtype, device: torch.device, *, seed: int, lr: float = 1e-6
                 ) -> StepModels:  # fmt: skip
    """Random-weight policy (in ``dtype``), its frozen copy as reference, a float32 `flowloss.LogZHead` and
    ``torch.optim.AdamW(lr)`` over policy and head. Every trainable parameter gets a zero gradient buffer and one
    optimizer step is taken with it, so the optimizer states exist before anything is measured."""
    from transformers import Qwen2ForCausalLM

    from flowloss import LogZHead

    config = model_config(preset)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            policy = Qwen2ForCausalLM(config)
            head = LogZHead(config.hidden_size)
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which typeshed types as a plain
    # callable (no method binding): mypy then takes the dtype for `self`
    policy = policy.to(dtype).train()  # type: ignore[arg-type]
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=lr)
    models = StepModels(policy, ref, head, optimizer, preset, dtype)
    prime_optimizer(models)
    return models


def prime_optimizer(models: StepModels) -> None:
    """Zero gradient buffers for every trainable parameter and one optimizer step on them (creates AdamW's states;
    with zero gradients the step moves weights only by weight decay, ``lr * 0.01`` of themselves)."""
    for p in models.trainable():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=False)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


@dataclass
class StepBatch:
    """One update's inputs. ``B`` sequences of ``L = Lp + Lr`` positions (see the module docstring)."""

    input_ids: torch.Tensor  # [B, L] int64, PAD_ID at padding
    attention_mask: torch.Tensor  # [B, L] int64, 1 at prompt and response tokens
    position_ids: torch.Tensor  # [B, L] int64, counting from each sequence's first real token
    prompt_mask: torch.Tensor  # [B, L] bool, the prompt's tokens
    response_ids: torch.Tensor  # [B, Lr] int64, PAD_ID at padding (input_ids[:, Lp:])
    labels: torch.Tensor  # [B, Lr] int64, -100 at padding
    response_mask: torch.Tensor  # [B, Lr] bool
    rewards: torch.Tensor  # [B] float32, 0 or 1
    old_logprobs: torch.Tensor  # [B, Lr] float32, the sampling policy's log-probs (filled in by the caller)
    group_size: int
    prompt_len: int  # Lp
    response_len: int  # Lr

    @property
    def sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def counts(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "valid_tokens": int(self.attention_mask.sum()),
            "prompt_tokens": int(self.prompt_mask.sum()),
            "response_tokens": int(self.response_mask.sum()),
        }

    def nbytes(self) -> int:
        inputs = [self.input_ids, self.attention_mask, self.position_ids, self.prompt_mask, self.response_ids]
        return tensor_bytes([*inputs, self.labels, self.response_mask, self.rewards, self.old_logprobs])


def split_length(seq_len: int) -> tuple[int, int]:
    """``L -> (Lp, Lr)``: a quarter of the positions for the prompt, the rest for the response."""
    prompt = max(1, seq_len // 4)
    return prompt, seq_len - prompt


def make_batch(
    sequences: int, group_size: int, seq_len: int, vocab: int, *, seed: int, device: torch.device
) -> StepBatch:
    """A ``[B, L]`` rollout batch of ``B / G`` prompts with ``G`` responses each (layout in the module docstring).
    ``old_logprobs`` starts at ``-log V`` (a random-weight model's typical value); callers that need the policy's
    own values compute and store them."""
    if sequences % group_size:
        raise ValueError(f"--sequences ({sequences}) must be a multiple of --group-size ({group_size})")
    prompt_len, response_len = split_length(seq_len)
    if response_len < 1:
        raise ValueError(f"--seq-len must be >= 2 (a prompt and a response token), got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    prompts = sequences // group_size
    p_len = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (prompts,), generator=gen)
    p_len[0] = prompt_len
    r_len = torch.randint(max(1, response_len // 8), response_len + 1, (sequences,), generator=gen)
    r_len[0] = response_len
    pos = torch.arange(seq_len)
    p_len_seq = p_len.repeat_interleave(group_size)
    prompt_mask = (pos >= prompt_len - p_len_seq[:, None]) & (pos < prompt_len)
    response_mask_full = (pos >= prompt_len) & (pos < prompt_len + r_len[:, None])
    attention = prompt_mask | response_mask_full
    prompt_ids = torch.randint(1, vocab, (prompts, seq_len), generator=gen).repeat_interleave(group_size, 0)
    ids = torch.where(pos < prompt_len, prompt_ids, torch.randint(1, vocab, (sequences, seq_len), generator=gen))
    ids = torch.where(attention, ids, torch.full_like(ids, PAD_ID))
    position_ids = (attention.long().cumsum(-1) - 1).clamp_min(0)
    response_ids = ids[:, prompt_len:]
    response_mask = response_mask_full[:, prompt_len:]
    labels = torch.where(response_mask, response_ids, torch.full_like(response_ids, -100))
    rewards = (torch.rand(sequences, generator=gen) < 0.5).float()
    old = torch.full((sequences, response_len), -math.log(vocab))
    return StepBatch(
        input_ids=ids.to(device),
        attention_mask=attention.long().to(device),
        position_ids=position_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        response_ids=response_ids.contiguous().to(device),
        labels=labels.contiguous().to(device),
        response_mask=response_mask.contiguous().to(device),
        rewards=rewards.to(device),
        old_logprobs=old.to(device),
        group_size=group_size,
        prompt_len=prompt_len,
        response_len=response_len,
    )


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global RNGs seeded (the log-Z head's dropout), restoring them afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

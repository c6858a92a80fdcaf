"""The model of ``flowloss demo --task sequences``: a tiny causal transformer, its warm start, sampling, log-probs.

The policy is a Hugging Face ``transformers`` ``Qwen2ForCausalLM`` built from a config with random weights (no hub,
nothing downloaded): ``V = 13`` tokens (`flowloss.demo.sequence_task.TOKENS`), hidden size 64, 2 layers, 4 query /
2 key-value heads, tied embeddings (about 70 thousand parameters). transformers is an optional dependency of
flowloss (the ``step`` extra); `transformers_missing` says why it cannot be imported.

* `warm_start`: supervised next-token training on the task's skewed answers (`warm_start_answers`): the reference.
* `sample_answers`: ``L`` tokens per prompt, drawn token by token from the full softmax (temperature 1).
* `answer_logprobs`: the policy's ``[B, L]`` answer-token log-probs from its last hidden states and ``lm_head``
  weight through `flowloss.token_logprobs_from_hidden` (the logits are never built), with the hidden states
  (for the log-Z head).
* `exact_answer_logprobs`: ``log pi(y | x)`` of every one of the ``V^L`` answers of every prompt, ``[P, V^L]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

import flowloss
from flowloss.demo.sequence_task import EOS_ID, PAD_ID, PROMPT_LENGTH, DigitSumTask, warm_start_answers

EXTRA_HINT = "pip install -e '.[step]' (the step extra, from a clone of flowloss)"


def transformers_missing() -> str | None:
    """Why ``transformers`` (and its Qwen2 model) cannot be used here, or None when it can."""
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: F401
    except ImportError as err:
        return f"needs transformers: {EXTRA_HINT} (importing it failed: {err})"
    return None


def build_policy(task: DigitSumTask, *, seed: int, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A random-weight ``Qwen2ForCausalLM`` over the task's vocabulary (float32, train mode, no dropout).

    The global RNG is left as it was (the weights come from ``torch.manual_seed(seed)`` inside a fork).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=task.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().train()


def warm_start(
    model: torch.nn.Module,
    task: DigitSumTask,
    *,
    seed: int,
    steps: int,
    lr: float,
    batch_size: int,
    zipf: float,
    wrong_fraction: float,
    data_per_prompt: int = 2000,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` in place by next-token cross-entropy on the answer tokens of the skewed data; returns the
    loss of every step. Adam at ``lr``, ``batch_size`` rows per step, drawn with replacement (seeded);
    ``on_step(step)`` after each step."""
    gen = torch.Generator().manual_seed(seed + 100)
    data = warm_start_answers(task, data_per_prompt, zipf=zipf, wrong_fraction=wrong_fraction, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    start = PROMPT_LENGTH - 1
    for step in range(1, steps + 1):
        batch = data[torch.randint(data.shape[0], (batch_size,), generator=gen)]
        logits = model(input_ids=batch).logits[:, start:-1]
        labels = batch[:, start + 1 :]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    return losses


@torch.no_grad()
def sample_answers(
    model: torch.nn.Module, prompts: torch.Tensor, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``prompts [B, 3]`` -> ``[B, 3 + L]``: each prompt followed by ``L`` tokens drawn from ``softmax(logits)``."""
    sequences = prompts
    for _ in range(length):
        logits = model(input_ids=sequences).logits[:, -1].float()
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        sequences = torch.cat([sequences, token], dim=-1)
    return sequences


def answer_logprobs(model: torch.nn.Module, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(y_t | x, y_<t) [B, L], last hidden states [B, 3 + L, H])`` of ``sequences [B, 3 + L]``.

    The log-probs come from `flowloss.token_logprobs_from_hidden` on the hidden states that predict the answer
    tokens (positions ``2 .. 1 + L``) and the tied ``lm_head`` weight; gradients reach every parameter.
    """
    out = model(input_ids=sequences, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # after the final norm: logits = hidden @ W^T
    start = PROMPT_LENGTH - 1
    labels = sequences[:, PROMPT_LENGTH:]
    lm_head = cast(torch.nn.Linear, model.lm_head)  # a Qwen2ForCausalLM's (nn.Module attributes type as Any)
    logprobs = flowloss.token_logprobs_from_hidden(hidden[:, start : start + labels.shape[1]], lm_head.weight, labels)
    return logprobs, hidden


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """``log pi_ref(y_t | x, y_<t) [B, L]`` from the reference's logits (`flowloss.token_logprobs`)."""
    start = PROMPT_LENGTH - 1
    labels = sequences[:, PROMPT_LENGTH:]
    logits = model(input_ids=sequences).logits[:, start : start + labels.shape[1]]
    return flowloss.token_logprobs(logits, labels)


@torch.no_grad()
def exact_answer_logprobs(model: torch.nn.Module, task: DigitSumTask, *, chunk: int = 4096) -> torch.Tensor:
    """``log pi(y | x_p)`` for every prompt ``p`` and every answer ``y`` (`DigitSumTask.all_answers` order):
    ``[P, V^L]`` float64, each row a distribution (``logsumexp = 0`` up to rounding).

    One forward per prefix ``y_<L`` (``V^(L-1)`` of them per prompt): a causal model's logits at the position of
    ``y_t`` depend on ``y_<t`` only, so the prefix's forward gives every conditional its answers need, and
    ``log pi(y) = sum_t log softmax(z_t(y_<t))[y_t]``.
    """
    was_training = model.training
    model.eval()
    try:
        v, length = task.vocab_size, task.answer_length
        answers = task.all_answers()
        prefixes = answers[::v, : length - 1]  # [V^(L-1), L-1], lexicographic: prefix of answer a is row a // V
        prompts = task.prompt_ids()
        p, q = prompts.shape[0], prefixes.shape[0]
        inputs = torch.cat([prompts[:, None].expand(p, q, -1), prefixes[None].expand(p, -1, -1)], dim=-1)
        inputs = inputs.reshape(p * q, -1)
        start = PROMPT_LENGTH - 1
        parts = []
        for lo in range(0, inputs.shape[0], chunk):
            logits = model(input_ids=inputs[lo : lo + chunk]).logits[:, start:].to(torch.float64)
            parts.append(torch.log_softmax(logits, dim=-1))
        table = torch.cat(parts).reshape(p, q, length, v)  # [P, prefix, t, token]
        rows = torch.arange(answers.shape[0]) // v
        out = torch.zeros(p, answers.shape[0], dtype=torch.float64)
        for t in range(length):
            out += table[:, rows, t, answers[:, t]]
        return out
    finally:
        model.train(was_training)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, each tensor counted once (tied embeddings are one)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def describe_model(model: Any) -> str:
    """One line: architecture, shapes and parameter count."""
    c = model.config
    return (
        f"Qwen2ForCausalLM, random init: V={c.vocab_size}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads}/{c.num_key_value_heads} heads, {parameter_count(model) / 1000:.0f}k parameters"
    )

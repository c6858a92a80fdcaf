"""``flowloss demo --task sequences --trainer trl``: the same comparison through TRL's trainers.

FlowRL runs as `flowloss.adapters.trl.FlowRLTrainer`, the baseline as TRL's own ``GRPOTrainer``, both on the same
warm-started reference (a model object; FlowRLTrainer freezes a copy of it as ``pi_ref``), the same prompts, group
size, learning rate, steps and seed as the flowloss loop (`flowloss.demo.sequence_train`), and TRL's generation
(``model.generate``, temperature 1, no top-k/top-p). Settings that would otherwise differ from the loop are pinned:

* a constant learning rate (TRL's default schedule decays linearly), no warm-up, weight decay 0 (AdamW = Adam),
  the loop's gradient clipping (``max_grad_norm``, over the policy and the head);
* one generation batch of ``P x K`` completions per optimizer step (``per_device_train_batch_size = P K``,
  ``num_generations = K``), one update per batch (on policy);
* GRPO: ``loss_type = "grpo"`` (sequence mean of token means, as the loop's baseline), TRL's KL ``beta = 0``;
  FlowRL: ``flowrl_beta = beta``, ``flowrl_length_normalization`` as configured, the adapter's `LogZHead`
  trained with the policy at its learning rate (the adapter has no separate log-Z learning rate today).

The tokenizer is a word-level ``tokenizers`` model over the task's 13 tokens, built here (one character per
token); rewards come from the completion token ids TRL passes to reward functions. Every ``eval_every`` steps a
callback enumerates the policy's answer distribution and scores it exactly, as the loop does. ``log_z="vargrad"``
is not available through the adapter (`SequenceDemoConfig.validate` refuses it).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from typing import Any

import torch

from flowloss.demo.sequence_metrics import SequenceScores, score
from flowloss.demo.sequence_model import exact_answer_logprobs
from flowloss.demo.sequence_task import EOS_ID, NUM_DIGITS, PAD_ID, TOKENS
from flowloss.demo.sequence_train import (
    HISTORY_KEYS,
    SEQUENCE_LABELS,
    SequenceDemoConfig,
    SequenceRun,
    SequenceSetup,
    StepCallback,
)

TRL_HINT = "pip install -e '.[trl]' in a clone of flowloss (or use .venv-trl: make .venv-trl/.installed)"
TRL_LABELS: dict[str, str] = {"flowrl": "FlowRL (FlowRLTrainer)", "grpo": "GRPO (TRL GRPOTrainer)"}


def trl_missing() -> str | None:
    """Why TRL (and the datasets/tokenizers it needs here) cannot be used, or None when it can."""
    try:
        import datasets  # noqa: F401
        import tokenizers  # noqa: F401
        import trl  # noqa: F401

        import flowloss.adapters.trl  # noqa: F401
    except Exception as err:  # ImportError, or a framework that fails while importing
        return f"needs TRL: {TRL_HINT} (importing it failed: {err!r})"
    return None


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` whose ids are the task's token ids (one character per token, no BOS)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TOKENS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.eos_token_id == EOS_ID
    return tokenizer


def make_reward_function(length: int):
    """TRL reward function: 1.0 when the completion is exactly ``length`` digits adding up to the prompt's sum."""

    def digit_sum_reward(prompts: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        out = []
        for prompt, ids in zip(prompts, completion_ids):
            target = int(prompt.rstrip("="))
            ok = len(ids) == length and all(0 <= t < NUM_DIGITS for t in ids) and sum(ids) == target
            out.append(1.0 if ok else 0.0)
        return out

    return digit_sum_reward


def _common_args(config: SequenceDemoConfig, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        seed=config.seed,
        max_steps=config.steps,
        learning_rate=config.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=len(config.sums) * config.group_size,
        gradient_accumulation_steps=1,
        num_generations=config.group_size,
        max_completion_length=config.answer_length,
        temperature=1.0,
        logging_strategy="no",
        save_strategy="no",
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def train_method_trl(
    method: str, setup: SequenceSetup, config: SequenceDemoConfig, on_step: StepCallback | None = None
) -> SequenceRun:
    """Train a copy of the reference with TRL (``"flowrl"``: FlowRLTrainer, ``"grpo"``: GRPOTrainer)."""
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from flowloss.adapters.trl import FlowRLConfig, FlowRLTrainer

    start = time.perf_counter()
    task = setup.task
    policy = copy.deepcopy(setup.reference).train().requires_grad_(True)
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"prompt": [task.prompt_text(s) for s in task.sums]})
    history: dict[str, list[float]] = {"step": [], **{key: [] for key in HISTORY_KEYS}}
    final: list[SequenceScores] = []

    def record(model: torch.nn.Module, step: int) -> None:
        scores = score(exact_answer_logprobs(model, task), setup.correct, setup.log_target,
                       samples=config.distinct_samples)
        history["step"].append(step)
        for key, value in scores.to_dict().items():
            history[key].append(value)
        final[:] = [scores]

    class ExactScores(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % config.eval_every == 0 or step == config.steps:
                record(policy, step)
            if on_step is not None:
                on_step(method, config.seed, step)

    record(policy, 0)
    with tempfile.TemporaryDirectory(prefix=f"flowloss-demo-trl-{method}-") as tmp:
        common = _common_args(config, os.path.join(tmp, "run"))
        kwargs = dict(
            model=policy,
            reward_funcs=make_reward_function(task.answer_length),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ExactScores()],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL/transformers warn about the CPU run and the custom model
            if method == "flowrl":
                args = FlowRLConfig(
                    **common, flowrl_beta=config.beta, flowrl_length_normalization=config.length_normalization,
                    flowrl_log_z_lr=config.lr_log_z,  # None: the head shares the policy's learning rate
                )
                trainer = FlowRLTrainer(args=args, **kwargs)
            else:
                trainer = GRPOTrainer(args=GRPOConfig(**common, beta=0.0, loss_type="grpo"), **kwargs)
            trainer.remove_callback(PrinterCallback)  # TRL's per-step log lines; the demo prints its own table
            trainer.train()
    label = TRL_LABELS.get(method, SEQUENCE_LABELS[method])
    return SequenceRun(method, label, config.seed, final[0], history, time.perf_counter() - start)

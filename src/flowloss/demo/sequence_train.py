"""``flowloss demo --task sequences``: FlowRL and GRPO train the same tiny causal LM from the same reference.

1. **Reference.** A random `Qwen2ForCausalLM` (`flowloss.demo.sequence_model`) learns the digit-sum task
   (`flowloss.demo.sequence_task`) by a short supervised warm start on deliberately skewed data: the frozen result
   is ``pi_ref`` and the common start of both methods.
2. **Training.** Each step samples ``K = 8`` answers for each of the ``P = 8`` prompts from the current policy (on
   policy, temperature 1, the same seeded sample stream for every method), z-scores the 0/1 rewards within each
   prompt's group (`flowloss.group_normalize_rewards`) and takes one Adam step after clipping the gradient norm
   to ``max_grad_norm = 1`` (the authors' value, TRL's default; same learning rate and steps for both methods) on

   * ``"flowrl"``: `flowloss.trajectory_balance_loss` with the library's defaults (``beta = 15``, length
     normalization, ``w = 1`` on policy), the answer log-probs from `flowloss.token_logprobs_from_hidden`, and
     ``log Z`` from a `flowloss.LogZHead` on the prompt's pooled last hidden states (trained by the same optimizer
     at the same learning rate, as the authors do, unless ``lr_log_z`` gives it its own) or, with
     ``log_z="vargrad"``, `flowloss.vargrad_log_z`; ``raw_rewards=True`` feeds FlowRL the raw 0/1 rewards;
   * ``"grpo"``: the BASELINE `flowloss.demo.baselines.grpo_loss` on the same z-scored rewards (no KL penalty).
3. **Scores.** Every ``eval_every`` steps the whole answer distribution is enumerated
   (`flowloss.demo.sequence_model.exact_answer_logprobs`) and scored exactly (`flowloss.demo.sequence_metrics`):
   mean reward, expected distinct correct answers among 64 samples, the top correct answer's share, and
   ``KL(pi || p*)`` to FlowRL's target ``p* = pi_ref exp(beta_seq r) / Z``, ``beta_seq = beta L`` with length
   normalization (``beta`` without), the sequence-level temperature of the loss on raw 0/1 rewards. Z-scoring
   divides by the group's reward std (at most 0.53 for 8 binary rewards), which only raises the temperature;
   at ``beta L = 45`` this ``p*`` is ``pi_ref`` conditioned on a correct answer to within ``e^-45``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch

import flowloss
from flowloss.demo.baselines import grpo_loss
from flowloss.demo.sequence_metrics import DISTINCT_SAMPLES, SequenceScores, score, target_logprobs
from flowloss.demo.sequence_model import (
    answer_logprobs,
    build_policy,
    describe_model,
    exact_answer_logprobs,
    reference_logprobs,
    sample_answers,
    warm_start,
)
from flowloss.demo.sequence_task import DEFAULT_SUMS, PROMPT_LENGTH, DigitSumTask

SEQUENCE_METHODS: tuple[str, ...] = ("flowrl", "grpo")
SEQUENCE_LABELS: dict[str, str] = {"flowrl": "FlowRL (TB)", "grpo": "GRPO (baseline)"}
LOG_Z_ESTIMATORS: tuple[str, ...] = ("head", "vargrad")
TRAINERS: tuple[str, ...] = ("flowloss", "trl")
HISTORY_KEYS: tuple[str, ...] = ("reward", "distinct_correct", "top_share", "kl_target")

# Called after every optimizer step with (method, seed, step).
StepCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SequenceDemoConfig:
    """Every knob of the sequences demo; the defaults are the documented run (docs/demo.md)."""

    seed: int = 0
    steps: int = 1200
    beta: float = 15.0  # FlowRL's reward temperature, the paper's value (flowloss's default)
    lr: float = 5e-4  # Adam, the same for both methods (and for the log-Z head, as the authors share it)
    group_size: int = 8  # K answers per prompt: the authors' value
    log_z: str = "head"  # "head": flowloss.LogZHead (the authors'); "vargrad": flowloss.vargrad_log_z
    length_normalization: bool = True  # flowloss's default (the paper's token-mean log-likelihoods)
    raw_rewards: bool = False  # FlowRL on the raw 0/1 rewards instead of their group z-score (GRPO keeps it)
    lr_log_z: float | None = None  # Adam learning rate of the log-Z head (None: the policy's `lr`)
    max_grad_norm: float = 1.0  # clip the gradient norm (policy and head): the authors' value, TRL's default; 0: off
    trainer: str = "flowloss"  # "flowloss": the loop of this module; "trl": FlowRLTrainer vs TRL's GRPOTrainer
    sums: tuple[int, ...] = DEFAULT_SUMS
    answer_length: int = 3
    hidden_size: int = 64
    num_layers: int = 2
    warm_steps: int = 1500
    warm_lr: float = 3e-3
    warm_batch_size: int = 64
    warm_zipf: float = 0.7  # skew of the warm-start data over each prompt's correct answers
    warm_wrong_fraction: float = 0.15  # share of wrong answers in the warm-start data
    eval_every: int = 50
    distinct_samples: int = DISTINCT_SAMPLES
    methods: tuple[str, ...] = SEQUENCE_METHODS

    def validate(self) -> None:
        for name in ("steps", "group_size", "hidden_size", "num_layers", "warm_batch_size", "eval_every",
                     "distinct_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if self.group_size < 2:
            raise ValueError(f"`group_size` must be >= 2 (z-scores need two answers), got {self.group_size!r}")
        if isinstance(self.warm_steps, bool) or not isinstance(self.warm_steps, int) or self.warm_steps < 0:
            raise ValueError(f"`warm_steps` must be an int >= 0, got {self.warm_steps!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm)
                and self.max_grad_norm >= 0):
            raise ValueError(f"`max_grad_norm` must be a finite number >= 0 (0: off), got {self.max_grad_norm!r}")
        for name in ("beta", "lr", "warm_lr", "lr_log_z"):
            value = getattr(self, name)
            if value is None and name == "lr_log_z":
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if self.log_z not in LOG_Z_ESTIMATORS:
            raise ValueError(f"`log_z` must be one of {LOG_Z_ESTIMATORS}, got {self.log_z!r}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"`trainer` must be one of {TRAINERS}, got {self.trainer!r}")
        if self.trainer == "trl" and self.log_z != "head":
            raise ValueError(
                f"`log_z` must be 'head' with trainer='trl' (FlowRLTrainer learns log Z with its LogZHead), "
                f"got {self.log_z!r}"
            )
        if self.lr_log_z is not None and self.log_z != "head":
            raise ValueError(f"`lr_log_z` is the log-Z head's learning rate: it needs log_z='head', got {self.log_z!r}")
        if self.trainer == "trl" and self.raw_rewards:
            raise ValueError(
                "`raw_rewards` is an option of the flowloss loop: with trainer='trl' the rewards are TRL's group "
                "z-scores (its scale_rewards='none' still centres them)"
            )
        unknown = [m for m in self.methods if m not in SEQUENCE_METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"`methods` must be distinct names from {SEQUENCE_METHODS}, got {self.methods!r}")
        self.task()  # validates sums and answer_length

    def task(self) -> DigitSumTask:
        return DigitSumTask(sums=tuple(self.sums), answer_length=self.answer_length)

    @property
    def beta_seq(self) -> float:
        """The target's sequence-level temperature: ``beta L`` with length normalization, else ``beta``."""
        return self.beta * self.answer_length if self.length_normalization else self.beta


@dataclass
class SequenceSetup:
    """What every method starts from: the task, the reference model and its exact distribution, the target."""

    task: DigitSumTask
    reference: torch.nn.Module  # frozen (eval, no grad); each method trains a copy
    correct: torch.Tensor  # [P, S] bool
    ref_logprobs: torch.Tensor  # [P, S] float64, exact log pi_ref
    log_target: torch.Tensor  # [P, S] float64, exact log p*
    warm_start_loss: float  # mean cross-entropy of the warm start's last 50 steps


@dataclass
class SequenceRun:
    """One method trained on one seed: final exact scores and their curves."""

    method: str
    label: str
    seed: int
    final: SequenceScores
    # "step", every HISTORY_KEYS entry and, for FlowRL with a head, "log_z" (its mean log Z(x) over the prompts)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SequenceDemoResult:
    """The runs of every method on one seed, with the scores of the reference and of the target."""

    config: SequenceDemoConfig
    reference: SequenceScores
    target: SequenceScores
    runs: list[SequenceRun]
    model: str  # one line: the architecture and size
    warm_start_loss: float
    seconds: float

    def run(self, method: str) -> SequenceRun:
        for run in self.runs:
            if run.method == method:
                return run
        raise KeyError(f"no run of method {method!r}; ran {[r.method for r in self.runs]}")

    def to_json(self) -> dict:
        return {
            "seed": self.config.seed,
            "reference": self.reference.to_dict(),
            "target": self.target.to_dict(),
            "methods": {r.method: {**r.final.to_dict(), "seconds": round(r.seconds, 2)} for r in self.runs},
            "history": {r.method: r.history for r in self.runs},
            "warm_start_loss": self.warm_start_loss,
            "seconds": round(self.seconds, 2),
        }


def config_to_json(config: SequenceDemoConfig) -> dict:
    out = asdict(config)
    out["sums"] = list(config.sums)
    out["methods"] = list(config.methods)
    out["beta_seq"] = config.beta_seq
    return out


def prepare(config: SequenceDemoConfig, on_step: StepCallback | None = None) -> SequenceSetup:
    """Build the task and the reference (random init + skewed warm start, seeded) and enumerate ``pi_ref``, ``p*``.

    ``on_step("warm start", seed, step)`` after each warm-start step.
    """
    task = config.task()
    model = build_policy(task, seed=config.seed, hidden_size=config.hidden_size, num_layers=config.num_layers)
    losses = warm_start(
        model,
        task,
        seed=config.seed,
        steps=config.warm_steps,
        lr=config.warm_lr,
        batch_size=config.warm_batch_size,
        zipf=config.warm_zipf,
        wrong_fraction=config.warm_wrong_fraction,
        on_step=None if on_step is None else (lambda step: on_step("warm start", config.seed, step)),
    )
    reference = model.eval().requires_grad_(False)
    correct = task.correct_table()
    ref_logprobs = exact_answer_logprobs(reference, task)
    log_target = target_logprobs(ref_logprobs, correct, config.beta_seq)
    tail = losses[-50:]
    return SequenceSetup(
        task, reference, correct, ref_logprobs, log_target, sum(tail) / len(tail) if tail else float("nan")
    )


def flowrl_step_loss(
    policy: torch.nn.Module,
    head: torch.nn.Module | None,
    reference: torch.nn.Module,
    sequences: torch.Tensor,
    rewards: torch.Tensor,
    config: SequenceDemoConfig,
) -> torch.Tensor:
    """FlowRL's loss on one on-policy batch ``sequences [B, 3 + L]`` (``B = P K``, grouped by prompt), raw
    ``rewards [B]``: the public flowloss functions, library defaults apart from the demo's ``config``."""
    k = config.group_size
    logprobs, hidden = answer_logprobs(policy, sequences)
    ref = reference_logprobs(reference, sequences)
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    r_hat = rewards if config.raw_rewards else flowloss.group_normalize_rewards(rewards, k)
    if config.log_z == "head":
        assert head is not None, "log_z='head' trains a LogZHead"
        prompt_mask = torch.zeros(sequences.shape, dtype=torch.bool)
        prompt_mask[:, :PROMPT_LENGTH] = True
        log_z = head(flowloss.pool_prompt_hidden_states(hidden, prompt_mask))
    else:
        log_z = flowloss.vargrad_log_z(
            logprobs, ref, r_hat, mask, k, beta=config.beta, length_normalization=config.length_normalization
        )
    return flowloss.trajectory_balance_loss(
        logprobs, ref, r_hat, log_z, mask, beta=config.beta, length_normalization=config.length_normalization
    )


@torch.no_grad()
def head_log_z(policy: torch.nn.Module, head: torch.nn.Module, task: DigitSumTask) -> torch.Tensor:
    """The head's ``log Z(x)`` of every prompt, ``[P]`` (eval mode: no dropout). The pooled hidden states of a
    prompt's tokens do not depend on the answer (causal model), so this is the value every batch sees."""
    was_training = policy.training, head.training
    policy.eval()
    head.eval()
    try:
        prompts = task.prompt_ids()
        hidden = policy(input_ids=prompts, output_hidden_states=True).hidden_states[-1]
        return head(flowloss.pool_prompt_hidden_states(hidden, torch.ones(prompts.shape, dtype=torch.bool)))
    finally:
        policy.train(was_training[0])
        head.train(was_training[1])


def grpo_step_loss(
    policy: torch.nn.Module, reference: torch.nn.Module, sequences: torch.Tensor, rewards: torch.Tensor, k: int
) -> torch.Tensor:
    """The GRPO baseline's loss on the same batch (on policy: ``old = logprobs.detach()``, ratio 1)."""
    logprobs, _ = answer_logprobs(policy, sequences)
    ref = reference_logprobs(reference, sequences)
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    return grpo_loss(logprobs, logprobs.detach(), ref, flowloss.group_normalize_rewards(rewards, k), mask)


def train_method(
    method: str, setup: SequenceSetup, config: SequenceDemoConfig, on_step: StepCallback | None = None
) -> SequenceRun:
    """Train a copy of the reference with ``method`` for ``config.steps`` steps; exact scores along the way.

    Reproducible per seed: the sample stream has its own generator and the global RNG (the log-Z head's dropout)
    is seeded inside a fork, so a run does not depend on what ran before it in the process.
    """
    if method not in SEQUENCE_METHODS:
        raise ValueError(f"`method` must be one of {SEQUENCE_METHODS}, got {method!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        return _train_method(method, setup, config, on_step)


def _train_method(
    method: str, setup: SequenceSetup, config: SequenceDemoConfig, on_step: StepCallback | None
) -> SequenceRun:
    start = time.perf_counter()
    task = setup.task
    policy = copy.deepcopy(setup.reference).train().requires_grad_(True)
    head = None
    groups: list[dict[str, Any]] = [{"params": list(policy.parameters()), "lr": config.lr}]
    if method == "flowrl" and config.log_z == "head":
        hidden_size = int(cast(Any, policy).config.hidden_size)  # a transformers model: its config is untyped here
        head = flowloss.LogZHead(hidden_size).train()
        lr = config.lr if config.lr_log_z is None else config.lr_log_z
        groups.append({"params": list(head.parameters()), "lr": lr})
    optimizer = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(config.seed + 1)  # the same sample stream seed for every method
    prompts = task.prompt_ids().repeat_interleave(config.group_size, dim=0)
    sums = task.sum_of_prompt().repeat_interleave(config.group_size, dim=0)
    history: dict[str, list[float]] = {"step": [], **{key: [] for key in HISTORY_KEYS}}

    if head is not None:
        history["log_z"] = []

    def record(step: int) -> SequenceScores:
        scores = score(exact_answer_logprobs(policy, task), setup.correct, setup.log_target,
                       samples=config.distinct_samples)
        history["step"].append(step)
        for key, value in scores.to_dict().items():
            history[key].append(value)
        if head is not None:
            history["log_z"].append(float(head_log_z(policy, head, task).mean()))
        return scores

    final = record(0)
    for step in range(1, config.steps + 1):
        sequences = sample_answers(policy, prompts, task.answer_length, gen)
        rewards = task.rewards(sums, sequences[:, PROMPT_LENGTH:])
        if method == "flowrl":
            loss = flowrl_step_loss(policy, head, setup.reference, sequences, rewards, config)
        else:
            loss = grpo_step_loss(policy, setup.reference, sequences, rewards, config.group_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
        optimizer.step()
        if step % config.eval_every == 0 or step == config.steps:
            final = record(step)
        if on_step is not None:
            on_step(method, config.seed, step)
    return SequenceRun(method, SEQUENCE_LABELS[method], config.seed, final, history, time.perf_counter() - start)


def run_sequence_demo(config: SequenceDemoConfig, on_step: StepCallback | None = None) -> SequenceDemoResult:
    """Prepare the reference, train every method of ``config.methods``, score them; one seed.

    Runs single-threaded (the model is tiny; threads only add contention) and restores the thread count after.
    ``config.trainer = "trl"`` runs the methods through TRL (`flowloss.demo.sequence_trl`).
    """
    config.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        setup = prepare(config, on_step)
        if config.trainer == "trl":
            from flowloss.demo.sequence_trl import train_method_trl as train
        else:
            train = train_method
        runs = [train(method, setup, config, on_step) for method in config.methods]
    finally:
        torch.set_num_threads(threads)
    samples = config.distinct_samples
    return SequenceDemoResult(
        config=config,
        reference=score(setup.ref_logprobs, setup.correct, setup.log_target, samples=samples),
        target=score(setup.log_target, setup.correct, setup.log_target, samples=samples),
        runs=runs,
        model=describe_model(setup.reference),
        warm_start_loss=setup.warm_start_loss,
        seconds=time.perf_counter() - start,
    )

"""Train one tabular policy per method from the same start on the same budget, and score it exactly.

Methods (each step: ``groups`` groups of ``group_size`` responses sampled on-policy, one Adam step):

* ``"flowrl"``: `flowloss.trajectory_balance_loss` on group-z-scored rewards
  ``r_hat = group_normalize_rewards(r, K)`` (as the FlowRL recipe), a learned ``log Z``
  (`flowloss.LogZTable`), sequence-level log-likelihoods (``length_normalization=False``), and the
  temperature ``beta_hat = beta * sigma*`` (``sigma*``, ``mu*``: reward std and mean under ``p*``).
  Reasoning: at ``pi = p*`` the population z-score gives ``beta_hat r_hat = beta (r - mu*)``, the shift is
  absorbed by ``log Z``, so ``p*`` would be a fixed point. It is only approximately one: the group's sample
  mean and std replace ``mu*, sigma*``, and the std follows the policy's own reward spread (a narrower policy
  gets a larger effective temperature ``beta_hat / std``).
  The demo reports how far this variant lands from ``p*``.
* ``"flowrl-raw"``: the same loss on raw rewards with ``beta``: Proposition 1 holds exactly and the target
  is ``p*``; this is the variant whose fixed point is known.
* ``"grpo"``: the BASELINE `flowloss.demo.baselines.grpo_loss` (reward maximization), same ``r_hat``.
* ``"reverse-kl"``: `flowloss.reverse_kl_surrogate` with the VarGrad baseline ``-vargrad_log_z``.

All start from ``pi = pi_ref`` with the same sampling seed and optimizer; only the loss differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

import flowloss
from flowloss.demo.baselines import grpo_loss
from flowloss.demo.problem import DEFAULT_HEIGHTS, ExactTarget, TabularProblem, exact_target, make_problem

METHODS: tuple[str, ...] = ("flowrl", "flowrl-raw", "grpo", "reverse-kl")
METHOD_LABELS: dict[str, str] = {
    "flowrl": "FlowRL (TB, z-scored r)",
    "flowrl-raw": "FlowRL (TB, raw r)",
    "grpo": "GRPO (baseline)",
    "reverse-kl": "reverse-KL surrogate",
}


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; the defaults run all four methods in a few seconds on one CPU core."""

    seed: int = 0
    steps: int = 400
    beta: float = 10.0  # reward temperature of the target p* on raw rewards in [0, 1]
    groups: int = 4  # prompts' worth of groups per step (one prompt, repeated)
    group_size: int = 8  # K responses per group: FlowRL's authors' value
    lr: float = 0.05  # Adam, policy table
    lr_log_z: float = 0.1  # Adam, log Z
    grpo_kl_coef: float = 0.0
    vocab_size: int = 8
    length: int = 4
    heights: tuple[float, ...] = DEFAULT_HEIGHTS
    ref_scale: float = 0.5  # std of pi_ref's logits: a mildly peaked random reference
    coverage_fraction: float = 0.5  # a mode is covered when pi(y^(m)) >= fraction * p*(y^(m))
    eval_every: int = 10
    eval_samples: int = 1024
    methods: tuple[str, ...] = METHODS

    def validate(self) -> None:
        for name in ("steps", "groups", "eval_every", "eval_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(
                f"`group_size` must be an int >= 2 (z-scores need two responses), got {self.group_size!r}"
            )
        for name in ("beta", "lr", "lr_log_z"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.grpo_kl_coef) and self.grpo_kl_coef >= 0):
            raise ValueError(f"`grpo_kl_coef` must be a finite number >= 0, got {self.grpo_kl_coef!r}")
        if not 0 < self.coverage_fraction <= 1:
            raise ValueError(f"`coverage_fraction` must be in (0, 1], got {self.coverage_fraction!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"`methods` must be a non-empty subset of {METHODS}, got {self.methods!r}")


@dataclass
class MethodResult:
    """Exact scores of one trained policy (and of ``pi_ref``/``p*`` for the reference rows)."""

    method: str
    label: str
    kl_pi_target: float  # KL(pi || p*)
    kl_target_pi: float  # KL(p* || pi)
    mode_mass: list[float]  # pi(y^(m))
    modes_covered: int  # #{m : pi(y^(m)) >= fraction * p*(y^(m))}
    mean_reward: float  # E_{y ~ pi} r(y), exact
    distinct_sequences: int  # distinct sequences among `eval_samples` draws from pi
    log_z: float | None = None  # learned log Z (TB methods), to compare with the true log Z
    history: dict[str, list[float]] = field(default_factory=dict)  # step, kl_pi_target, kl_target_pi


def _scores(problem: TabularProblem, target: ExactTarget, logits: torch.Tensor, config: DemoConfig, gen):
    with torch.no_grad():
        log_pi = problem.sequence_logprobs(logits, target.sequences)
        pi = log_pi.exp()
        p = target.log_target.exp()
        kl_fwd = float((pi * (log_pi - target.log_target)).sum())
        kl_rev = float((p * (target.log_target - log_pi)).sum())
        mode_mass = pi[target.mode_rows]
        covered = int((mode_mass >= config.coverage_fraction * target.mode_mass).sum())
        mean_reward = float((pi * target.rewards).sum())
        draws = problem.sample(logits, config.eval_samples, gen)
        distinct = int(torch.unique(draws, dim=0).shape[0])
    return kl_fwd, kl_rev, mode_mass.tolist(), covered, mean_reward, distinct


def _exact_kls(problem: TabularProblem, target: ExactTarget, logits: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        log_pi = problem.sequence_logprobs(logits, target.sequences)
        p = target.log_target.exp()
        return float((log_pi.exp() * (log_pi - target.log_target)).sum()), float(
            (p * (target.log_target - log_pi)).sum()
        )


def _method_loss(method, problem, config, target, logits, log_z_table, seqs, rewards):
    """The scalar loss of ``method`` on one on-policy batch ``seqs [B, L]`` with raw ``rewards [B]``."""
    lp = problem.token_logprobs(logits, seqs)
    ref = problem.token_logprobs(problem.ref_logits, seqs)
    mask = torch.ones_like(lp, dtype=torch.bool)
    k = config.group_size
    if method == "flowrl":
        r_hat = flowloss.group_normalize_rewards(rewards, k)
        log_z = log_z_table(torch.zeros(seqs.shape[0], dtype=torch.int64))
        return flowloss.trajectory_balance_loss(
            lp,
            ref,
            r_hat,
            log_z,
            mask,
            beta=config.beta * target.reward_std(),
            old_logprobs=lp.detach(),
            length_normalization=False,
        )
    if method == "flowrl-raw":
        log_z = log_z_table(torch.zeros(seqs.shape[0], dtype=torch.int64))
        return flowloss.trajectory_balance_loss(
            lp,
            ref,
            rewards,
            log_z,
            mask,
            beta=config.beta,
            old_logprobs=lp.detach(),
            length_normalization=False,
        )
    if method == "grpo":
        adv = flowloss.group_normalize_rewards(rewards, k)
        return grpo_loss(lp, lp.detach(), ref, adv, mask, kl_coef=config.grpo_kl_coef)
    if method == "reverse-kl":
        log_z_hat = flowloss.vargrad_log_z(
            lp, ref, rewards, mask, k, beta=config.beta, length_normalization=False
        )
        return flowloss.reverse_kl_surrogate(
            lp, ref, rewards, mask, beta=config.beta, baseline=-log_z_hat, length_normalization=False
        )
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")


def train_method(
    method: str, problem: TabularProblem, target: ExactTarget, config: DemoConfig
) -> MethodResult:
    """Train ``pi`` (initialized at ``pi_ref``) with ``method`` for ``config.steps`` steps, score it."""
    gen = torch.Generator().manual_seed(config.seed + 1)  # the same sample stream seed for every method
    logits = torch.nn.Parameter(problem.ref_logits.clone())
    log_z_table = flowloss.LogZTable(1).to(torch.float64)
    optimizer = torch.optim.Adam(
        [{"params": [logits], "lr": config.lr}, {"params": log_z_table.parameters(), "lr": config.lr_log_z}]
    )
    batch = config.groups * config.group_size
    history: dict[str, list[float]] = {"step": [], "kl_pi_target": [], "kl_target_pi": []}

    def record(step: int) -> None:
        fwd, rev = _exact_kls(problem, target, logits)
        history["step"].append(step)
        history["kl_pi_target"].append(fwd)
        history["kl_target_pi"].append(rev)

    record(0)
    for step in range(1, config.steps + 1):
        seqs = problem.sample(logits, batch, gen)
        rewards = problem.rewards(seqs)
        loss = _method_loss(method, problem, config, target, logits, log_z_table, seqs, rewards)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.eval_every == 0 or step == config.steps:
            record(step)
    fwd, rev, mass, covered, mean_reward, distinct = _scores(problem, target, logits.detach(), config, gen)
    log_z = float(log_z_table.log_z.detach()[0]) if method.startswith("flowrl") else None
    return MethodResult(
        method, METHOD_LABELS[method], fwd, rev, mass, covered, mean_reward, distinct, log_z, history
    )


@dataclass
class DemoResult:
    config: DemoConfig
    log_z_true: float
    beta_hat: float  # temperature used with z-scored rewards (beta * sigma*)
    target: MethodResult  # the row of p* itself
    reference: MethodResult  # the row of pi_ref (= every method's start)
    methods: list[MethodResult]

    def to_json(self) -> dict:
        out = asdict(self)
        out["config"]["heights"] = list(self.config.heights)
        out["config"]["methods"] = list(self.config.methods)
        return out


def run_demo(config: DemoConfig) -> DemoResult:
    """Build the problem, enumerate ``p*``, train every method in ``config.methods`` and score them.

    Runs single-threaded (the ops are tiny; threads only add contention) and restores the thread count after.
    """
    config.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig) -> DemoResult:
    torch.manual_seed(config.seed)
    problem = make_problem(
        seed=config.seed,
        vocab_size=config.vocab_size,
        length=config.length,
        heights=config.heights,
        ref_scale=config.ref_scale,
    )
    target = exact_target(problem, config.beta)
    gen = torch.Generator().manual_seed(config.seed + 2)
    # p* as a tabular policy: its exact conditionals are not needed, only its scores, computed directly.
    p = target.log_target.exp()
    draws = target.sequences[torch.multinomial(p, config.eval_samples, replacement=True, generator=gen)]
    target_row = MethodResult(
        "target",
        "target p*",
        0.0,
        0.0,
        target.mode_mass.tolist(),
        len(config.heights),
        float((p * target.rewards).sum()),
        int(torch.unique(draws, dim=0).shape[0]),
        target.log_z,
    )
    ref_scores = _scores(problem, target, problem.ref_logits, config, gen)
    reference_row = MethodResult("reference", "pi_ref (start)", *ref_scores)
    results = [train_method(m, problem, target, config) for m in config.methods]
    return DemoResult(
        config, target.log_z, config.beta * target.reward_std(), target_row, reference_row, results
    )

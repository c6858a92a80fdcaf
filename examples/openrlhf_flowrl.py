"""FlowRL inside OpenRLHF's ActorPPOTrainer on CPU: a tiny random Qwen2 policy, three training steps.

Runs OpenRLHF's real ``Actor`` and ``ActorPPOTrainer.training_step`` (subclassed by flowloss) on experience
batches shaped as OpenRLHF's experience maker builds them. What a GPU run has and this example has not:
DeepSpeed (``MinimalStrategy`` below does the backward / optimizer step a DeepSpeed engine would do), vLLM
generation (responses here are random tokens), Ray, and a reward model (a toy reward function).

On a machine without flash-attn and vllm (any CPU machine) put the test stand-ins on the path first::

    PYTHONPATH=tests/adapters/openrlhf/standins python examples/openrlhf_flowrl.py

``--logprobs framework|logits|hidden`` picks the actor's log-prob path (default ``auto``); ``--vocab``,
``--hidden``, ``--prompts``, ``--group``, ``--prompt-len``, ``--response-len`` and ``--dtype`` size the
problem, and the last line reports the process's peak memory above the built model and the time per step (run
each path in a fresh process to compare them).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from openrlhf.models import Actor
from openrlhf.trainer.ppo_utils.experience import Experience
from transformers import Qwen2Config, Qwen2ForCausalLM

import flowloss
from flowloss.adapters.openrlhf import (
    FlowRLActorPPOTrainer,
    FlowRLConfig,
    attach_log_z_head,
    use_flowrl_logprobs,
)

VOCAB, PAD = 64, 0


def tiny_model(seed: int, *, vocab: int = VOCAB, hidden: int = 32, layers: int = 2, tie: bool = False,
               bias: bool = False, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """A random Qwen2 policy; ``tie`` shares the lm_head weight with the embeddings, ``bias`` gives the lm_head a
    bias (Qwen2's has none); ``dtype`` its parameters' (OpenRLHF trains in bfloat16 by default)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(config).float()
    model.config.use_cache = False  # as OpenRLHF's Actor sets it (and packed samples need it without flash-attn)
    if bias:
        head = torch.nn.Linear(hidden, vocab, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0.0, 0.5)
        if tie:
            head.weight = model.model.embed_tokens.weight
        model.lm_head = head
    return model.to(dtype)


def with_lora(model: Qwen2ForCausalLM) -> torch.nn.Module:
    """LoRA adapters on the attention projections, as OpenRLHF's ``Actor`` adds them (``--ds.lora.rank``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    model.enable_input_require_grads()
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0, bias="none")
    return get_peft_model(model, config)


def openrlhf_args(**overrides) -> SimpleNamespace:
    """The parts of ``train_ppo_ray``'s nested args that ``ActorPPOTrainer`` reads, with FlowRL's settings:
    ``--algo.kl.init_coef > 0 --algo.kl.use_loss --algo.advantage.estimator group_norm``."""
    ns = SimpleNamespace
    args = ns(
        train=ns(max_epochs=1, dynamic_batch_enable=False, colocate_all=False, async_enable=False),
        actor=ns(eps_clip_low_high=(0.2, 0.28), dual_clip=None, loss_agg_mode="seq-mean-token-mean",
                 policy_loss_type="ppo", aux_loss_coef=0.0, entropy_coef=None),
        algo=ns(advantage=ns(estimator="group_norm", is_correction_level="off", is_correction_mode="mask",
                             is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0)),
                kl=ns(use_loss=True, init_coef=1e-3, estimator="k1", unbiased_gradient=False)),
        ds=ns(packing_samples=False, tensor_parallel_size=1, zero_stage=2),
        vllm=ns(sync_backend="gloo"),
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


class MinimalStrategy:
    """What ``training_step`` asks of OpenRLHF's DeepspeedStrategy, done by plain PyTorch on one process."""

    def __init__(self, args: SimpleNamespace) -> None:
        self.args = args
        self.ring_attn_group = None
        self.accumulated_gradient = 1

    def backward(self, loss, model, optimizer, **kwargs):
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name="model", **kwargs):
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    def get_grad_norm(self, model):
        return 0.0

    def is_rank_0(self):
        return True


@contextlib.contextmanager
def cpu_compat():
    """OpenRLHF's trainer constructor asks CUDA for the current device (its replay buffer's target, unused by
    ``training_step``) and syncs CUDA after a barrier; on a CPU-only torch both would raise."""
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device, ppo_actor.torch_dist_barrier_and_cuda_sync
    torch.cuda.current_device, ppo_actor.torch_dist_barrier_and_cuda_sync = (lambda: 0), dist.barrier
    try:
        yield
    finally:
        torch.cuda.current_device, ppo_actor.torch_dist_barrier_and_cuda_sync = saved


def make_actor(model: torch.nn.Module, *, temperature: float = 1.0, packing: bool = False) -> Actor:
    actor = Actor(model, temperature=temperature)
    actor.packing_samples = packing  # Actor sets this only when it loads a model from a path
    return actor


def build_trainer(config: FlowRLConfig, *, lr: float = 1e-2, seed: int = 0, temperature: float = 1.0,
                  packing: bool = False, lora: bool = False, checkpointing: bool = False, **model_options):
    """Policy + head (attached before the optimizer is built, as before ``strategy.prepare``), trainer and
    reference actor (log-probs on the same path as the policy's). ``model_options``: `tiny_model`'s."""
    policy = tiny_model(seed, **model_options)
    actor = make_actor(with_lora(policy) if lora else policy, temperature=temperature, packing=packing)
    if checkpointing:  # --actor.gradient_checkpointing_enable
        actor.gradient_checkpointing_enable()
    head = attach_log_z_head(actor.model, config)
    optimizer = torch.optim.SGD([p for p in actor.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = openrlhf_args()
    args.ds.packing_samples = packing
    strategy = MinimalStrategy(args)
    with cpu_compat():
        trainer = FlowRLActorPPOTrainer(
            strategy, actor, None, optimizer, scheduler, micro_train_batch_size=4, flowrl=config
        )
    # the reference policy starts as the policy, as in RL fine-tuning
    reference = make_actor(tiny_model(seed, **model_options), temperature=temperature, packing=packing)
    reference.eval()
    use_flowrl_logprobs(reference, config.logprobs)
    return trainer, head, reference


def toy_reward(responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of even token ids in the response."""
    return ((responses % 2 == 0) & mask).sum(-1).float() / mask.sum(-1).clamp_min(1).float()


@torch.no_grad()
def make_experience(trainer, reference, *, prompts: int = 2, group: int = 4, prompt_len: int = 5,
                    response_len: int = 6, seed: int = 0, vocab: int = VOCAB) -> Experience:
    """Left-padded prompts + right-padded sampled responses, log-probs of the old and reference policies,
    group-normalized advantages: the fields OpenRLHF's experience maker fills."""
    g = torch.Generator().manual_seed(seed)
    batch = prompts * group
    prompt = torch.randint(3, vocab, (prompts, prompt_len), generator=g).repeat_interleave(group, 0)
    prompt_mask = torch.ones_like(prompt)
    for i in range(batch):  # left padding of varied depth
        pad = (i // group) % 3
        prompt[i, :pad], prompt_mask[i, :pad] = PAD, 0
    response = torch.randint(3, vocab, (batch, response_len), generator=g)
    lengths = torch.randint(1, response_len + 1, (batch,), generator=g)
    action_mask = torch.arange(response_len)[None, :] < lengths[:, None]
    response = torch.where(action_mask, response, torch.full_like(response, PAD))
    sequences = torch.cat([prompt, response], dim=1)
    attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
    actor = trainer.actor  # PolicyModelActor.forward: the old policy's log-probs, no gradient
    actor.eval()
    old = actor(sequences, action_mask, attention_mask)
    actor.train()
    ref = reference(sequences, action_mask, attention_mask)  # ReferenceModelActor.forward
    rewards = toy_reward(response, action_mask)
    r_hat = flowloss.group_normalize_rewards(rewards, group)
    return Experience(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
        action_log_probs=old, base_action_log_probs=ref,
        advantages=r_hat[:, None] * action_mask, returns=r_hat[:, None] * action_mask,
        rewards=rewards, response_length=lengths.float(), total_length=attention_mask.sum(-1).float(),
        index=list(range(batch)), info={},
    )


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(steps: int = 3, *, logprobs: str = "auto", vocab: int = VOCAB, hidden: int = 32, prompts: int = 2,
         group: int = 4, prompt_len: int = 5, response_len: int = 6, dtype: str = "float32") -> list[float]:
    owns_group = not dist.is_initialized()
    if owns_group:  # OpenRLHF's trainer calls torch.distributed.barrier(): one process, file store
        import tempfile

        store = f"file://{tempfile.mkdtemp()}/store"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        trainer, _, reference = build_trainer(FlowRLConfig(logprobs=logprobs), vocab=vocab, hidden=hidden,
                                              dtype=getattr(torch, dtype))
        print(f"log-prob path: {trainer.flowrl_logprobs} (--flowrl.logprobs {logprobs})")
        built = _rss_mib()
        sizes = dict(prompts=prompts, group=group, prompt_len=prompt_len, response_len=response_len, vocab=vocab)
        losses, seconds = [], []
        for step in range(steps):
            start = time.perf_counter()
            experience = make_experience(trainer, reference, seed=step, **sizes)
            if step == 0:
                forwards = _peak_mib()
            status = trainer.training_step(experience, kl_ctl=0.0, step=step)
            seconds.append(time.perf_counter() - start)
            metrics = status["metrics"]
            losses.append(float(metrics["policy_loss"]))
            log_z = float(metrics["flowrl_log_z_mean"])
            residual = float(metrics["flowrl_residual_abs_mean"])
            print(f"step {step}: FlowRL loss {losses[-1]:.4f}  log Z {log_z:+.4f}  |delta| {residual:.4f}")
        best = min(seconds[1:] or seconds)
        print(f"peak above the built model ({built:.0f} MiB): {forwards - built:.0f} MiB in the old-policy and "
              f"reference forwards, {_peak_mib() - built:.0f} MiB with the training step; fastest step "
              f"{best:.2f} s (both forwards, the training forward, backward and update)")
        return losses
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logprobs", default="auto", choices=("auto", "framework", "logits", "hidden"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per batch (x --group responses)")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=5)
    parser.add_argument("--response-len", type=int, default=6)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the policy's")
    cli = parser.parse_args()
    main(cli.steps, logprobs=cli.logprobs, vocab=cli.vocab, hidden=cli.hidden, prompts=cli.prompts,
         group=cli.group, prompt_len=cli.prompt_len, response_len=cli.response_len, dtype=cli.dtype)

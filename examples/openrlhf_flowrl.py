"""FlowRL inside OpenRLHF's ActorPPOTrainer on CPU: a tiny random Qwen2 policy, three training steps.

Runs OpenRLHF's real ``Actor`` and ``ActorPPOTrainer.training_step`` (subclassed by flowloss) on experience
batches shaped as OpenRLHF's experience maker builds them. What a GPU run has and this example has not:
DeepSpeed (``MinimalStrategy`` below does the backward / optimizer step a DeepSpeed engine would do), vLLM
generation (responses here are random tokens), Ray, and a reward model (a toy reward function).

On a machine without flash-attn and vllm (any CPU machine) put the test stand-ins on the path first::

    PYTHONPATH=tests/adapters/openrlhf/standins python examples/openrlhf_flowrl.py
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist
from openrlhf.models import Actor
from openrlhf.trainer.ppo_utils.experience import Experience
from transformers import Qwen2Config, Qwen2ForCausalLM

import flowloss
from flowloss.adapters.openrlhf import FlowRLActorPPOTrainer, FlowRLConfig, attach_log_z_head

VOCAB, PAD = 64, 0


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).float()


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


def build_trainer(config: FlowRLConfig, *, lr: float = 1e-2, seed: int = 0):
    """Policy + head (attached before the optimizer is built, as before ``strategy.prepare``), trainer and
    reference model."""
    actor = Actor(tiny_model(seed))
    actor.packing_samples = False  # Actor sets this only when it loads a model from a path
    head = attach_log_z_head(actor.model, config)
    optimizer = torch.optim.SGD(actor.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    strategy = MinimalStrategy(openrlhf_args())
    with cpu_compat():
        trainer = FlowRLActorPPOTrainer(
            strategy, actor, None, optimizer, scheduler, micro_train_batch_size=4, flowrl=config
        )
    reference = tiny_model(seed)  # the reference policy starts as the policy, as in RL fine-tuning
    reference.eval()
    return trainer, head, reference


def toy_reward(responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of even token ids in the response."""
    return ((responses % 2 == 0) & mask).sum(-1).float() / mask.sum(-1).clamp_min(1).float()


@torch.no_grad()
def make_experience(trainer, reference, *, prompts: int = 2, group: int = 4, prompt_len: int = 5,
                    response_len: int = 6, seed: int = 0) -> Experience:
    """Left-padded prompts + right-padded sampled responses, log-probs of the old and reference policies,
    group-normalized advantages: the fields OpenRLHF's experience maker fills."""
    g = torch.Generator().manual_seed(seed)
    batch = prompts * group
    prompt = torch.randint(3, VOCAB, (prompts, prompt_len), generator=g).repeat_interleave(group, 0)
    prompt_mask = torch.ones_like(prompt)
    for i in range(batch):  # left padding of varied depth
        pad = (i // group) % 3
        prompt[i, :pad], prompt_mask[i, :pad] = PAD, 0
    response = torch.randint(3, VOCAB, (batch, response_len), generator=g)
    lengths = torch.randint(1, response_len + 1, (batch,), generator=g)
    action_mask = torch.arange(response_len)[None, :] < lengths[:, None]
    response = torch.where(action_mask, response, torch.full_like(response, PAD))
    sequences = torch.cat([prompt, response], dim=1)
    attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
    actor = trainer.actor
    actor.eval()
    old = actor(sequences, action_mask, attention_mask)
    actor.train()
    ref_actor = Actor(reference)
    ref_actor.packing_samples = False
    ref = ref_actor(sequences, action_mask, attention_mask)
    rewards = toy_reward(response, action_mask)
    r_hat = flowloss.group_normalize_rewards(rewards, group)
    return Experience(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
        action_log_probs=old, base_action_log_probs=ref,
        advantages=r_hat[:, None] * action_mask, returns=r_hat[:, None] * action_mask,
        rewards=rewards, response_length=lengths.float(), total_length=attention_mask.sum(-1).float(),
        index=list(range(batch)), info={},
    )


def main(steps: int = 3) -> list[float]:
    owns_group = not dist.is_initialized()
    if owns_group:  # OpenRLHF's trainer calls torch.distributed.barrier(): one process, file store
        import tempfile

        store = f"file://{tempfile.mkdtemp()}/store"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        trainer, _, reference = build_trainer(FlowRLConfig())
        losses = []
        for step in range(steps):
            experience = make_experience(trainer, reference, seed=step)
            status = trainer.training_step(experience, kl_ctl=0.0, step=step)
            metrics = status["metrics"]
            losses.append(float(metrics["policy_loss"]))
            log_z = float(metrics["flowrl_log_z_mean"])
            residual = float(metrics["flowrl_residual_abs_mean"])
            print(f"step {step}: FlowRL loss {losses[-1]:.4f}  log Z {log_z:+.4f}  |delta| {residual:.4f}")
        return losses
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

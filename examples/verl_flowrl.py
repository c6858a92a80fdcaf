"""FlowRL's loss inside verl, on CPU: the worker's loss call on a real verl micro-batch.

Runs offline in the verl environment (``make test-adapter-verl`` builds it; ``.venv-verl/bin/python
examples/verl_flowrl.py``). It builds a micro-batch the way verl's actor worker sees it (left/right-padded
rollout tensors converted by verl's ``left_right_2_no_padding``, plus the global batch info the engine adds),
then calls the FlowRL loss exactly as ``FSDPEngine.forward_step`` calls ``loss_fn(model_output, data, dp_group)``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig
from verl.workers.utils.padding import left_right_2_no_padding

import flowloss
from flowloss.adapters.verl import FlowRLConfig, make_flowrl_loss_fn


def main() -> float:
    torch.manual_seed(0)
    n_prompts, k, prompt_len, response_len = 2, 4, 6, 8
    batch = n_prompts * k
    # Rollout side: left-padded prompts, right-padded responses, rewards -> GRPO advantages (group z-score).
    p_lens = torch.randint(2, prompt_len + 1, (batch,))
    r_lens = torch.randint(1, response_len + 1, (batch,))
    r_lens[0] = response_len
    prompt_mask = torch.arange(prompt_len) >= (prompt_len - p_lens).unsqueeze(1)
    response_mask = torch.arange(response_len) < r_lens.unsqueeze(1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    uid = torch.arange(batch) // k
    r_hat = flowloss.group_normalize_rewards(torch.randint(0, 2, (batch,)).float(), uid)
    old = -torch.rand(batch, response_len) * response_mask
    data = TensorDict({
        "prompts": torch.randint(1, 100, (batch, prompt_len)) * prompt_mask,
        "responses": torch.randint(1, 100, (batch, response_len)) * response_mask,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp_min(0),
        "response_mask": response_mask.long(),
        "old_log_probs": old,
        "ref_log_prob": -torch.rand(batch, response_len) * response_mask,
        "advantages": r_hat.unsqueeze(1) * response_mask,
    }, batch_size=[batch])
    data["input_ids"] = torch.cat([data["prompts"], data["responses"]], 1)
    micro_batch = left_right_2_no_padding(data)
    tu.assign_non_tensor(micro_batch, dp_size=1, global_batch_size=batch, batch_num_tokens=int(response_mask.sum()))

    # Model side: what FlowRLFSDPEngine returns - token log-probs over the packed sequence and log Z per prompt.
    seq_lens = (p_lens + r_lens).tolist()
    log_probs = torch.nested.nested_tensor_from_jagged(
        (-torch.rand(sum(seq_lens))).requires_grad_(),
        torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()]),
    )
    log_z = torch.zeros(batch, requires_grad=True)

    # The actor config verl builds from `actor_rollout_ref.actor` (use_kl_loss=True only to get ref log-probs).
    actor_config = FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=n_prompts, ppo_micro_batch_size_per_gpu=2,
                                   use_kl_loss=True, kl_loss_coef=0.0, rollout_n=k)
    loss_fn = make_flowrl_loss_fn(actor_config, FlowRLConfig(beta=15.0))
    loss, metrics = loss_fn(model_output={"log_probs": log_probs, "log_z": log_z}, data=micro_batch, dp_group=None)
    loss.backward()
    print(f"FlowRL loss {loss.item():.4f}  |dL/dlogZ| {log_z.grad.abs().sum().item():.4f}")
    for name in ("actor/flowrl/weight_mean", "actor/flowrl/residual_abs_mean", "actor/flowrl/clip_frac"):
        print(f"  {name} = {float(metrics[name].aggregate()):.4f}")
    return loss.item()


if __name__ == "__main__":
    main()

"""``FlowRLTrainer`` with PEFT (LoRA) against the real TRL and peft (``make test-adapter-trl``).

Two ways in, each trained for two steps on CPU on the tiny Qwen2 of ``examples/trl_flowrl.py``:

* ``peft_config=LoraConfig(...)``: TRL wraps the policy; LoRA starts at zero, so the policy as given is the base
  model, and the reference is the base model with the adapter disabled;
* a ``PeftModel`` whose adapter is already trained (non-zero ``lora_B``): the reference is a frozen ``"ref"``
  copy of that adapter, made by ``FlowRLTrainer`` because TRL 1.16 copies it only when its KL ``beta != 0``.

Checked: only the LoRA weights and the log-Z head train; the ``ref_per_token_logps`` that reach the loss are
the log-probs of the policy as it was when the trainer was built (recomputed with an independent model), not
of the updated policy; checkpoints hold a plain PEFT adapter plus ``flowrl_log_z_head.safetensors``, and
``_load_from_checkpoint`` (the resume path) restores the trained adapter, the reference and the head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.adapters.conftest import require_framework

ROOT = Path(__file__).resolve().parents[3]
LEARNING_RATE = 1e-2  # large enough that one update moves the policy's log-probs well above float32 noise
LOGPS_ATOL = 1e-5


@pytest.fixture(scope="module")
def adapter():  # the shared fixture's, with peft required too
    require_framework("trl")
    require_framework("peft")
    import flowloss.adapters.trl as module

    return module


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _base(policy_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(policy_dir)


def _trained_peft_model(policy_dir: str):
    """A PeftModel whose adapter is not the identity: lora_B drawn at random, as if trained before."""
    from peft import get_peft_model

    model = get_peft_model(_base(policy_dir), _lora_config())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    return model


def _trainer(adapter, example, policy_dir, case: str, output_dir: Path, **overrides):
    """``(trainer, the policy as built, merged into a plain HF model)`` for one way in."""
    from transformers import AutoTokenizer

    if case == "peft_config":
        model, kwargs = policy_dir, {"peft_config": _lora_config()}
        as_built = _base(policy_dir)  # LoRA starts at zero: the policy as given is the base model
    else:
        model, kwargs = _trained_peft_model(policy_dir), {}
        as_built = copy.deepcopy(model).merge_and_unload()  # base + the initial adapter, before the trainer
    trainer = adapter.FlowRLTrainer(
        model=model, reward_funcs=example.reward_distinct_chars,
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        args=example.make_config(str(output_dir), learning_rate=LEARNING_RATE, **overrides),
        train_dataset=example.Dataset.from_dict({"prompt": example.PROMPTS}), **kwargs,
    )
    return trainer, as_built.eval()


def _completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` log-probs of the batch's completions under ``model``: a plain forward, no fused head."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    p = batch["prompt_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, p - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)


def _masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).max())


@dataclass
class Run:
    case: str
    trainer: Any
    as_built: torch.nn.Module
    before: dict[str, torch.Tensor]
    # One entry per `_compute_loss` call: the batch the loss got and the policy's log-probs at that moment.
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    policy_logps: list[torch.Tensor] = field(default_factory=list)


@pytest.fixture(scope="module", params=["peft_config", "trained_adapter"])
def run(request, adapter, example, policy_dir, tmp_path_factory) -> Run:
    case = request.param
    out = tmp_path_factory.mktemp(case)
    trainer, as_built = _trainer(adapter, example, policy_dir, case, out / "run", save_strategy="steps",
                                 save_steps=2)
    record = Run(case, trainer, as_built, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    original = trainer._compute_loss

    def compute_loss(model, inputs):
        record.batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        record.policy_logps.append(_completion_logps(trainer.model, inputs))
        return original(model, inputs)

    trainer._compute_loss = compute_loss  # what TRL's compute_loss calls with the batch it built
    trainer.train()
    return record


def _adapter_names(names, adapter_name: str = "default") -> list[str]:
    return [n for n in names if "lora_" in n and f".{adapter_name}." in n]


def test_lora_training_moves_the_adapter_and_the_head_not_the_base_weights(adapter, run):
    trainer = run.trainer
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs), logs
    assert len(run.batches) == 2 and all("ref_per_token_logps" in b for b in run.batches)

    after = {n: p.detach() for n, p in trainer.model.named_parameters()}
    lora = _adapter_names(after)
    head = [n for n in after if f".{adapter.LOG_Z_HEAD_NAME}." in n]
    ref = _adapter_names(after, "ref")
    base = [n for n in after if n not in {*lora, *head, *ref}]
    assert len(lora) == 8 and head and base, (lora, head)  # q_proj and v_proj x A and B x 2 layers
    assert (len(ref) == 8) == (run.case == "trained_adapter"), ref
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {*lora, *head}, sorted(trainable ^ {*lora, *head})

    for name in lora:
        assert not torch.equal(run.before[name], after[name]), f"LoRA weight {name} did not change"
    assert any(not torch.equal(run.before[n], after[n]) for n in head), "log-Z head did not change"
    for name in base + ref:
        assert torch.equal(run.before[name], after[name]), f"frozen weight {name} changed"


def test_reference_logprobs_are_the_policy_as_built_not_the_updated_policy(run, policy_dir):
    """``ref_per_token_logps`` in the loss's batch == log-probs of the policy as it was when the trainer was
    built (base model for ``peft_config``; base + the initial adapter for a trained PeftModel), at every step."""
    base = _base(policy_dir).eval()
    for step, (batch, policy) in enumerate(zip(run.batches, run.policy_logps), start=1):
        mask = batch["completion_mask"].float()
        ref = batch["ref_per_token_logps"]
        expected = _completion_logps(run.as_built, batch)
        assert _masked_max_diff(ref, expected, mask) < LOGPS_ATOL, f"step {step}: reference != policy as built"
        moved = _masked_max_diff(policy, expected, mask)
        if step == 1:  # nothing trained yet: the policy is the policy as built
            assert moved < LOGPS_ATOL, f"step 1: policy != policy as built ({moved:.2e})"
        else:  # the check tells them apart: the updated policy is far from the reference
            assert moved > 100 * LOGPS_ATOL, f"step {step}: the policy did not move ({moved:.2e})"
        if run.case == "trained_adapter":  # ... and so would the base model with the adapter disabled
            from_base = _masked_max_diff(_completion_logps(base, batch), expected, mask)
            assert from_base > 100 * LOGPS_ATOL, f"the trained adapter changes nothing ({from_base:.2e})"


def test_checkpoint_is_a_plain_peft_adapter_with_the_head_beside_it(adapter, run, policy_dir):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    trainer = run.trainer
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", adapter.LOG_Z_HEAD_FILE} <= files, files
    assert "model.safetensors" not in files, files

    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(trainer.model, adapter_name="default")
    assert set(saved) == set(expected) and len(saved) == 8, sorted(set(saved) ^ set(expected))
    assert not any(adapter.LOG_Z_HEAD_NAME in k for k in saved), "head leaked into the adapter file"
    for name, value in expected.items():
        assert torch.equal(saved[name], value.cpu()), name
    saved_head = load_file(str(checkpoint / adapter.LOG_Z_HEAD_FILE))
    head = trainer.log_z_head.state_dict()
    assert set(saved_head) == set(head)
    for name, value in head.items():
        assert torch.equal(saved_head[name], value.cpu()), name

    # Plain PEFT: the base model from disk plus this folder is the trained policy.
    loaded = PeftModel.from_pretrained(_base(policy_dir), str(checkpoint)).eval()
    batch = run.batches[-1]
    trained = _completion_logps(trainer.model, batch)
    assert _masked_max_diff(_completion_logps(loaded, batch), trained, batch["completion_mask"].float()) < 1e-6


def test_resuming_restores_the_trained_adapter_the_reference_and_the_head(adapter, example, run, policy_dir,
                                                                         tmp_path):
    """Defect: resuming a run that started from a trained PeftModel kept the adapter the new trainer was built
    with. Its checkpoints hold the trained adapter at the top level and the frozen ``"ref"`` copy in ``ref/``, and
    transformers' ``Trainer._load_from_checkpoint`` loads only the sub-folder adapters when there are any."""
    trained = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters()}
    checkpoint = Path(run.trainer.args.output_dir) / "checkpoint-2"
    fresh, _ = _trainer(adapter, example, policy_dir, run.case, tmp_path)
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.model.named_parameters()), "nothing to restore"
    fresh._load_from_checkpoint(str(checkpoint))
    for name, param in fresh.model.named_parameters():
        assert torch.equal(param, trained[name]), f"{name} not restored"
    assert fresh.model.active_adapters == ["default"]
    trainable = {n for n, p in fresh.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in run.trainer.model.named_parameters() if p.requires_grad}

"""``FlowRLConfig``'s options and the trainer's head handling (``make test-adapter-trl``): issues 19, 20 and 21.

* every GRPO option FlowRL refuses is reported in one error (a user's script took three runs before);
* ``use_bias_correction_kl``, ``vllm_importance_sampling_mode`` and its clip bounds are refused (were ignored);
* ``flowrl_log_z_dtype`` can be set to None from the command line and is honoured; ``flowrl_log_z_zero_init``
  starts log Z at exactly ``flowrl_log_z_init``;
* ``flowrl_log_z_lr``: the head in its own optimizer group, trained at that rate (SGD: the step is ``-lr * grad``);
  an optimizer passed in ``optimizers=`` gets the head too;
* the head file: resuming without it fails naming the file; a corrupt file, a missing or an extra key fail
  naming the file;
* ``sync_ref_model=True`` syncs the reference without the head (it crashed at the first sync);
* a ``PeftModel`` whose LoRA uses ``target_parameters``: the reference is exact on every peft version.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.adapters.conftest import require_framework
from tests.adapters.trl.helpers import tiny_model


def _config(adapter, **overrides):
    return adapter.FlowRLConfig(output_dir=os.devnull, use_cpu=True, report_to="none", **overrides)


def _trainer(adapter, example, model, output_dir, **overrides):
    kwargs = {k: overrides.pop(k) for k in ("optimizers", "peft_config", "processing_class") if k in overrides}
    return adapter.FlowRLTrainer(
        model=model, reward_funcs=example.reward_distinct_chars,
        args=example.make_config(str(output_dir), **overrides),
        train_dataset=example.Dataset.from_dict({"prompt": example.PROMPTS}), **kwargs,
    )


# -- refusals ----------------------------------------------------------------------------------------------


def test_every_conflicting_option_is_reported_in_one_error(adapter):
    """Issue 20: the refused GRPO options were reported one per run."""
    with pytest.raises(ValueError) as caught:
        _config(adapter, beta=0.04, loss_type="grpo", entropy_coef=0.01, use_bias_correction_kl=True,
                flowrl_beta=-1.0)
    message = str(caught.value)
    assert message.startswith("5 options conflict with FlowRL"), message
    for name in ("`beta`", "`loss_type=", "`entropy_coef=", "`use_bias_correction_kl=", "`flowrl_beta`"):
        assert name in message, (name, message)


@pytest.mark.parametrize("option", [{"use_bias_correction_kl": True},
                                    {"vllm_importance_sampling_mode": "token_truncate"},
                                    {"vllm_importance_sampling_clip_min": 0.5},
                                    {"vllm_importance_sampling_clip_max": 5.0}])
def test_kl_bias_correction_and_vllm_is_options_are_refused(adapter, option):
    """Issue 19 item 10: these were accepted and silently ignored (FlowRL has no KL term; its vLLM correction is
    the truncated IS weight of `flowrl_tis_cap`)."""
    (name,) = option
    with pytest.raises(ValueError, match=f"`{name}=.*GRPO loss option"):
        _config(adapter, **option)


def test_a_grpo_script_that_leaves_them_alone_is_accepted(adapter):
    args = _config(adapter, use_vllm=False, vllm_importance_sampling_correction=True)
    assert args.use_bias_correction_kl is False and args.vllm_importance_sampling_mode == "sequence_mask"


# -- the head's options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["none", "None"])
def test_log_z_dtype_none_from_the_command_line(adapter, spelling):
    """Issue 19 item 8: ``--flowrl_log_z_dtype none`` reached LogZHeadOptions as the string and was refused."""
    from trl import TrlParser

    (args,) = TrlParser((adapter.FlowRLConfig,)).parse_args_and_config(
        ["--output_dir", os.devnull, "--use_cpu", "true", "--report_to", "none", "--flowrl_log_z_dtype", spelling,
         "--flowrl_log_z_lr", "0.01", "--flowrl_log_z_zero_init", "true"]
    )
    assert args.flowrl_log_z_dtype is None and args.flowrl_log_z_head.dtype is None
    assert args.flowrl_log_z_head.lr == 0.01 and args.flowrl_log_z_head.zero_init is True


@pytest.mark.parametrize("spelling", ["none", "None"])
def test_log_z_lr_none_from_the_command_line(adapter, spelling):
    """``--flowrl_log_z_lr none`` is the default (the head shares the policy's learning rate), not a parse error."""
    from trl import TrlParser

    (args,) = TrlParser((adapter.FlowRLConfig,)).parse_args_and_config(
        ["--output_dir", os.devnull, "--use_cpu", "true", "--report_to", "none", "--flowrl_log_z_lr", spelling]
    )
    assert args.flowrl_log_z_lr is None and args.flowrl_log_z_head.lr is None


@pytest.mark.parametrize("dtype,policy_dtype,expected", [("float64", torch.float32, torch.float64),
                                                         (None, torch.bfloat16, torch.bfloat16),
                                                         ("float32", torch.bfloat16, torch.float32)])
def test_the_heads_dtype_is_the_option(adapter, example, policy_dir, tmp_path, dtype, policy_dtype, expected):
    """Test gap of issue 19: the option could be dropped without a test failing."""
    model = tiny_model("qwen2", policy_dir).to(policy_dtype)
    trainer = _trainer(adapter, example, model, tmp_path, flowrl_log_z_dtype=dtype)
    assert {p.dtype for p in trainer.log_z_head.parameters()} == {expected}


def test_zero_init_starts_log_z_at_exactly_the_init_value(adapter, example, policy_dir, tmp_path):
    """Issue 20: log Z started +-0.6 away from `flowrl_log_z_init` (the output weight is random)."""
    pooled = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    exact = _trainer(adapter, example, policy_dir, tmp_path, flowrl_log_z_init=2.5, flowrl_log_z_zero_init=True)
    assert torch.equal(exact.log_z_head.eval()(pooled), torch.full((5,), 2.5))
    default = _trainer(adapter, example, policy_dir, tmp_path, flowrl_log_z_init=2.5)
    assert not torch.equal(default.log_z_head.eval()(pooled), torch.full((5,), 2.5))


class _RecordGrads:
    """A callback keeping each parameter's clipped gradient right before the optimizer step."""

    def __init__(self, model):
        from transformers import TrainerCallback

        record = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                record.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        self.callback = Callback()
        self.grads: dict[str, torch.Tensor] = {}


def test_log_z_lr_gives_the_head_its_own_group_and_rate(adapter, example, policy_dir, tmp_path):
    """Issue 21: ``flowrl_log_z_lr`` -- the head's parameters in their own optimizer group, stepped at that rate."""
    trainer = _trainer(adapter, example, policy_dir, tmp_path, max_steps=1, optim="sgd", learning_rate=1e-3,
                       lr_scheduler_type="constant", flowrl_log_z_lr=0.5, flowrl_log_z_dropout=0.0)
    head_ids = {id(p) for p in trainer.log_z_head.parameters()}
    optimizer = trainer.create_optimizer()
    head_groups = [g for g in optimizer.param_groups if any(id(p) in head_ids for p in g["params"])]
    assert len(head_groups) >= 1 and all(g["lr"] == 0.5 for g in head_groups)
    assert all(id(p) in head_ids for g in head_groups for p in g["params"])
    assert sum(len(g["params"]) for g in head_groups) == len(head_ids)
    assert {g["lr"] for g in optimizer.param_groups if g not in head_groups} == {1e-3}

    record = _RecordGrads(trainer.model)
    trainer.add_callback(record.callback)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    head_names = [n for n in before if "flowrl_log_z_head" in n]
    checked = 0
    for name, param in trainer.model.named_parameters():
        if name not in record.grads:
            continue
        lr = 0.5 if name in head_names else 1e-3
        torch.testing.assert_close(param.detach(), before[name] - lr * record.grads[name], rtol=1e-6, atol=1e-7,
                                   msg=name)
        checked += name in head_names
    assert checked == len(head_names)


def test_an_optimizer_passed_in_gets_the_head(adapter, example, policy_dir, tmp_path):
    """The optimizer of ``optimizers=(optimizer, None)`` is built before the trainer attaches the head, which then
    never trained; it now gets the head in a group of its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = _trainer(adapter, example, model, tmp_path, optimizers=(optimizer, None), flowrl_log_z_lr=0.25)
    head_ids = {id(p) for p in trainer.log_z_head.parameters()}
    groups = [g for g in trainer.optimizer.param_groups if any(id(p) in head_ids for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 0.25 and len(groups[0]["params"]) == len(head_ids)


# -- the head file -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(adapter, example, policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint")
    trainer = _trainer(adapter, example, policy_dir, out / "run")
    trainer.save_model(str(out / "saved"))
    return trainer, out / "saved"


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst / "flowrl_log_z_head.safetensors"


def test_resuming_without_the_head_file_fails_naming_it(adapter, checkpoint, tmp_path):
    """Issue 19 item 6: only a warning; the run went on with a fresh head and the old optimizer state."""
    trainer, saved = checkpoint
    head_file = _copy_checkpoint(saved, tmp_path / "ckpt")
    head_file.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(head_file))):
        trainer._load_from_checkpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("damage", ["corrupt", "extra_key", "missing_key", "wrong_shape"])
def test_a_damaged_head_file_fails_naming_it(adapter, checkpoint, tmp_path, damage):
    """Issue 19 item 6 and its test gap: a corrupt file's error did not name the file; loading non-strictly (a
    missing or an extra key) passed the tests."""
    from safetensors.torch import load_file, save_file

    trainer, saved = checkpoint
    head_file = _copy_checkpoint(saved, tmp_path / "ckpt")
    state = load_file(str(head_file))
    if damage == "corrupt":
        head_file.write_bytes(head_file.read_bytes()[:40])
    elif damage == "extra_key":
        save_file({**state, "unexpected.weight": torch.zeros(2)}, str(head_file))
    elif damage == "missing_key":
        save_file({k: v for k, v in state.items() if k != "out.bias"}, str(head_file))
    else:
        save_file({**state, "out.bias": torch.zeros(2)}, str(head_file))
    with pytest.raises(ValueError, match=re.escape(str(head_file))):
        trainer._load_from_checkpoint(str(tmp_path / "ckpt"))


# -- the reference -----------------------------------------------------------------------------------------


def test_sync_ref_model_mixes_the_policy_into_the_reference_without_the_head(adapter, example, policy_dir, tmp_path):
    """Issue 19 item 9: TRL's SyncRefModelCallback zips ref and policy parameters strictly and the policy also holds
    the head: ``ValueError: zip() argument 2 is longer than argument 1`` at the first sync. Now
    ref <- (1 - alpha) ref + alpha policy, parameter by parameter, after every ``ref_model_sync_steps`` steps."""
    trainer = _trainer(adapter, example, policy_dir, tmp_path, max_steps=1, sync_ref_model=True,
                       ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, learning_rate=1e-2)
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, param in trainer.ref_model.named_parameters():
        expected = 0.5 * ref_before[name] + 0.5 * policy[name].detach()
        torch.testing.assert_close(param.detach(), expected, msg=name)
    assert any(not torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())
    assert not any("flowrl_log_z_head" in n for n, _ in trainer.ref_model.named_parameters())


def _target_parameters_model(policy_dir, trained: bool):
    require_framework("peft")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.down_proj.weight"])
    model = get_peft_model(tiny_model("qwen2", policy_dir), config)
    if trained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
    return model


def test_target_parameters_adapter_reference(adapter, example, policy_dir, tmp_path, monkeypatch):
    """Issue 19 item 11 (trl#5222, peft#3340): peft < 0.20 allows one ``target_parameters`` adapter per model.
    There, an identity adapter needs no ``"ref"`` copy (the base model is the policy: TRL skips it too) and a
    trained one is refused with the reason; with peft >= 0.20 the trained adapter gets its frozen copy."""
    import peft

    model = _target_parameters_model(policy_dir, trained=True)
    trainer = _trainer(adapter, example, model, tmp_path / "new")
    assert "ref" in trainer.model.peft_config
    ref = {n: p for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert ref and not any(p.requires_grad for p in ref.values())

    monkeypatch.setattr(peft, "__version__", "0.19.1")
    fresh = _trainer(adapter, example, _target_parameters_model(policy_dir, trained=False), tmp_path / "old")
    assert "ref" not in fresh.model.peft_config
    with pytest.raises(ValueError, match=r"peft 0\.19\.1 allows one LoRA adapter with `target_parameters`"):
        _trainer(adapter, example, _target_parameters_model(policy_dir, trained=True), tmp_path / "refused")

"""The framework-free adapter core (`flowloss.adapters.common`): runs in the main venv (``make test-core``)."""

from __future__ import annotations

import argparse

import pytest
import torch

from flowloss.adapters.common import (
    AdapterConfig,
    LogZHeadOptions,
    attach_log_z_head,
    log_z_param_groups,
)

transformers = pytest.importorskip("transformers")


def _tiny_model() -> torch.nn.Module:
    config = transformers.Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


def test_zero_init_starts_log_z_at_exactly_log_z_init():
    pooled = torch.randn(5, 16) * 3
    with_zero = attach_log_z_head(_tiny_model(), LogZHeadOptions(init=2.5, zero_init=True)).eval()
    torch.testing.assert_close(with_zero(pooled), torch.full((5,), 2.5), rtol=0, atol=0)
    # The authors' head (random output weight) starts away from `init`: the docs say so.
    random_out = attach_log_z_head(_tiny_model(), LogZHeadOptions(init=2.5)).eval()
    assert (random_out(pooled) - 2.5).abs().max() > 1e-3


def test_log_z_param_groups_puts_the_head_in_its_own_group():
    model = _tiny_model()
    head = attach_log_z_head(model)
    groups = log_z_param_groups(model, 1e-3, weight_decay=0.1)
    head_ids = {id(p) for p in head.parameters()}
    assert [len(g["params"]) for g in groups] == [
        sum(1 for p in model.parameters() if id(p) not in head_ids),
        len(head_ids),
    ]
    assert {id(p) for p in groups[1]["params"]} == head_ids
    assert groups[1]["lr"] == 1e-3 and "lr" not in groups[0]
    assert groups[0]["weight_decay"] == groups[1]["weight_decay"] == 0.1
    optimizer = torch.optim.AdamW(groups, lr=1e-6)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-6, 1e-3]


def test_log_z_param_groups_without_a_rate_is_one_group_and_skips_frozen_parameters():
    model = _tiny_model()
    attach_log_z_head(model)
    model.lm_head.weight.requires_grad_(False)
    (group,) = log_z_param_groups(model, None)
    assert len(group["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(p.requires_grad for p in group["params"])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1e-3"])
def test_log_z_lr_is_refused_unless_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match="log_z_lr"):
        LogZHeadOptions(lr=bad)
    model = _tiny_model()
    attach_log_z_head(model)
    with pytest.raises(ValueError, match="log_z_lr"):
        log_z_param_groups(model, bad)


def test_log_z_param_groups_needs_an_attached_head():
    with pytest.raises(ValueError, match="no LogZHead"):
        log_z_param_groups(_tiny_model(), 1e-3)


def test_head_options_from_a_command_line():
    parser = argparse.ArgumentParser()
    AdapterConfig.add_arguments(parser)
    namespace = parser.parse_args(["--flowrl.log_z_lr", "1e-3", "--flowrl.log_z_zero_init", "true"])
    config = AdapterConfig.from_parsed(namespace, parser, dest_prefix="")
    assert config.log_z_head.lr == 1e-3 and config.log_z_head.zero_init is True
    assert AdapterConfig(log_z_lr="none").log_z_head.lr is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--flowrl.log_z_lr", "fast"])

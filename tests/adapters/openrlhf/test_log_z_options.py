"""``--flowrl.log_z_lr`` (the head in optimizer groups of its own) and ``--flowrl.log_z_zero_init``.

The optimizer is built by OpenRLHF's own ``DeepspeedStrategy.prepare((actor, cfg))`` (``_ds_init_train_model``:
its parameter groups, its DeepSpeed config, its learning-rate scheduler), inside the context the policy worker
uses; only ``deepspeed.initialize`` is replaced by what it does with those inputs on one process: a torch AdamW
over the given groups with the config's hyper-parameters, and the scheduler factory applied to it.
"""

from __future__ import annotations

from types import SimpleNamespace as ns

import pytest
import torch

ACTOR_LR, HEAD_LR, WEIGHT_DECAY = 1e-6, 1e-2, 0.1


def _prepare(adapter, example, monkeypatch, config):
    import deepspeed
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    from flowloss.adapters.openrlhf import _compat

    def initialize(model, optimizer, model_parameters, lr_scheduler, config, **kwargs):
        assert optimizer is None
        params = config["optimizer"]["params"]
        optim = torch.optim.AdamW(model_parameters, lr=params["lr"], betas=tuple(params["betas"]),
                                  eps=params["eps"], weight_decay=params["weight_decay"])
        return model, optim, None, lr_scheduler(optim)

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    args = example.openrlhf_args()
    args.ds.param_dtype = "fp32"
    strategy = DeepspeedStrategy(args=args, zero_stage=2, micro_train_batch_size=4, train_batch_size=8)
    actor = example.make_actor(example.tiny_model(0).double())  # float64: an update of 1e-6 is not rounded away
    cfg = dict(optim="adam", muon={}, adam=dict(lr=ACTOR_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WEIGHT_DECAY),
               lr_scheduler="constant", lr_warmup_ratio=0.0, min_lr_ratio=0.1, max_norm=1.0, scheduler_steps=10)
    with _compat.flowrl_on_prepare(strategy, config):
        actor, optim, _ = strategy.prepare((actor, cfg))
    assert "prepare" not in vars(strategy) and "_get_model_parameters" not in vars(strategy)
    return actor, optim


def _groups_of(actor, optim):
    names = {id(p): n for n, p in actor.model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in optim.param_groups]


def test_log_z_lr_puts_the_head_in_groups_of_its_own(adapter, example, monkeypatch):
    """Issue 21: with --flowrl.log_z_lr the head trains at its own rate; OpenRLHF's weight-decay split stays."""
    actor, optim = _prepare(adapter, example, monkeypatch, adapter.FlowRLConfig(log_z_lr=HEAD_LR))
    groups = _groups_of(actor, optim)
    head = [g for g in groups if any("flowrl_log_z_head" in n for n in g[0])]
    rest = [g for g in groups if g not in head]
    assert head and all(all("flowrl_log_z_head" in n for n in names) for names, _, _ in head)
    assert {lr for _, lr, _ in head} == {HEAD_LR} and {lr for _, lr, _ in rest} == {ACTOR_LR}
    assert {wd for _, _, wd in head} == {WEIGHT_DECAY, 0.0}  # the head's biases/norms are not decayed either
    named = dict(actor.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    loss = actor(*_batch(example), return_output=False).sum() + adapter.find_log_z_head(actor)(
        torch.randn(3, 32)).sum()
    loss.backward()
    optim.step()
    # Adam's first update of a parameter is lr * sign(grad) (plus the decay lr * wd * p): each group at its lr
    checked = set()
    for names, lr, wd in groups:
        for n in names:
            if named[n].grad is not None and bool((named[n].grad.abs() > 1e-4).all()):
                step = (before[n] - named[n].detach()) - lr * wd * before[n]
                torch.testing.assert_close(step.abs(), torch.full_like(step, lr), rtol=1e-3, atol=lr * 1e-3)
                checked.add(lr)
    assert checked == {ACTOR_LR, HEAD_LR}


def _batch(example):
    seq = torch.randint(3, example.VOCAB, (2, 8))
    attention = torch.ones_like(seq)
    action_mask = torch.ones(2, 3, dtype=torch.bool)
    return seq, action_mask, attention


def test_without_log_z_lr_the_head_shares_openrlhfs_groups(adapter, example, monkeypatch):
    """The authors' set-up (and OpenRLHF's groups, untouched): one learning rate for policy and head."""
    actor, optim = _prepare(adapter, example, monkeypatch, adapter.FlowRLConfig())
    groups = _groups_of(actor, optim)
    assert len(groups) == 2 and {lr for _, lr, _ in groups} == {ACTOR_LR}
    assert any("flowrl_log_z_head" in n for names, _, _ in groups for n in names)


def test_log_z_lr_is_refused_with_muon(adapter, example):
    from flowloss.adapters.openrlhf import _compat

    strategy = ns(optim="adam", _get_model_parameters=lambda model, **kw: (model, [p for p in model.parameters()]))
    actor = example.make_actor(example.tiny_model(0))
    adapter.attach_log_z_head(actor.model)
    with _compat.log_z_lr_on_optimizer(strategy, HEAD_LR), pytest.raises(ValueError, match="muon"):
        strategy._get_model_parameters(actor.model, optim="muon")
    args = example.openrlhf_args()
    args.ds.ring_attn_size, args.train.enable_ema, args.actor.optim = 1, False, "muon"
    with pytest.raises(ValueError, match=r"--flowrl\.log_z_lr cannot be used with --actor\.optim muon"):
        adapter._check_openrlhf_args(args, adapter.FlowRLConfig(log_z_lr=HEAD_LR))


def test_log_z_zero_init_starts_log_z_at_exactly_log_z_init(adapter, example):
    trainer, _, reference = example.build_trainer(
        adapter.FlowRLConfig(log_z_zero_init=True, log_z_init=2.5, log_z_dropout=0.0))
    experience = example.make_experience(trainer, reference)
    status = trainer.training_step(experience, kl_ctl=0.0, step=0)
    assert float(status["metrics"]["flowrl_log_z_mean"]) == 2.5  # the first step's log Z, before the update
    random_start = example.build_trainer(adapter.FlowRLConfig(log_z_init=2.5, log_z_dropout=0.0))
    assert not torch.equal(random_start[1](torch.randn(4, 32)), torch.full((4,), 2.5))

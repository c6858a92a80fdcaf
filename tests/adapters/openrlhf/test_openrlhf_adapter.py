"""FlowRL in OpenRLHF: the PolicyLoss twin against flowloss, the real ActorPPOTrainer.training_step on CPU."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowloss
from flowloss import reference
from tests.conftest import assert_close


def _batch(seed: int, b: int = 6, a: int = 5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, a, generator=g, dtype=dtype) * 3
    mask = torch.rand(b, a, generator=g) < 0.7
    mask[0] = False  # an empty response: legal, left out of the mean
    mask[1, 0] = True
    return dict(
        log_probs=lp,
        old=lp + 0.3 * torch.randn(b, a, generator=g, dtype=dtype),
        ref=-torch.rand(b, a, generator=g, dtype=dtype) * 3,
        r_hat=torch.randn(b, generator=g, dtype=dtype),
        log_z=torch.randn(b, generator=g, dtype=dtype),
        mask=mask,
    )


def test_forward_signature_matches_installed_policy_loss(adapter):
    from openrlhf.models.loss import PolicyLoss

    ours = list(inspect.signature(adapter.FlowRLPolicyLoss.forward).parameters)
    theirs = list(inspect.signature(PolicyLoss.forward).parameters)
    assert ours == theirs, f"PolicyLoss.forward takes {theirs}, FlowRLPolicyLoss.forward takes {ours}"


@pytest.mark.parametrize("mode", ["sequence_clipped", "sequence", "none"])
def test_policy_loss_equals_trajectory_balance_loss(adapter, mode):
    """OpenRLHF's call (advantages [B, A], action_mask, loss_batch_info) -> TB loss on r_hat = mean_t A_t."""
    x = _batch(0)
    cfg = adapter.FlowRLConfig(importance_weights=mode)
    loss_fn = adapter.FlowRLPolicyLoss(cfg)
    lp = x["log_probs"].clone().requires_grad_(True)
    log_z = x["log_z"].clone().requires_grad_(True)
    advantages = x["r_hat"][:, None] * x["mask"]
    with loss_fn.micro_batch(ref_log_probs=x["ref"], log_z=lambda: log_z):
        out = loss_fn(lp, x["old"], advantages, action_mask=x["mask"], rollout_log_probs=None, dp_size=1,
                      batch_num_tokens=None, global_batch_size=None)
    assert len(out) == 5 and out[3] is None and out[4] is None
    loss = out[0]
    lp2 = x["log_probs"].clone().requires_grad_(True)
    log_z2 = x["log_z"].clone().requires_grad_(True)
    expected = flowloss.trajectory_balance_loss(lp2, x["ref"], x["r_hat"], log_z2, x["mask"], beta=15.0,
                                                old_logprobs=x["old"], importance_weights=mode)
    assert_close(loss, expected, dtype=torch.float64, what="FlowRLPolicyLoss == trajectory_balance_loss")
    # and against the float64 oracle, weights included
    w = flowloss.clipped_importance_weights(x["log_probs"], x["old"], x["mask"], importance_weights=mode)
    oracle = reference.trajectory_balance_loss(x["log_probs"], x["ref"], x["r_hat"], x["log_z"], x["mask"],
                                               beta=15.0, weights=w)
    assert_close(loss, oracle, dtype=torch.float64, what="FlowRLPolicyLoss == float64 reference TB loss")
    loss.backward()
    expected.backward()
    assert_close(lp.grad, lp2.grad, dtype=torch.float64, what="d loss / d log pi")
    assert_close(log_z.grad, log_z2.grad, dtype=torch.float64, what="d loss / d log Z")
    ppo_kl = ((x["old"] - x["log_probs"]) * x["mask"]).sum() / x["mask"].sum()
    assert_close(out[2], ppo_kl, dtype=torch.float64, what="ppo_kl = token mean of log pi_old - log pi")


@given(seed=st.integers(0, 2**31 - 1), gas=st.integers(1, 3), dp=st.integers(1, 3))
def test_micro_batches_and_ranks_add_up_to_the_full_batch(adapter, seed, gas, dp):
    """OpenRLHF passes dp_size and global_batch_size = (non-empty sequences, whole step, all ranks) / gas;
    DeepSpeed scales each backward by 1/gas and averages over ranks: they must add up to the full batch."""
    x = _batch(seed, b=gas * dp * 2)
    loss_fn = adapter.FlowRLPolicyLoss()
    lp = x["log_probs"].clone().requires_grad_(True)
    n_valid = float(x["mask"].any(-1).sum())
    total = torch.zeros((), dtype=torch.float64)
    for part in torch.arange(lp.shape[0]).chunk(gas * dp):
        with loss_fn.micro_batch(ref_log_probs=x["ref"][part], log_z=x["log_z"][part]):
            loss = loss_fn(lp[part], x["old"][part], x["r_hat"][part], action_mask=x["mask"][part],
                           dp_size=dp, global_batch_size=torch.tensor(n_valid / gas, dtype=torch.float64))[0]
        total = total + loss / gas / dp  # DeepSpeed: 1/gas per backward, mean over dp ranks
    total.backward()
    lp_full = x["log_probs"].clone().requires_grad_(True)
    full = flowloss.trajectory_balance_loss(lp_full, x["ref"], x["r_hat"], x["log_z"], x["mask"],
                                            old_logprobs=x["old"])
    full.backward()
    assert_close(total, full, dtype=torch.float64, what="sum of micro-batch/rank losses == full-batch mean")
    assert_close(lp.grad, lp_full.grad, dtype=torch.float64, what="accumulated grad == full-batch grad")


def test_rollout_log_probs_give_tis_and_vllm_metrics(adapter):
    x = _batch(1)
    rollout = x["old"] + 0.5
    loss_fn = adapter.FlowRLPolicyLoss(adapter.FlowRLConfig(tis_cap=1.5))
    with loss_fn.micro_batch(ref_log_probs=x["ref"], log_z=x["log_z"]):
        loss, _, _, vllm_kl, filtered = loss_fn(x["log_probs"], x["old"], x["r_hat"], action_mask=x["mask"],
                                                rollout_log_probs=rollout)
    expected = flowloss.trajectory_balance_loss(x["log_probs"], x["ref"], x["r_hat"], x["log_z"], x["mask"],
                                                old_logprobs=x["old"], rollout_logprobs=rollout, tis_cap=1.5)
    assert_close(loss, expected, dtype=torch.float64, what="TB loss with truncated IS against vLLM log-probs")
    assert_close(vllm_kl, torch.tensor(0.5, dtype=torch.float64), dtype=torch.float64, what="vllm_kl")
    assert float(filtered) == 0.0  # log(pi_old / pi_rollout) < 0 everywhere: never capped


def test_loss_outside_micro_batch_and_bad_config_are_refused(adapter):
    x = _batch(2)
    with pytest.raises(RuntimeError, match="micro_batch"):
        adapter.FlowRLPolicyLoss()(x["log_probs"], x["old"], x["r_hat"], action_mask=x["mask"])
    with pytest.raises(ValueError, match="importance_weights"):
        adapter.FlowRLConfig(importance_weights="tokenwise")
    with pytest.raises(ValueError, match="eps_low"):
        adapter.FlowRLConfig(eps_low=1.5)
    with pytest.raises(TypeError, match="unknown FlowRL option"):
        adapter.FlowRLConfig.from_any({"betta": 1.0})
    assert adapter.FlowRLConfig().loss == flowloss.FlowRLOptions()


def _expected_step_loss(example, trainer, head, experience, *, kl_ctl: float = 0.0):
    """The loss recomputed outside OpenRLHF: HF forward -> token log-probs, pooled prompt states -> head;
    plus ``kl_ctl`` times OpenRLHF's k1 KL loss (token mean of ``log pi - log pi_ref``) when ``kl_ctl > 0``."""
    model = trainer.actor.model
    seq, att, am = experience.sequences, experience.attention_mask, experience.action_mask
    pos = (att.long().cumsum(-1) - 1).clamp_min(0)
    out = model(seq, attention_mask=att, position_ids=pos, output_hidden_states=True)
    logp = torch.log_softmax(out.logits.float(), -1)[:, :-1].gather(-1, seq[:, 1:, None]).squeeze(-1)
    lp = logp[:, -am.shape[1]:]
    prompt_mask = att.bool() & (torch.arange(seq.shape[1]) < seq.shape[1] - am.shape[1])
    log_z = head(flowloss.pool_prompt_hidden_states(out.hidden_states[-1], prompt_mask))
    r_hat = flowloss.masked_mean(experience.advantages, am)
    loss = flowloss.trajectory_balance_loss(lp, experience.base_action_log_probs, r_hat, log_z, am,
                                            old_logprobs=experience.action_log_probs)
    if kl_ctl:
        loss = loss + kl_ctl * ((lp - experience.base_action_log_probs) * am).sum() / am.sum()
    return loss


def _step_gradients(trainer, experience, kl_ctl):
    """The gradients ``training_step`` hands to the optimizer step (captured instead of stepping)."""
    grads = {}

    def capture(optimizer, model, scheduler, name="model", **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.actor.named_parameters() if p.grad is not None})
        optimizer.zero_grad()

    trainer.strategy.optimizer_step = capture
    trainer.actor.zero_grad()
    trainer.training_step(experience, kl_ctl=kl_ctl, step=0)
    return grads


def _reference_gradients(example, trainer, head, experience, kl_ctl=0.0):
    trainer.actor.zero_grad()
    _expected_step_loss(example, trainer, head, experience, kl_ctl=kl_ctl).backward()
    grads = {n: p.grad.clone() for n, p in trainer.actor.named_parameters() if p.grad is not None}
    trainer.actor.zero_grad()
    return grads


@pytest.mark.parametrize("kl_loss", [False, True])
def test_training_step_drops_openrlhf_kl_loss_unless_asked(adapter, example, kl_loss):
    """With --algo.kl.use_loss and kl_ctl > 0 OpenRLHF adds kl_ctl * KL to the loss: the adapter must drop it
    (gradient == pure trajectory balance) unless FlowRLConfig(kl_loss=True) (gradient == TB + kl_ctl * KL)."""
    kl_ctl = 0.5
    trainer, head, ref_model = example.build_trainer(adapter.FlowRLConfig(log_z_dropout=0.0, kl_loss=kl_loss))
    assert trainer.args.algo.kl.use_loss and trainer.args.algo.kl.init_coef > 0
    experience = example.make_experience(trainer, ref_model, seed=4)
    with torch.no_grad():  # policy != reference, so the KL term and its gradient are far from zero
        experience.base_action_log_probs = experience.base_action_log_probs - 0.3
    tb = _reference_gradients(example, trainer, head, experience)
    with_kl = _reference_gradients(example, trainer, head, experience, kl_ctl=kl_ctl)
    got = _step_gradients(trainer, experience, kl_ctl)
    assert set(got) == set(tb)
    expected, other = (with_kl, tb) if kl_loss else (tb, with_kl)
    for name in got:
        assert_close(got[name], expected[name], dtype=torch.float32, scale=10.0,
                     what=f"d loss / d {name} with kl_loss={kl_loss}")
    # the KL term moves the policy's gradient well beyond the tolerance
    diff = max(float((got[n] - other[n]).abs().max()) for n in got if "flowrl" not in n)
    assert diff > 1e-3, f"training_step's gradient does not depend on kl_loss={kl_loss} (max diff {diff})"


def test_training_step_loss_equals_trajectory_balance_loss_and_updates_head_and_policy(adapter, example):
    config = adapter.FlowRLConfig(log_z_dropout=0.0)  # deterministic head for the comparison
    trainer, head, ref_model = example.build_trainer(config, lr=0.5)
    experience = example.make_experience(trainer, ref_model, seed=3)
    with torch.no_grad():
        experience.action_log_probs = experience.action_log_probs + 0.05  # off-policy: weights != 1
    expected = _expected_step_loss(example, trainer, head, experience)
    trainer.actor.zero_grad()
    expected.backward()
    grads = {n: p.grad.clone() for n, p in trainer.actor.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    trainer.actor.zero_grad()

    status = trainer.training_step(experience, kl_ctl=0.01, step=0)

    assert_close(status["metrics"]["policy_loss"], expected, dtype=torch.float32,
                 what="training_step's policy_loss == trajectory_balance_loss", scale=10.0)
    head_names = [n for n in before if ".flowrl_log_z_head." in n]
    assert head_names, "the head is registered on actor.model"
    for name, param in trainer.actor.named_parameters():  # SGD: new = old - lr * grad
        if name in grads:
            assert_close(before[name] - param.detach(), 0.5 * grads[name], dtype=torch.float32,
                         what=f"SGD step on {name} == -lr * d(TB loss)", scale=10.0)
    assert any(not torch.equal(before[n], dict(trainer.actor.named_parameters())[n]) for n in head_names)
    policy = [n for n in before if "flowrl" not in n]
    assert any(not torch.equal(before[n], dict(trainer.actor.named_parameters())[n]) for n in policy)
    assert float(status["metrics"]["flowrl_weight_mean"]) != 1.0
    assert torch.isfinite(status["metrics"]["policy_loss"])


def test_training_step_without_reference_log_probs_names_the_flags(adapter, example):
    trainer, _, ref_model = example.build_trainer(adapter.FlowRLConfig())
    experience = example.make_experience(trainer, ref_model)
    experience.base_action_log_probs = None
    with pytest.raises(ValueError, match=r"--algo\.kl\.use_loss"):
        trainer.training_step(experience, kl_ctl=0.0, step=0)


def test_head_checkpoint_round_trip_and_weight_sync_exclusion(adapter, example, tmp_path):
    config = adapter.FlowRLConfig(log_z_dropout=0.0)
    trainer, head, _ = example.build_trainer(config)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    model = trainer.actor.model
    torch.save(model.state_dict(), tmp_path / "actor.pt")
    fresh = example.tiny_model(seed=1)
    fresh_head = adapter.attach_log_z_head(fresh, config)
    fresh.load_state_dict(torch.load(tmp_path / "actor.pt"))
    pooled = torch.randn(3, head.hidden_size)
    assert torch.equal(fresh_head(pooled), head(pooled))
    assert adapter.find_log_z_head(trainer.actor) is head
    with adapter.log_z_head_detached(trainer.actor):
        assert not any("flowrl" in n for n, _ in model.named_parameters())
        assert not any("flowrl" in k for k in model.state_dict())
    assert any("flowrl" in n for n, _ in model.named_parameters())


def test_enable_flowrl_converts_a_built_trainer_and_checks_the_optimizer(adapter, example):
    from openrlhf.models import Actor
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    actor = Actor(example.tiny_model(0))
    actor.packing_samples = False
    optim = torch.optim.SGD(actor.parameters(), lr=0.1)  # built before the head: the head is not in it
    adapter.attach_log_z_head(actor.model)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    with example.cpu_compat():
        trainer = ActorPPOTrainer(example.MinimalStrategy(example.openrlhf_args()), actor, None, optim, sched)
    with pytest.raises(ValueError, match="not in `actor_optim`"):
        adapter.enable_flowrl(trainer)
    optim.add_param_group({"params": list(adapter.find_log_z_head(actor).parameters())})
    converted = adapter.enable_flowrl(trainer, {"beta": 5.0})
    assert isinstance(converted, adapter.FlowRLActorPPOTrainer)
    assert isinstance(converted.actor_loss_fn, adapter.FlowRLPolicyLoss) and converted.flowrl.loss.beta == 5.0


def test_head_is_attached_when_the_strategy_prepares_the_policy(adapter, example):
    from openrlhf.models import Actor

    class Strategy:
        def prepare(self, *models):
            return models

    strategy, actor = Strategy(), Actor(example.tiny_model(0))
    with adapter._head_attached_on_prepare(strategy, adapter.FlowRLConfig()):
        strategy.prepare((actor, {"optim": "adam"}))
    assert "prepare" not in vars(strategy)
    assert isinstance(adapter.find_log_z_head(actor), flowloss.LogZHead)
    assert issubclass(adapter.FlowRLPolicyModelActorImpl,
                      __import__("openrlhf.trainer.ray.ppo_actor").trainer.ray.ppo_actor.PolicyModelActor
                      .__ray_metadata__.modified_class)


def test_check_openrlhf_args_names_the_missing_flags(adapter, example):
    config = adapter.FlowRLConfig()
    args = example.openrlhf_args()
    args.ds.ring_attn_size, args.train.enable_ema = 1, False
    adapter._check_openrlhf_args(args, config)
    args.algo.kl.use_loss = False
    with pytest.raises(ValueError, match=r"--algo\.kl\.use_loss"):
        adapter._check_openrlhf_args(args, config)
    args.algo.kl.use_loss, args.algo.advantage.estimator = True, "reinforce"
    with pytest.raises(ValueError, match="group_norm"):
        adapter._check_openrlhf_args(args, config)


FLOWRL_FLAGS = ["--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "1e-3", "--algo.kl.use_loss",
                "--rollout.n_samples_per_prompt", "4", "--actor.model_name_or_path", "tiny"]


class _RayStarted(Exception):
    pass


@pytest.fixture()
def launch(adapter, monkeypatch, capsys):
    """Run ``python -m flowloss.adapters.openrlhf ARGS`` in this process up to the point where OpenRLHF's
    launcher starts Ray (``ray.init`` raises here): ``(exit code or "ray", stdout, stderr)``."""
    import ray

    def no_ray(*args, **kwargs):
        raise _RayStarted

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def run(*argv: str):
        try:
            adapter.main(list(argv))
            code = None
        except SystemExit as exc:
            code = exc.code
        except _RayStarted:
            code = "ray"
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_launcher_help_lists_the_flowrl_options(launch, adapter):
    """Defect 4: ``--flowrl.*`` options were missing from ``--help``."""
    code, out, _ = launch("--help")
    assert code == 0
    for name in adapter.FlowRLConfig.flat_names():
        assert f"--flowrl.{name}" in out, name
    assert "sequence_clipped" in out and "--algo.kl.use_loss" in out  # OpenRLHF's own options are still there


@pytest.mark.parametrize(
    "flags, named, allowed",
    [
        (["--flowrl.importance_weights", "tokenwise"], "--flowrl.importance_weights", "sequence_clipped"),
        (["--flowrl.token_clip_mask", "yes please"], "--flowrl.token_clip_mask", "true or false"),
        (["--flowrl.beta", "-1"], "--flowrl.beta", "must be > 0"),
        (["--flowrl.eps_low=1.5"], "--flowrl.eps_low", "[0.0, 1.0)"),
        (["--flowrl.bta", "1"], "--flowrl.bta", "--flowrl.beta"),
    ],
)
def test_launcher_refuses_bad_flowrl_values_with_exit_2(launch, flags, named, allowed):
    """Defect 4: a bad ``--flowrl.importance_weights`` value ended in a raw traceback."""
    code, _, err = launch(*FLOWRL_FLAGS, *flags)
    assert code == 2, err
    assert named in err and allowed in err, err
    assert "Traceback" not in err


def test_launcher_checks_openrlhf_flags_before_ray_starts(launch):
    """Defect 4: the missing-flag message came only after ~14 s of Ray start-up."""
    without_use_loss = [f for f in FLOWRL_FLAGS if f != "--algo.kl.use_loss"]
    code, _, err = launch(*without_use_loss)
    assert code == 2 and "--algo.kl.use_loss" in err, err
    code, _, err = launch(*FLOWRL_FLAGS, "--actor.entropy_coef", "0.01")
    assert code == 2 and "--actor.entropy_coef" in err, err
    code, _, err = launch(*FLOWRL_FLAGS)
    assert code == "ray", err  # valid flags: the launcher went on to start Ray


@pytest.mark.parametrize("kl_loss", [False, True])
def test_launcher_prints_no_k1_advice_for_a_kl_loss_flowrl_drops(launch, kl_loss):
    """Defect 4: OpenRLHF's "Recommend setting k1 to 'k2' or 'k3' when using KL as a loss" was printed,
    although the adapter drops that KL loss (unless --flowrl.kl_loss true)."""
    code, out, _ = launch(*FLOWRL_FLAGS, "--flowrl.kl_loss", str(kl_loss).lower())
    assert code == "ray"
    assert ("Recommend setting k1" in out) == kl_loss, out
    assert ("[FlowRL] OpenRLHF's KL loss is dropped" in out) != kl_loss, out


def _run_without_gpu_packages(*argv: str):
    """``python -m flowloss.adapters.openrlhf ARGV`` in a fresh process without the test stand-ins (so without
    flash-attn and vllm, as on any machine without a GPU)."""
    import os
    import subprocess
    import sys

    for name in ("flash_attn", "vllm"):
        if importlib.util.find_spec(name) is not None and "standins" not in str(importlib.util.find_spec(name).origin):
            pytest.skip(f"{name} is installed here: nothing to test")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "standins" not in p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-m", "flowloss.adapters.openrlhf", *argv], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[3], timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_launcher_help_works_without_the_gpu_only_packages():
    """Issue 20: ``--help`` imported flash_attn and printed a traceback telling the user to install OpenRLHF."""
    code, out, err = _run_without_gpu_packages("--help")
    assert code == 0, err
    assert "Traceback" not in err, err
    assert "--flowrl.logprobs" in out and "--ds.packing_samples" in out and "--algo.kl.use_loss" in out


def test_launcher_without_the_gpu_only_packages_names_them_and_still_checks_flags(launch, monkeypatch):
    """A run needs flash-attn and vllm: the message names both (and how to install them), before Ray starts;
    the flag checks still run first. (In this process: the stand-ins play the installed packages, so the
    missing ones are declared; the subprocess test above imports with none.)"""
    from flowloss.adapters.openrlhf import _compat

    monkeypatch.setattr(_compat, "missing_gpu_packages", lambda: ("flash_attn", "vllm"))
    code, _, err = launch(*FLOWRL_FLAGS)
    assert code == 1, err
    assert "flash_attn (pip install flash-attn)" in err and "vllm (pip install vllm)" in err, err
    assert "Traceback" not in err and "install OpenRLHF" not in err, err
    code, _, err = launch(*FLOWRL_FLAGS, "--flowrl.logprobs", "fused")
    assert code == 2 and "--flowrl.logprobs" in err and "hidden" in err, err


def test_names_needing_the_gpu_only_packages_say_which_are_missing(adapter):
    from flowloss.adapters.openrlhf import _compat

    message = _compat.missing_package_message("flash_attn.bert_padding", "flowloss.adapters.openrlhf.X")
    assert "`flash_attn`" in message and "pip install flash-attn" in message and "openrlhf" not in message.split()
    assert "pip install -e '.[openrlhf]'" in _compat.missing_package_message("openrlhf")


def test_launcher_accepts_packed_samples_and_refuses_ring_attention_with_the_reason(launch):
    """Issue 20: --ds.packing_samples was refused; it is supported now (ring attention stays refused)."""
    code, _, err = launch(*FLOWRL_FLAGS, "--ds.packing_samples", "--vllm.num_engines", "1")
    assert code == "ray", err
    code, _, err = launch(*FLOWRL_FLAGS, "--ds.ring_attn_size", "2", "--vllm.num_engines", "1")
    assert code == 2 and "ring attention" in err and "log-Z head pools" in err, err


def test_launcher_modules_import():
    """Defect 4: ``train()`` imports OpenRLHF's PPO trainer (and with it ``datasets``) once Ray is up; the
    install must provide what it imports."""
    import importlib

    for module in ("openrlhf.trainer.ppo_trainer", "openrlhf.trainer.ppo_trainer_async", "openrlhf.datasets",
                   "openrlhf.cli.train_ppo_ray"):
        importlib.import_module(module)


def test_launcher_options_reach_the_workers(launch, adapter, monkeypatch):
    """The parsed options land on ``strategy.args.flowrl``, where the FlowRL workers read them; OpenRLHF's
    ``train()`` creates FlowRL's policy and reference workers."""
    import sys

    import openrlhf.trainer.ray.launcher as ray_launcher
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    import openrlhf.utils as orl_utils
    import ray

    original_actor, original_reference = ppo_actor.PolicyModelActor, ray_launcher.ReferenceModelActor
    seen = {}

    def get_strategy(args):
        seen["flowrl"] = args.flowrl
        frame = sys._getframe(1)
        while frame.f_code.co_name != "train":  # OpenRLHF's train(), in the launcher's module globals
            frame = frame.f_back
        seen["workers"] = frame.f_globals["PolicyModelActor"], frame.f_globals["ReferenceModelActor"]
        raise _RayStarted

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(orl_utils, "get_strategy", get_strategy)
    code, _, err = launch(*FLOWRL_FLAGS, "--flowrl.beta", "10", "--flowrl.token_clip_mask=true",
                          "--flowrl.log_z_dropout", "0")
    assert code == "ray", err
    assert seen["flowrl"] == adapter.FlowRLConfig(beta=10.0, token_clip_mask=True, log_z_dropout=0.0)
    assert seen["workers"] == (adapter.FlowRLPolicyModelActor, adapter.FlowRLReferenceModelActor)
    assert orl_utils.get_strategy is get_strategy  # main() restored what it patched
    assert ppo_actor.PolicyModelActor is original_actor
    assert ray_launcher.ReferenceModelActor is original_reference


def test_example_runs(example, capsys):
    losses = example.main(steps=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "FlowRL loss" in capsys.readouterr().out


class _CheckpointStrategy:
    """OpenRLHF's strategy calls that ``PolicyModelActor.save_checkpoint`` / ``save_model`` make: the DeepSpeed
    checkpoint (here the full ``state_dict``, as DeepSpeed saves the engine's module) and the HF export (here
    ``save_pretrained`` of the unwrapped model, as ``DeepspeedStrategy.save_model`` under ZeRO-1/2)."""

    def __init__(self, args):
        self.args = args

    def save_ckpt(self, model, save_dir, tag=None, *args, **kwargs):
        Path(save_dir, tag).mkdir(parents=True)
        torch.save(model.state_dict(), Path(save_dir, tag, "model.pt"))

    def save_model(self, model, tokenizer, output_dir, **kwargs):
        hf = model.model if hasattr(model, "model") else model
        hf.save_pretrained(output_dir, state_dict=hf.state_dict())


def _policy_worker(adapter, example, tmp_path, *, save_hf: bool):
    """``FlowRLPolicyModelActorImpl`` without Ray or a GPU: the attributes its ``init_model_from_pretrained``
    sets, on a trainer built by the example."""
    from types import SimpleNamespace as ns

    trainer, head, _ = example.build_trainer(adapter.FlowRLConfig())
    args = example.openrlhf_args()
    args.train.enable_ema = False
    args.ckpt = ns(path=str(tmp_path / "ckpt"), max_num=3, max_mem=1000, output_dir=str(tmp_path / "final"),
                   save_hf=save_hf, disable_ds=False)
    worker = object.__new__(adapter.FlowRLPolicyModelActorImpl)
    worker.strategy, worker.actor, worker.trainer = _CheckpointStrategy(args), trainer.actor, trainer
    worker.tokenizer, worker.ema_model = None, None
    worker.save_hf_ckpt, worker.disable_ds_ckpt = save_hf, False
    return worker, head


def _export_keys(path):
    from safetensors import safe_open

    keys = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    assert keys, f"no safetensors written under {path}"
    return keys


def test_save_checkpoint_keeps_head_for_resume_and_leaves_it_out_of_the_hf_export(adapter, example, tmp_path):
    """``--ckpt.save_hf``: OpenRLHF's save_checkpoint calls strategy.save_model itself (not the worker's
    save_model): the ``{tag}_hf`` export must still have no head keys, the DeepSpeed checkpoint must keep them."""
    worker, head = _policy_worker(adapter, example, tmp_path, save_hf=True)
    with example.cpu_compat():
        worker.save_checkpoint("global_step1", client_states={"consumed_samples": 8})
    resume = torch.load(tmp_path / "ckpt" / "_actor" / "global_step1" / "model.pt")
    head_keys = {k for k in resume if "flowrl_log_z_head" in k}
    assert head_keys and set(head.state_dict()) == {k.split("flowrl_log_z_head.")[1] for k in head_keys}
    exported = _export_keys(tmp_path / "ckpt" / "global_step1_hf")
    assert not {k for k in exported if "flowrl" in k}, f"head keys in the HF export: {sorted(exported)}"
    assert "model.embed_tokens.weight" in exported
    assert "flowrl_log_z_head" in dict(worker.actor.model.named_children())  # re-attached afterwards
    assert "save_model" not in vars(worker.strategy)  # the strategy is left as it was
    worker.save_model()  # the final export (--ckpt.output_dir) too
    assert not {k for k in _export_keys(tmp_path / "final") if "flowrl" in k}


def test_entropy_bonus_is_refused(adapter, example):
    """A non-zero --actor.entropy_coef makes OpenRLHF subtract an entropy bonus from FlowRL's loss."""
    args = example.openrlhf_args()
    args.ds.ring_attn_size, args.train.enable_ema = 1, False
    args.actor.entropy_coef = 0.0  # computed and logged, not added to the loss: allowed
    adapter._check_openrlhf_args(args, adapter.FlowRLConfig())
    args.actor.entropy_coef = 1e-3
    with pytest.raises(ValueError, match=r"--actor\.entropy_coef"):
        adapter._check_openrlhf_args(args, adapter.FlowRLConfig())
    trainer, _, _ = example.build_trainer(adapter.FlowRLConfig())
    trainer.args.actor.entropy_coef = 1e-3
    with pytest.raises(ValueError, match=r"--actor\.entropy_coef"):
        adapter.enable_flowrl(trainer)
    trainer.args.actor.entropy_coef = 0.0
    adapter.enable_flowrl(trainer)


def test_config_keys_of_0_1_are_translated_or_refused_clearly(adapter):
    """0.1 took `drop_last_prompt_token` (now `log_z_drop_last_prompt_token`, accepted with a warning) and
    `head_name` (gone: the head has one name in every adapter; refused with the reason)."""
    with pytest.warns(DeprecationWarning, match="use `log_z_drop_last_prompt_token`"):
        old = adapter.FlowRLConfig.from_any({"drop_last_prompt_token": True})
    assert old == adapter.FlowRLConfig(log_z_drop_last_prompt_token=True)
    with pytest.raises(TypeError, match=r"`head_name` is no longer.*flowrl_log_z_head"):
        adapter.FlowRLConfig(head_name="my_head")


# The names `flowloss.adapters.openrlhf` had as one module (0.1); the package keeps every one importable.
NAMES_OF_0_1 = (
    "FlowRLActorPPOTrainer", "FlowRLConfig", "FlowRLPolicyLoss", "FlowRLPolicyModelActor",
    "FlowRLPolicyModelActorImpl", "attach_log_z_head", "enable_flowrl", "find_log_z_head", "log_z_head_detached",
    "main", "RewardSource", "AdapterConfig", "Extra", "HiddenStateCapture", "global_normalizer",
    "_check_openrlhf_args", "_head_attached_on_prepare", "_instance_override", "_hf_exports_without_head",
    "_setup", "_MicroBatch", "_ENTROPY_ERROR", "_KL_ADVICE", "_KL_NOTE", "_FLAG_PREFIX",
)


def test_every_name_of_the_single_module_adapter_still_imports(adapter):
    import importlib

    module = importlib.import_module("flowloss.adapters.openrlhf")
    for name in (*NAMES_OF_0_1, *module.__all__):
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))
    from flowloss.adapters.openrlhf import FlowRLReferenceModelActor, use_flowrl_logprobs  # noqa: F401


def test_compat_names_the_installed_openrlhf_version(adapter):
    """The workarounds in _compat.py were written against these versions: a new OpenRLHF must be checked
    against its list (and added) before this passes."""
    from flowloss.adapters.openrlhf import _compat

    assert _compat.openrlhf_version() in _compat.OPENRLHF_TESTED, (
        f"openrlhf {_compat.openrlhf_version()} is not among the versions _compat.py was checked against "
        f"{_compat.OPENRLHF_TESTED}: re-check each patch listed in its docstring"
    )


def test_workers_set_up_flowrl_around_openrlhfs_own_initialisation(adapter, example, monkeypatch):
    """The Ray workers' ``init_model_from_pretrained`` without Ray or a GPU: OpenRLHF's own method replaced by
    what it does that matters here (``strategy.prepare((actor, cfg))``, the trainer / the reference actor)."""
    from openrlhf.trainer.ray.launcher import ReferenceModelActor
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor

    args = example.openrlhf_args()
    args.flowrl = adapter.FlowRLConfig(logprobs="logits", log_z_lr=1e-3)
    calls = []

    class Strategy(example.MinimalStrategy):
        def _get_model_parameters(self, model, *, optim=None, weight_decay=0.0):
            return model.model, [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]

        def prepare(self, item):
            actor, _ = item
            _, groups = self._get_model_parameters(actor)
            calls.append(groups)
            optim = torch.optim.SGD(groups, lr=1e-6)
            return actor, optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)

    def policy_init(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        self.strategy = strategy
        self.actor, self.actor_optim, self.actor_scheduler = strategy.prepare(
            (example.make_actor(example.tiny_model(0)), {}))
        with example.cpu_compat():
            self.trainer = ActorPPOTrainer(strategy, self.actor, None, self.actor_optim, self.actor_scheduler)

    def reference_init(self, strategy, pretrain):
        self.strategy, self.model = strategy, example.make_actor(example.tiny_model(0))

    monkeypatch.setattr(PolicyModelActor.__ray_metadata__.modified_class, "init_model_from_pretrained", policy_init)
    monkeypatch.setattr(ReferenceModelActor.__ray_metadata__.modified_class, "init_model_from_pretrained",
                        reference_init)
    strategy = Strategy(args)
    policy = object.__new__(adapter.FlowRLPolicyModelActorImpl)
    policy.init_model_from_pretrained(strategy, "tiny")
    assert isinstance(policy.trainer, adapter.FlowRLActorPPOTrainer) and policy.trainer.flowrl_logprobs == "logits"
    head = {id(p) for p in adapter.find_log_z_head(policy.actor).parameters()}
    assert [g["lr"] for g in policy.actor_optim.param_groups] == [1e-6, 1e-3]  # the head's group at log_z_lr
    assert {id(p) for p in policy.actor_optim.param_groups[1]["params"]} == head
    assert "prepare" not in vars(strategy) and "_get_model_parameters" not in vars(strategy)
    reference = object.__new__(adapter.FlowRLReferenceModelActorImpl)
    reference.init_model_from_pretrained(strategy, "tiny")
    assert isinstance(reference.model, adapter.FlowRLActor) and reference.model.flowrl_logprobs == "logits"

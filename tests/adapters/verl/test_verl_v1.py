"""verl 0.9's default V1 trainer (``trainer.use_v1=True``) runs FlowRL, and the install can start ``main_ppo``.

* ``register_flowrl`` registers the trainer mode ``flowrl`` (verl's ``sync`` trainer with FlowRL's loss
  installed in the actor workers once they exist), the engine with the log-Z head and the old-reference policy
  loss; ``VERL_USE_EXTERNAL_MODULES`` makes a fresh process that imports verl register them (what ``main_ppo``'s
  TaskRunner and workers do);
* the overrides documented in docs/adapters/verl.md compose with ``main_ppo``'s Hydra config, select the V1
  trainer and the ``flowrl`` mode, and make verl keep a reference policy;
* the modules ``main_ppo`` imports on its way to training are installed (``transfer_queue`` for V1,
  ``cachetools`` and ``uvicorn`` for the legacy trainer and the checkpoint engines).

Not run: ``main_ppo`` itself (its workers ask Ray for GPUs).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# test_verl_loss requires verl (skip outside CI, fail in CI) before it imports it.
from test_verl_loss import _actor_config, _batch, _micro_batch, _model_output

from flowloss.adapters import verl as fv

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "adapters" / "verl.md"


@pytest.mark.parametrize(
    "module", ["transfer_queue", "verl.trainer.ppo.v1", "verl.trainer.main_ppo", "verl.trainer.main_ppo_v0",
               "verl.checkpoint_engine"]
)
def test_main_ppo_run_path_imports(module):
    """Defect 3: ``flowloss[verl]`` installed plain ``verl``: main_ppo stopped on ``No module named
    'transfer_queue'`` (V1), ``cachetools`` then ``uvicorn`` (legacy)."""
    importlib.import_module(module)


def _documented_overrides() -> list[str]:
    """The ``key=value`` lines of the documented main_ppo overrides (the ```bash block under "The config")."""
    text = DOC.read_text()
    block = text[text.rindex("```bash", 0, text.index("trainer.v1.trainer_mode=")):]
    block = block[: block.index("```", 3)]
    return [m.group(1) for m in re.finditer(r"^\s*([\w.+]+=\S+)", block, flags=re.M)]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def test_documented_overrides_select_the_v1_flowrl_trainer_and_a_reference():
    """Defect 2: the docs targeted the legacy RayPPOTrainer (``init_workers``), which V1 does not have."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.trainer.ppo.v1 import PPOTrainerSync

    overrides = _documented_overrides()
    assert "trainer.v1.trainer_mode=flowrl" in overrides
    assert not any(o.startswith("trainer.use_v1=False") for o in overrides)
    config = _compose(overrides)
    assert config.trainer.use_v1 and config.trainer.v1.trainer_mode == "flowrl"
    assert need_reference_policy(config) and not need_critic(config)
    assert config.actor_rollout_ref.actor.kl_loss_coef == 0.0 and config.algorithm.adv_estimator == "grpo"
    assert not hasattr(PPOTrainerSync, "init_workers")  # why the old recipe could not work on V1


class _RecordingWorkerGroup:
    def __init__(self):
        self.loss_fns = []

    def set_loss_fn(self, loss_fn):
        self.loss_fns.append(loss_fn)


def test_flowrl_trainer_mode_installs_the_loss_in_the_actor_workers(monkeypatch):
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    cls = fv.register_flowrl_trainer({"beta": 10.0, "log_z": "vargrad"})
    assert get_trainer_cls("flowrl") is cls and issubclass(cls, PPOTrainerSync)
    assert fv.register_flowrl_trainer({"beta": 5.0}).flowrl_config.loss.beta == 5.0  # re-registration replaces
    cls = fv.register_flowrl_trainer({"beta": 10.0, "log_z": "vargrad"})

    calls = []
    monkeypatch.setattr(PPOTrainerSync, "_setup", lambda self: calls.append("verl's _setup"))
    trainer = object.__new__(cls)
    trainer.config = _compose([*_documented_overrides(), "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    trainer.actor_rollout_wg = _RecordingWorkerGroup()
    trainer._setup()
    assert calls == ["verl's _setup"] and len(trainer.actor_rollout_wg.loss_fns) == 1

    # The installed function is FlowRL's loss with the registered options, on verl's actor config.
    installed = trainer.actor_rollout_wg.loss_fns[0]
    data, token_lp, _, pl, rl = _batch(3)
    rows = list(range(6))
    args = dict(model_output=_model_output(token_lp, rows, pl, rl), data=_micro_batch(data, rows, dp_size=1,
                                                                                     global_batch_size=6))
    expected, _ = fv.make_flowrl_loss_fn(_actor_config(), {"beta": 10.0, "log_z": "vargrad"})(**args)
    other_beta, _ = fv.make_flowrl_loss_fn(_actor_config(), {"beta": 15.0, "log_z": "vargrad"})(**args)
    got, _ = installed(**args)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, other_beta)
    assert installed.keywords["config"].kl_loss_coef == 0.0  # verl's actor config, from the documented overrides


def test_verl_use_external_modules_registers_flowrl_in_a_fresh_process(tmp_path):
    """What main_ppo's TaskRunner and workers do: ``import verl`` imports the modules named in
    ``VERL_USE_EXTERNAL_MODULES`` (here the documented flowrl_setup.py), which register FlowRL."""
    (tmp_path / "flowrl_setup.py").write_text(
        "from flowloss.adapters.verl import register_flowrl\nregister_flowrl({'beta': 12.0})\n"
    )
    probe = (
        "import verl\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "from verl.workers.engine.base import EngineRegistry\n"
        "cls = get_trainer_cls('flowrl')\n"
        "engine = EngineRegistry._engines['language_model']['fsdp']['cuda']\n"
        "get_policy_loss_fn('flowrl_old_ref')\n"
        "print(cls.__name__, cls.flowrl_config.loss.beta, engine.__name__, engine.flowrl_config.loss.beta)\n"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "flowrl_setup", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-4:] == ["FlowRLPPOTrainerSync", "12.0", "FlowRLFSDPEngine", "12.0"], done.stdout


# What a run sets besides the documented lines (verl's config checks need them).
_MICRO_BATCHES = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                  "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
                  "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]


def _flowrl_trainer(overrides: list[str], flowrl: dict | None = None):
    """A FlowRL V1 trainer object on main_ppo's composed config, without verl's constructor (no workers)."""
    cls = fv.register_flowrl_trainer(flowrl or {})
    trainer = object.__new__(cls)
    trainer.config = _compose([*_documented_overrides(), *_MICRO_BATCHES, *overrides])
    return trainer


def test_flowrl_options_are_hydra_overrides(monkeypatch):
    """Issue 20: options such as beta could only be set in Python. The node actor_rollout_ref.flowrl
    (``+actor_rollout_ref.flowrl.beta=10``) reaches the loss in the actor workers and the engine in the workers;
    verl's own config checks (which turn actor_rollout_ref.actor into a dataclass) still pass."""
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.utils.config import validate_config

    overrides = ["+actor_rollout_ref.flowrl.beta=10", "+actor_rollout_ref.flowrl.log_z=vargrad",
                 "+actor_rollout_ref.flowrl.logprobs=hidden", "+actor_rollout_ref.flowrl.log_z_lr=0.001",
                 "actor_rollout_ref.actor.strategy=fsdp2"]
    trainer = _flowrl_trainer(overrides, {"beta": 15.0, "log_z_num_layers": 2})
    validate_config(trainer.config, use_reference_policy=True, use_critic=False)
    flowrl = fv.flowrl_config_from(trainer.config, type(trainer).flowrl_config)
    assert (flowrl.loss.beta, flowrl.log_z, flowrl.logprobs) == (10.0, "vargrad", "hidden")
    assert flowrl.log_z_head.num_layers == 2 and flowrl.log_z_head.lr == 0.001  # Python options kept under them

    monkeypatch.setattr(PPOTrainerSync, "_setup", lambda self: None)
    trainer.actor_rollout_wg = _RecordingWorkerGroup()
    trainer._setup()
    installed = trainer.actor_rollout_wg.loss_fns[0]
    assert installed.keywords["flowrl"] == flowrl
    data, token_lp, _, pl, rl = _batch(3)
    rows = list(range(6))
    args = dict(model_output=_model_output(token_lp, rows, pl, rl), data=_micro_batch(data, rows, dp_size=1,
                                                                                     global_batch_size=6))
    expected, _ = fv.make_flowrl_loss_fn(_actor_config(), {"beta": 10.0, "log_z": "vargrad"})(**args)
    torch.testing.assert_close(installed(**args)[0], expected)

    # The actor workers get a class that registers the engine with these options before verl builds models.
    trainer._init_resource_pool_mgr()
    workers = [getattr(c, "__ray_actor_class__", c) for c in trainer.role_worker_mapping.values()]
    assert workers and all(w.__name__ == "FlowRLActorRolloutRefWorker" for w in workers)
    assert all(w.flowrl_config == flowrl for w in workers)


def test_the_worker_class_registers_the_engine_before_verl_builds_models(monkeypatch):
    import cloudpickle
    from verl.single_controller.base.decorator import MAGIC_ATTR
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from flowloss.adapters.verl.register import worker_class

    flowrl = fv.FlowRLConfig(beta=7.0, logprobs="logits")
    cls = worker_class(ActorRolloutRefWorker, flowrl)
    assert getattr(cls.init_model, MAGIC_ATTR) == getattr(ActorRolloutRefWorker.init_model, MAGIC_ATTR)
    assert cloudpickle.loads(cloudpickle.dumps(cls)).flowrl_config == flowrl  # Ray ships the class by value

    seen = []
    saved = {k: dict(v) for k, v in EngineRegistry._engines["language_model"].items()}
    monkeypatch.setattr(ActorRolloutRefWorker, "init_model", lambda self: seen.append(
        EngineRegistry._engines["language_model"]["fsdp"]["cuda"].flowrl_config))
    try:
        cls.init_model(object.__new__(cls))
    finally:
        EngineRegistry._engines["language_model"] = saved
    assert seen == [flowrl]


def test_conflicting_verl_settings_are_refused_in_one_error_before_workers_start():
    """Issue 20: entropy_coeff, clip_ratio_*, rollout-correction weights (and more) were ignored without a word;
    the FlowRL trainer now lists every conflict at once, when it is constructed."""
    overrides = [
        "actor_rollout_ref.actor.entropy_coeff=0.01",
        "actor_rollout_ref.actor.clip_ratio_high=0.3",
        "actor_rollout_ref.actor.policy_loss.loss_mode=flowrl_old_ref",
        "algorithm.rollout_correction.rollout_is=token",
        "actor_rollout_ref.model.use_fused_kernels=True",
        "+actor_rollout_ref.flowrl.logprobs=hidden",
    ]
    trainer = _flowrl_trainer(overrides)
    with pytest.raises(ValueError, match="5 verl setting") as info:
        type(trainer)(trainer.config)
    for needle in ("entropy_coeff=0.01", "clip_ratio_high=0.3", "loss_mode=flowrl_old_ref", "rollout_is=token",
                   "use_fused_kernels=True"):
        assert needle in str(info.value)
    assert fv.verl_conflicts(fv.flowrl_config_from(_flowrl_trainer([]).config), **_parts(_flowrl_trainer([]))) == []


def _parts(trainer):
    c = trainer.config
    return dict(actor=c.actor_rollout_ref.actor, algorithm=c.algorithm, model=c.actor_rollout_ref.model)


def test_documented_metric_names_are_what_verl_logs():
    """Issue 20: the docs said flowrl/...; verl logs the actor's metrics under actor/ (rename_dict)."""
    from verl.utils.py_functional import rename_dict

    data, token_lp, log_z, pl, rl = _batch(2)
    rows = list(range(6))
    logged = set()
    for extra in ({}, {"rollout_is_weights": data["response_mask"] * 0.5}):  # with verl's rollout correction
        _, metrics = fv.make_flowrl_loss_fn(_actor_config())(
            model_output=_model_output(token_lp, rows, pl, rl, log_z),
            data=_micro_batch({**data, **extra}, rows, dp_size=1, global_batch_size=6))
        assert set(rename_dict(metrics, "actor/")) == set(metrics)  # the loss names them as verl logs them
        logged |= set(metrics)
    text = DOC.read_text()
    documented = set(re.findall(r"actor/flowrl/\w+", text))
    assert {"actor/flowrl/residual_abs_mean", "actor/flowrl/weight_mean"} <= documented <= logged
    assert not re.search(r"(?<![\w/])flowrl/\w+", text.replace("actor/flowrl/", "")), "a metric without actor/"

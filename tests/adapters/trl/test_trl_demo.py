"""``flowloss demo --task sequences --trainer trl``: FlowRLTrainer and TRL's GRPOTrainer on the demo's task (short).

A smoke test of the wiring, not of the claim (that is ``tests/demo/test_sequence_demo.py``, on the flowloss loop):
both trainers start from the same warm-started reference, train, move the policy, and are scored exactly; the
reward function reads TRL's completion ids; the CLI writes the JSON with ``"trainer": "trl"``.
"""

from __future__ import annotations

import argparse
import functools
import json

import pytest

from tests.adapters.conftest import require_framework


@pytest.fixture(scope="module")
def trl_demo():
    require_framework("trl")
    from flowloss.demo import sequence_trl

    return sequence_trl


def test_reward_function_reads_completion_ids(trl_demo):
    reward = trl_demo.make_reward_function(3)
    prompts = ["13=", "13=", "13=", "13=", "07="]
    ids = [[4, 9, 0], [4, 9, 1], [4, 9], [4, 9, 12], [0, 0, 7]]
    assert reward(prompts=prompts, completion_ids=ids, completions=[""] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_tokenizer_ids_are_the_task_ids(trl_demo):
    from flowloss.demo.sequence_task import EOS_ID, TOKENS

    tokenizer = trl_demo.build_tokenizer()
    assert tokenizer("13=", add_special_tokens=False)["input_ids"] == [1, 3, 10]
    assert len(tokenizer) == len(TOKENS) and tokenizer.eos_token_id == EOS_ID
    assert tokenizer.decode([4, 9, 0, EOS_ID], skip_special_tokens=True).replace(" ", "") == "490"


def test_both_trl_trainers_train_from_the_same_reference_and_are_scored(trl_demo, tmp_path, monkeypatch):
    from flowloss.demo import cli as demo_cli
    from flowloss.demo.sequence_train import SequenceDemoConfig

    monkeypatch.setattr(demo_cli, "SequenceDemoConfig",
                        functools.partial(SequenceDemoConfig, warm_steps=30, eval_every=2, sums=(12, 15)))
    parser = argparse.ArgumentParser(prog="flowloss")
    demo_cli.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "trl.json"
    args = parser.parse_args(["demo", "--task", "sequences", "--trainer", "trl", "--steps", "4", "--lr", "1e-2",
                              "--json", str(out)])
    assert args.run(args) == 0
    data = json.loads(out.read_text())
    assert data["trainer"] == "trl" and set(data["methods"]) == {"flowrl", "grpo"}
    (seed,) = data["seeds"]
    for method in ("flowrl", "grpo"):
        history = seed["history"][method]
        assert history["step"] == [0, 2, 4]
        assert history["reward"][0] == pytest.approx(seed["reference"]["reward"]), "both start at pi_ref"
        assert history["kl_target"][-1] != pytest.approx(history["kl_target"][0]), f"{method}: the policy moved"



def test_lr_log_z_reaches_the_trl_trainer_as_the_heads_own_group(trl_demo, monkeypatch):
    """`--lr-log-z` with `--trainer trl` becomes FlowRLConfig(flowrl_log_z_lr=...): the head trains in its own
    optimizer group at that rate."""
    from flowloss.adapters import trl as adapter
    from flowloss.demo.sequence_train import SequenceDemoConfig, prepare

    seen = {}
    original = adapter.FlowRLTrainer.create_optimizer

    def spy(self):
        optimizer = original(self)
        seen["lrs"] = sorted({group["lr"] for group in optimizer.param_groups})
        return optimizer

    monkeypatch.setattr(adapter.FlowRLTrainer, "create_optimizer", spy)
    config = SequenceDemoConfig(trainer="trl", steps=1, lr=1e-3, lr_log_z=0.05, warm_steps=5, eval_every=1,
                                sums=(12, 15), methods=("flowrl",))
    config.validate()
    trl_demo.train_method_trl("flowrl", prepare(config), config)
    assert seen["lrs"] == [1e-3, 0.05]

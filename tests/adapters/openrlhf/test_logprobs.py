"""``--flowrl.logprobs``: OpenRLHF's own log-prob path and flowloss's two give the same training.

Each case trains three copies of one tiny policy (same seed, same batches) for three real
``ActorPPOTrainer.training_step``s, one per path, and compares what OpenRLHF computes on the way: the old-policy
and reference log-probs (no-gradient forwards through the actor class), the ``policy_loss``, the gradient of
every parameter (the log-Z head's included) handed to the optimizer, and the parameters after each SGD update.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close

PATHS = ("framework", "logits", "hidden")
CASES = {
    "temperature_and_bias": dict(temperature=0.7, bias=True),
    "tied_embeddings_and_bias": dict(tie=True, bias=True, temperature=1.3),
    "lora": dict(lora=True, temperature=0.7),
    "gradient_checkpointing": dict(checkpointing=True, bias=True),
}


def _train(example, adapter, path: str, steps: int = 3, *, entropy: bool = False, packing_runs: bool = False,
           **options):
    """Run ``steps`` training steps on path ``path``; per step: (experience fields, status, gradients)."""
    config = adapter.FlowRLConfig(log_z_dropout=0.0, logprobs=path)
    trainer, _, reference = example.build_trainer(config, lr=0.02, **options)
    assert trainer.flowrl_logprobs == path
    assert trainer.actor.model.is_gradient_checkpointing == options.get("checkpointing", False)
    if entropy:
        trainer.args.actor.entropy_coef = 0.0  # OpenRLHF computes and logs the entropy, adds nothing
    grads: dict[str, torch.Tensor] = {}
    step_optimizer = trainer.strategy.optimizer_step

    def capture(optimizer, model, scheduler, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.actor.named_parameters() if p.grad is not None})
        step_optimizer(optimizer, model, scheduler, **kwargs)

    trainer.strategy.optimizer_step = capture
    history = []
    for step in range(steps):
        experience = example.make_experience(trainer, reference, seed=10 + step)
        status = trainer.training_step(experience, kl_ctl=0.0, step=step)
        params = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
        history.append((experience, status["metrics"], dict(grads), params))
        grads.clear()
    return history


def _compare(got, expected, path: str) -> None:
    for step, ((exp, metrics, grads, params), (ref_exp, ref_metrics, ref_grads, ref_params)) in enumerate(
        zip(got, expected, strict=True)
    ):
        where = f"{path}, step {step}"
        assert_close(exp.action_log_probs, ref_exp.action_log_probs, dtype=torch.float32,
                     what=f"old-policy log-probs ({where})")
        assert_close(exp.base_action_log_probs, ref_exp.base_action_log_probs, dtype=torch.float32,
                     what=f"reference log-probs ({where})")
        assert_close(metrics["policy_loss"], ref_metrics["policy_loss"], dtype=torch.float32, scale=10.0,
                     what=f"policy_loss ({where})")
        for key in ("flowrl_logprobs_mean", "flowrl_log_z_mean"):
            assert_close(metrics[key], ref_metrics[key], dtype=torch.float32, what=f"{key} ({where})")
        if "entropy_loss" in ref_metrics:
            assert_close(metrics["entropy_loss"], ref_metrics["entropy_loss"], dtype=torch.float32,
                         what=f"entropy ({where})")
        assert set(grads) == set(ref_grads) and any("flowrl_log_z_head" in n for n in grads), where
        for name in ref_grads:
            assert_close(grads[name], ref_grads[name], dtype=torch.float32, scale=10.0,
                         what=f"d loss / d {name} ({where})")
        for name in ref_params:
            assert_close(params[name], ref_params[name], dtype=torch.float32, scale=10.0,
                         what=f"{name} after the update ({where})")


@pytest.mark.parametrize("case", CASES)
def test_log_prob_paths_give_the_same_training(adapter, example, case):
    runs = {path: _train(example, adapter, path, **CASES[case]) for path in PATHS}
    for path in ("logits", "hidden"):
        _compare(runs[path], runs["framework"], path)
    moved = [n for n, g in runs["framework"][-1][2].items() if float(g.abs().max()) > 0]
    assert any("lora_" in n for n in moved) == (case == "lora"), moved  # LoRA: the adapters are trained


def test_entropy_is_the_same_on_every_path(adapter, example, monkeypatch):
    """With --actor.entropy_coef 0 OpenRLHF computes the policy's entropy (logged as entropy_loss)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # OpenRLHF's compute_entropy, eager: same math
    runs = {path: _train(example, adapter, path, steps=1, entropy=True, temperature=0.7) for path in PATHS}
    assert "entropy_loss" in runs["framework"][0][1]
    for path in ("logits", "hidden"):
        _compare(runs[path], runs["framework"], path)


@pytest.mark.parametrize("path", PATHS)
def test_packed_samples_train_as_the_padded_batch(adapter, example, path):
    """--ds.packing_samples: the actor runs on OpenRLHF's packed [1, N] layout (and the log-Z head on the packed
    hidden states); log-probs, loss, gradients and updates equal the padded run's."""
    padded = _train(example, adapter, "framework", steps=2, temperature=0.7, bias=True)
    packed = _train(example, adapter, path, steps=2, temperature=0.7, bias=True, packing=True)
    _compare(packed, padded, f"packed {path}")


def test_auto_is_the_measured_cpu_default_and_framework_on_cuda(adapter):
    from flowloss.adapters.openrlhf import logprobs

    assert logprobs.resolve_logprobs("auto", torch.device("cpu")) == logprobs.CPU_DEFAULT == "hidden"
    assert logprobs.resolve_logprobs("auto", torch.device("cuda", 0)) == "framework"
    assert logprobs.resolve_logprobs("logits", torch.device("cuda", 0)) == "logits"
    with pytest.raises(ValueError, match="logprobs"):
        logprobs.resolve_logprobs("fused", torch.device("cpu"))
    with pytest.raises(ValueError, match="logprobs"):
        adapter.FlowRLConfig(logprobs="fused")


def test_hidden_path_is_refused_where_it_would_be_wrong(adapter, example):
    """The hidden path skips the model's own lm_head: refused (explicitly) or avoided ('auto') where the logits
    are not lm_head(h) - a softcapping config, a LoRA-wrapped lm_head."""
    from flowloss.adapters.openrlhf import logprobs

    model = example.tiny_model(0)
    model.config.final_logit_softcapping = 30.0
    actor = example.make_actor(model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        logprobs.use_flowrl_logprobs(actor, "hidden")
    assert logprobs.use_flowrl_logprobs(actor, "auto") == "logits"

    model = example.tiny_model(0)  # a model that rescales its logits after the lm_head: found by the probe
    forward = type(model).forward

    def scaled_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if out.logits is not None and out.logits.shape[-1] == self.config.vocab_size:
            out["logits"] = out.logits * 3.0
        return out

    model.forward = scaled_forward.__get__(model)
    actor = example.make_actor(model)
    with pytest.raises(ValueError, match="differ from lm_head"):
        logprobs.use_flowrl_logprobs(actor, "hidden")

    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(example.tiny_model(0), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"not a plain nn\.Linear"):
        logprobs.use_flowrl_logprobs(example.make_actor(lora_head), "hidden")


def test_flowrl_actor_forward_takes_the_installed_actor_forward_parameters(adapter):
    import inspect

    from openrlhf.models import Actor

    from flowloss.adapters.openrlhf.logprobs import FlowRLActor

    ours = list(inspect.signature(FlowRLActor.forward).parameters)
    theirs = list(inspect.signature(Actor.forward).parameters)
    assert ours == theirs, f"Actor.forward takes {theirs}, FlowRLActor.forward takes {ours}"

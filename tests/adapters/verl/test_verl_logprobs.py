"""``actor_rollout_ref.flowrl.logprobs``: verl's own log-prob path, flowloss on the logits, flowloss on the hidden
state, inside verl's real FSDP2 engine on CPU (verl_engines.py).

For each setting the same tiny Qwen2 trains a few steps through verl's ``forward_backward_batch`` and
``optimizer_step`` with FlowRL's loss (the log-Z head included), after a no-grad pass with entropy (verl's
old-log-prob pass). Checked: the three settings give the same log-probs and entropies (and the float64 oracle's),
the same loss at every step, the same gradients of every parameter (LLM, head, LoRA adapters) and the same
weights after the steps, with temperature != 1, an lm_head bias, tied embeddings and verl's own LoRA.
"""

from __future__ import annotations

import pytest
import torch
from framework_required import require_framework

require_framework("verl")
require_framework("transformers")
require_framework("peft")

from test_verl_loss import _actor_config  # noqa: E402
from verl_engines import (  # noqa: E402
    biased_lm_head,
    build_engine,
    named_grads,
    named_parameters,
    save_tiny_qwen2,
    train_data,
)

from flowloss.adapters import verl as fv  # noqa: E402
from flowloss.adapters.common import LOG_Z_HEAD_NAME  # noqa: E402
from flowloss.adapters.verl.logprobs import logprobs_from_logits, output_linear, resolve_logprobs  # noqa: E402

PATHS = ("framework", "logits", "hidden")
STEPS = 3


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    return {"untied": save_tiny_qwen2(root / "untied"), "tied": save_tiny_qwen2(root / "tied", tie=True)}


def _run(model_dir, path: str, *, temperature: float, bias: bool = False, lora_rank: int = 0):
    """Build the engine with ``logprobs=path``, run the no-grad pass and STEPS training steps (verl's
    ``forward_backward_batch`` and ``optimizer_step``); record everything."""
    flowrl = fv.FlowRLConfig(logprobs=path, log_z_dropout=0.0)
    torch.manual_seed(0)  # the head's initial weights (and LoRA's) are the same for every path
    # SGD: Adam's first steps move every weight by about lr * sign(gradient), which turns fp32 rounding in a
    # near-zero gradient into a visible weight difference; SGD keeps the comparison at the gradients' precision.
    engine = build_engine(model_dir, flowrl, bias=bias, lora_rank=lora_rank, optimizer="SGD", lr=0.05,
                          clip_grad=1.0)
    assert engine._flowrl_logprobs == path
    _, td = train_data(0, temperature=temperature, entropy=True)
    out = engine.infer_batch(td)["model_output"]
    record = {"log_probs": out["log_probs"], "entropy": out["entropy"], "loss": [], "grads": []}
    loss_fn = fv.make_flowrl_loss_fn(_actor_config(), flowrl)
    for step in range(STEPS):
        engine.optimizer_zero_grad()
        _, td = train_data(step, temperature=temperature)
        record["loss"].append(engine.forward_backward_batch(td, loss_fn)["loss"])
        record["grads"].append(named_grads(engine))
        engine.optimizer_step()
    record["params"] = named_parameters(engine)
    return engine, record


def _float64_logprobs(model_dir, td, *, temperature: float, bias: bool):
    """``log softmax(logits / T)[next token]`` and the entropy, per sequence run alone, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    if bias:
        biased_lm_head(model)
    model.double()
    logp, entropy = [], []
    with torch.no_grad():
        for ids in td["input_ids"].unbind():
            z = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0, :-1] / temperature
            log_p = torch.log_softmax(z, dim=-1)
            logp.append(log_p.gather(1, ids[1:].unsqueeze(1)).squeeze(1))
            entropy.append(-(log_p.exp() * log_p).sum(-1))
    return logp, entropy


def _assert_dicts_close(got: dict, expected: dict, what: str, *, rtol: float, atol: float) -> None:
    assert got.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} "
                                   f"{n}: {m}")


VARIANTS = {
    "temperature_0.7_bias": dict(model="untied", temperature=0.7, bias=True),
    "tied_embeddings": dict(model="tied", temperature=1.0),
    "lora_temperature_0.7": dict(model="untied", temperature=0.7, lora_rank=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paths_give_the_same_log_probs_loss_gradients_and_weights(model_dirs, variant):
    v = dict(VARIANTS[variant])
    model_dir = model_dirs[v.pop("model")]
    runs = {path: _run(model_dir, path, **v)[1] for path in PATHS}
    ref = runs["framework"]
    head_grads = [n for n in ref["grads"][0] if LOG_Z_HEAD_NAME in n]
    assert head_grads and all(ref["grads"][0][n].abs().sum() > 0 for n in head_grads)
    if v.get("lora_rank"):
        assert any("lora_" in n for n in ref["grads"][0])  # verl's own LoRA trains its adapters
        assert not any(LOG_Z_HEAD_NAME in n and "lora_" in n for n in ref["params"])
    for path in ("logits", "hidden"):
        got = runs[path]
        torch.testing.assert_close(got["log_probs"].values(), ref["log_probs"].values(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["entropy"].values(), ref["entropy"].values(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-5)
        for step in range(STEPS):
            _assert_dicts_close(got["grads"][step], ref["grads"][step], f"{path} step {step} gradient",
                                rtol=1e-4, atol=1e-5)
        _assert_dicts_close(got["params"], ref["params"], f"{path} weights after {STEPS} steps", rtol=1e-4,
                            atol=1e-5)
    if not v.get("lora_rank"):  # every path against float64, per sequence run alone
        _, td = train_data(0, temperature=v["temperature"], entropy=True)
        f64_logp, f64_entropy = _float64_logprobs(model_dir, td, temperature=v["temperature"],
                                                  bias=v.get("bias", False))
        for path in PATHS:
            for i, (lp, ent) in enumerate(zip(runs[path]["log_probs"].unbind(), runs[path]["entropy"].unbind())):
                torch.testing.assert_close(lp[:-1].double(), f64_logp[i], rtol=1e-5, atol=2e-5)
                torch.testing.assert_close(ent[:-1].double(), f64_entropy[i], rtol=1e-5, atol=2e-5)


def test_hidden_path_never_builds_the_logits(model_dirs):
    """With logprobs=hidden the lm_head's output is [1, N, 1] (training) / [1, N, 2] (with entropy), never V."""
    torch.manual_seed(0)
    engine = build_engine(model_dirs["untied"], fv.FlowRLConfig(logprobs="hidden", log_z_dropout=0.0))
    widths = []
    handle = engine.module.get_output_embeddings().register_forward_hook(
        lambda module, args, out: widths.append(out.shape[-1]))
    try:
        _, td = train_data(0, entropy=True)
        engine.infer_batch(td)
        _, td = train_data(0)
        engine.forward_backward_batch(td, fv.make_flowrl_loss_fn(_actor_config(), engine.flowrl_config))
    finally:
        handle.remove()
    assert widths == [2, 2, 1, 1]  # two micro-batches per pass; V = 64 never appears


def test_auto_is_the_measured_best_on_cpu_and_verls_own_path_on_gpus(model_dirs):
    assert resolve_logprobs("auto", "cpu") == "hidden"
    assert resolve_logprobs("auto", "cuda") == "framework" and resolve_logprobs("auto", "npu") == "framework"
    assert all(resolve_logprobs(p, "cuda") == p for p in PATHS)
    assert fv.FlowRLConfig().logprobs == "auto"
    torch.manual_seed(0)
    assert build_engine(model_dirs["untied"], fv.FlowRLConfig())._flowrl_logprobs == "hidden"  # verl's device: cpu


def test_hidden_path_refuses_what_it_cannot_compute():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    assert isinstance(output_linear(Qwen2ForCausalLM(config)), torch.nn.Linear)
    adapted = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"plain nn\.Linear.*logprobs=logits"):
        output_linear(adapted)
    config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        output_linear(Qwen2ForCausalLM(config))
    with pytest.raises(ValueError, match="per-sample temperature"):
        logprobs_from_logits(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), temperature=torch.ones(3),
                             entropy=False)


def test_fused_kernels_conflict_with_flowloss_paths(model_dirs, monkeypatch):
    _, td = train_data(0)
    from verl.utils import tensordict_utils as tu

    torch.manual_seed(0)
    engine = build_engine(model_dirs["untied"], fv.FlowRLConfig(logprobs="logits", log_z_dropout=0.0))
    tu.assign_non_tensor(td, use_fused_kernels=True)
    with pytest.raises(ValueError, match="use_fused_kernels=True needs verl's own log-prob path"):
        engine.forward_backward_batch(td, fv.make_flowrl_loss_fn(_actor_config(), engine.flowrl_config))

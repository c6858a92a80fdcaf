"""flowloss's log-prob paths inside TRL (``flowrl_logprobs``) against TRL's own fused head (``make test-adapter-trl``).

Every log-prob TRL computes goes through ``FlowRLTrainer._get_per_token_logps_and_entropies`` and the model's
``fused_lm_head=True`` forward, which `flowloss.adapters.trl.logprobs.FlowlossLMHead` answers with the chosen path.
Checked, each path against ``"framework"`` (TRL 1.16's ``ChunkedLogProbFunction``) within float32 tolerance:

* one micro-batch through ``_compute_loss``: the loss, the per-token log-probs and entropies, the reference's
  log-probs and the gradient of every trainable parameter, the log-Z head's included -- for tied embeddings, an
  untied ``lm_head`` with a bias, temperatures 0.7 / 1.3, LoRA (frozen ``lm_head``), ``modules_to_save=["lm_head"]``
  (an adapted, biased ``lm_head``), gradient checkpointing, a bf16 policy with ``cast_lm_head_to_fp32``, Cohere's
  logit scale, Mixtral's load-balancing loss and Gemma2's softcapping (``"logits"``; ``"hidden"`` refuses it);
* three real training steps (TRL's batching, old-policy and reference forwards, SGD), with and without PEFT: the
  logged losses and gradient norms, the old and reference log-probs TRL put in each batch, the final weights;
* a LoRA adapter on ``lm_head``: exact with ``"logits"`` (TRL refuses it), refused by ``"hidden"`` with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.adapters.conftest import require_framework
from tests.adapters.trl.helpers import manual_batch, tiny_model, with_deterministic_sampling
from tests.conftest import assert_close

PATHS = ("framework", "logits", "hidden")


def _lora(**overrides):
    require_framework("peft")
    from peft import LoraConfig

    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    options.update(overrides)
    return LoraConfig(**options)


def _trainer(adapter, example, policy_dir, model, output_dir, *, trainer_class=None, peft_config=None, **overrides):
    from transformers import AutoTokenizer

    options = dict(flowrl_log_z_dropout=0.0)
    options.update(overrides)
    trainer_class = trainer_class or adapter.FlowRLTrainer
    kwargs = {} if peft_config is None else {"peft_config": peft_config}
    return trainer_class(
        model=model, reward_funcs=example.reward_distinct_chars, args=example.make_config(str(output_dir), **options),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        train_dataset=example.Dataset.from_dict({"prompt": example.PROMPTS}), **kwargs,
    )


def _reference_logps(adapter, trainer, ids, attn, keep):
    if trainer.ref_model is not None:
        return trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attn, keep)[0]
    with trainer.accelerator.unwrap_model(trainer.model).disable_adapter():  # TRL's PEFT reference
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, keep)[0]


def _evaluate(adapter, trainer, batch, path):
    """Loss, gradients, log-probs, entropies, aux loss and reference log-probs of one batch with ``path``."""
    trainer.logprob_head.path = path
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = trainer._compute_loss(model, batch)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    with torch.no_grad():
        logps, entropy, aux = trainer._get_per_token_logps_and_entropies(
            model, ids, attn, keep, compute_entropy=True, compute_aux_loss=trainer.aux_loss_enabled
        )
        ref = _reference_logps(adapter, trainer, ids, attn, keep)
    return {"loss": loss.detach(), "grads": dict(zip(params, grads)), "logps": logps, "entropy": entropy,
            "aux": aux, "ref": ref}


def _assert_paths_agree(results, mask, *, grad_dtype=torch.float32):
    base = results["framework"]
    for path, got in results.items():
        if path == "framework":
            continue
        assert_close(got["loss"], base["loss"], dtype=torch.float32, scale=float(base["loss"].abs()) + 1,
                     what=f"{path}: FlowRL loss == framework's")
        for key in ("logps", "entropy", "ref"):
            assert_close(got[key] * mask, base[key] * mask, dtype=torch.float32, scale=10.0,
                         what=f"{path}: {key} == framework's")
        if base["aux"] is not None:
            assert_close(got["aux"], base["aux"], dtype=torch.float32, what=f"{path}: MoE aux loss == framework's")
        assert got["grads"].keys() == base["grads"].keys()
        assert any("flowrl_log_z_head" in n for n in base["grads"]), "the head is not among the trainable parameters"
        for name, expected in base["grads"].items():
            actual = got["grads"][name]
            assert (actual is None) == (expected is None), name
            if expected is not None:
                assert_close(actual, expected, dtype=grad_dtype, grad=True, scale=float(expected.abs().max()) + 1e-3,
                             what=f"{path}: d loss / d {name} == framework's")


def _variant(kind, policy_dir):
    """(model, trainer kwargs, config overrides, paths) of one case."""
    if kind == "tied_t07":
        return tiny_model("qwen2", policy_dir), {}, {"temperature": 0.7}, PATHS
    if kind == "bias_t13":
        return tiny_model("biased", policy_dir), {}, {"temperature": 1.3}, PATHS
    if kind == "lora_frozen_lm_head":
        return tiny_model("qwen2", policy_dir), {"peft_config": _lora()}, {"temperature": 0.7}, PATHS
    if kind == "lora_modules_to_save_lm_head":
        return (tiny_model("biased", policy_dir), {"peft_config": _lora(modules_to_save=["lm_head"])},
                {"temperature": 0.7}, PATHS)
    if kind == "gradient_checkpointing":
        return tiny_model("qwen2", policy_dir), {}, {"gradient_checkpointing": True, "temperature": 0.7}, PATHS
    if kind == "bf16_cast_lm_head_to_fp32":
        return (tiny_model("biased", policy_dir).to(torch.bfloat16), {}, {"cast_lm_head_to_fp32": True},
                PATHS)
    if kind == "cohere_logit_scale":
        return tiny_model("cohere", policy_dir), {}, {"temperature": 0.8}, PATHS
    if kind == "mixtral_aux_loss":
        return tiny_model("mixtral", policy_dir), {}, {}, PATHS
    if kind == "gemma2_softcap":
        return tiny_model("gemma2", policy_dir), {}, {"temperature": 0.7}, ("framework", "logits")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["tied_t07", "bias_t13", "lora_frozen_lm_head", "lora_modules_to_save_lm_head",
                                  "gradient_checkpointing", "bf16_cast_lm_head_to_fp32", "cohere_logit_scale",
                                  "mixtral_aux_loss", "gemma2_softcap"])
def test_each_path_gives_the_frameworks_loss_logprobs_and_gradients(adapter, example, policy_dir, tmp_path, kind):
    model, kwargs, overrides, paths = _variant(kind, policy_dir)
    trainer = _trainer(adapter, example, policy_dir, model, tmp_path, flowrl_logprobs=paths[-1], **kwargs,
                       **overrides)
    batch = manual_batch(trainer.processing_class.vocab_size, seed=5)
    batch[adapter.NUM_SEQUENCES_KEY] = torch.tensor(5)
    g = torch.Generator().manual_seed(2)
    batch["old_per_token_logps"] = batch["ref_per_token_logps"] + 0.1 * torch.randn(
        batch["ref_per_token_logps"].shape, generator=g)
    results = {path: _evaluate(adapter, trainer, batch, path) for path in paths}
    mask = batch["completion_mask"].float()
    bf16 = kind.startswith("bf16")
    _assert_paths_agree(results, mask, grad_dtype=torch.bfloat16 if bf16 else torch.float32)
    if kind == "mixtral_aux_loss":
        assert results["framework"]["aux"] is not None and trainer.aux_loss_enabled


def test_hidden_refuses_softcapping_and_auto_picks_an_exact_path(adapter, example, policy_dir, tmp_path):
    from flowloss.adapters.trl.logprobs import resolve_logprob_path

    with pytest.raises(ValueError, match=r"flowrl_logprobs='hidden' cannot be used: .*softcaps its logits"):
        _trainer(adapter, example, policy_dir, tiny_model("gemma2", policy_dir), tmp_path, flowrl_logprobs="hidden")
    assert resolve_logprob_path("auto", "cpu") == "hidden"
    assert resolve_logprob_path("auto", "cuda") == "framework"
    assert _trainer(adapter, example, policy_dir, policy_dir, tmp_path).logprob_path == "hidden"
    # "auto" falls back to the exact path next in line: TRL's head for softcapping, the logits for LoRA on lm_head
    gemma = _trainer(adapter, example, policy_dir, tiny_model("gemma2", policy_dir), tmp_path)
    assert gemma.logprob_path == "framework"
    lora = _trainer(adapter, example, policy_dir, tiny_model("biased", policy_dir), tmp_path,
                    peft_config=_lora(target_modules=["q_proj", "lm_head"]))
    assert lora.logprob_path == "logits"
    with pytest.raises(ValueError, match="`flowrl_logprobs` must be one of"):
        example.make_config(str(tmp_path), flowrl_logprobs="fused")


def test_lora_on_lm_head_is_exact_with_logits_and_refused_with_hidden(adapter, example, policy_dir, tmp_path):
    """TRL refuses a PEFT adapter on lm_head (its fused head reads lm_head.weight). The logits path runs lm_head's
    own forward, so the adapter's term is in the log-probs and trains; the hidden path would drop it: refused."""
    peft_config = _lora(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head carries a PEFT adapter"):
        _trainer(adapter, example, policy_dir, tiny_model("biased", policy_dir), tmp_path,
                 peft_config=copy.deepcopy(peft_config), flowrl_logprobs="hidden")
    with pytest.raises(ValueError, match="adapter to `lm_head` is not supported"):  # TRL's own refusal
        _trainer(adapter, example, policy_dir, tiny_model("biased", policy_dir), tmp_path,
                 peft_config=copy.deepcopy(peft_config), flowrl_logprobs="framework")
    trainer = _trainer(adapter, example, policy_dir, tiny_model("biased", policy_dir), tmp_path,
                       peft_config=peft_config, flowrl_logprobs="logits", temperature=0.7)
    model = trainer.model
    lm_head_lora = {n: p for n, p in model.named_parameters() if "lm_head" in n and "lora_" in n}
    assert len(lm_head_lora) == 2
    with torch.no_grad():  # a trained adapter: lora_B != 0, so the adapter changes the log-probs
        for name, param in lm_head_lora.items():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    batch = manual_batch(trainer.processing_class.vocab_size, seed=1)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    mask = batch["completion_mask"].float()

    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, keep)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -(keep + 1) : -1].double() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    assert_close(logps * mask, expected * mask, dtype=torch.float32, scale=10.0, what="logits path with LoRA lm_head")
    params = list(lm_head_lora.values())
    got = torch.autograd.grad((logps * mask).sum(), params)
    want = torch.autograd.grad((expected * mask).sum(), params)
    for a, e, name in zip(got, want, lm_head_lora):
        assert float(e.abs().max()) > 0, name
        assert_close(a, e, dtype=torch.float32, grad=True, scale=float(e.abs().max()), what=f"d logp / d {name}")
    with model.disable_adapter():  # the reference: the adapter's term really is in the log-probs above
        ref, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, keep)
    assert float(((ref - logps).detach().abs() * mask).max()) > 1e-2


def _train(adapter, example, policy_dir, tmp_path, path, case):
    trainer_class = with_deterministic_sampling(adapter.FlowRLTrainer)
    kwargs = {"peft_config": _lora()} if case == "lora" else {}
    model = tiny_model("qwen2" if case == "lora" else "biased", policy_dir)
    trainer = _trainer(adapter, example, policy_dir, model, tmp_path / path, trainer_class=trainer_class,
                       flowrl_logprobs=path, max_steps=3, gradient_accumulation_steps=1, steps_per_generation=2,
                       optim="sgd", learning_rate=0.05, temperature=0.7, **kwargs)
    batches = []
    original = trainer._compute_loss

    def compute_loss(model, inputs):
        batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return original(model, inputs)

    trainer._compute_loss = compute_loss
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, batches, weights


@pytest.mark.parametrize("case", ["bias", "lora"])
def test_a_few_real_training_steps_agree_across_paths(adapter, example, policy_dir, tmp_path, case):
    """Three steps (old-policy weights on, temperature 0.7), the same completions for each path: TRL's batches
    (old and reference log-probs), the logged loss and gradient norm, and the weights after training agree."""
    runs = {path: _train(adapter, example, policy_dir, tmp_path, path, case) for path in PATHS}
    base_logs, base_batches, base_weights = runs["framework"]
    assert len(base_logs) == 3 and len(base_batches) == 3 and all(r["grad_norm"] > 0 for r in base_logs)
    for path in ("logits", "hidden"):
        logs, batches, weights = runs[path]
        for step, (got, want) in enumerate(zip(logs, base_logs, strict=True)):
            for key in ("loss", "grad_norm", "entropy", "flowrl/log_z_mean", "flowrl/logprobs_mean"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (path, step, key)
        for step, (got, want) in enumerate(zip(batches, base_batches, strict=True)):
            mask = want["completion_mask"].float()
            assert torch.equal(got["completion_ids"], want["completion_ids"]), (path, step)
            for key in ("old_per_token_logps", "ref_per_token_logps"):
                assert_close(got[key] * mask, want[key] * mask, dtype=torch.float32, scale=10.0,
                             what=f"{path} step {step}: {key}")
        for name, value in weights.items():
            assert_close(value, base_weights[name], dtype=torch.float32, scale=10.0, what=f"{path}: {name}")

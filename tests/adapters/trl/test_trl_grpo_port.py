"""TRL's own ``GRPOTrainer`` tests, ported to ``FlowRLTrainer`` (``make test-adapter-trl``).

Learned from ``tests/test_grpo_trainer.py`` of huggingface/trl and rewritten for this repository: tiny models
built from configs here (no hub), prompts written here, one or two optimizer steps each (TRL trains whole epochs),
and FlowRL's expectations (the head trains with the policy; GRPO-only options are refused). Each test names the
TRL test it ports. A test passes when FlowRLTrainer trains as GRPOTrainer does, or refuses clearly.

Not ported, and why:

* the entropy-mask helper (``TestGetHighEntropyMask``), ``get_off_policy_mask`` and the entropy-bonus scale tests:
  TRL internals behind options FlowRL refuses (``top_entropy_quantile``, ``off_policy_mask_threshold``,
  ``entropy_coef``); the refusals are tested below;
* rollout-function dispatch, transformers' continuous batching, tools and environments (``jmespath`` and agent
  loops are not installed here), vision-language models (no VLM or image processor without the hub): FlowRL adds
  nothing to those code paths (its ``_compute_loss`` passes the multimodal inputs through unchanged);
* vLLM (server, colocate, structured outputs, importance-sampling correction), Liger kernels, bitsandbytes and
  the GPU ("slow") tests: not installed here / no GPU;
* ``test_train_multiple_dataloader_workers`` and ``test_trust_remote_code``: about data loading and hub code, not
  the trainer (and slow on 2 shared cores); ``test_warning_raised_sequence_level_with_token_summed_loss``: about a
  GRPO loss warning for options FlowRL refuses.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch

from tests.adapters.conftest import require_framework
from tests.adapters.trl.helpers import load_example, tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["red is better than", "blue is", "green is better", "a big", "small is better than", "one is better",
           "two", "three is not", "four cats and", "five dogs are", "six suns", "seven moons are not"]
EVAL_PROMPTS = ["eight is", "nine is better", "ten cats"]


@pytest.fixture(scope="module")
def trl():
    return require_framework("trl")


@pytest.fixture(scope="module")
def env(trl, tmp_path_factory):
    """The policy (tiny Qwen2 + tokenizer with a chat template), a reward model on its tokenizer, datasets."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    import flowloss.adapters.trl as adapter

    example = load_example()
    root = tmp_path_factory.mktemp("port")
    policy = example.build_tiny_policy(str(root / "policy"))
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(policy)
    torch.manual_seed(1)
    reward = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None))
    reward.save_pretrained(str(root / "reward"))
    tokenizer.save_pretrained(str(root / "reward"))

    def data(prompts, conversational=False):
        rows = [[{"role": "user", "content": p}] for p in prompts] if conversational else prompts
        return Dataset.from_dict({"prompt": rows})

    return {
        "adapter": adapter, "policy": policy, "reward": str(root / "reward"), "tokenizer": tokenizer,
        "train": data(PROMPTS), "test": data(EVAL_PROMPTS), "chat_train": data(PROMPTS, conversational=True),
        "root": root,
    }


def _args(env, tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=3, num_generations=3,
                   max_completion_length=8, report_to="none", use_cpu=True, bf16=False, max_steps=1,
                   logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    options.update(overrides)
    return env["adapter"].FlowRLConfig(**options)


def _trainer(env, tmp_path, *, model=None, reward_funcs=None, train_dataset=None, **kwargs):
    config = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("eval_dataset", "peft_config", "processing_class",
                                                                 "reward_processing_classes")}
    return env["adapter"].FlowRLTrainer(
        model=env["policy"] if model is None else model,
        reward_funcs=env["reward"] if reward_funcs is None else reward_funcs,
        args=_args(env, tmp_path, **config),
        train_dataset=env["train"] if train_dataset is None else train_dataset,
        **kwargs,
    )


def _snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _train_and_check(trainer, *, frozen=()):
    """Train; the run logs a finite FlowRL loss and every trainable parameter (head included) changed."""
    before = _snapshot(trainer)
    assert any("flowrl_log_z_head" in n for n in before), "the log-Z head is not trainable"
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs), logs
    assert "flowrl/residual_abs_mean" in logs[-1] and trainer.state.log_history[-1]["train_loss"] is not None
    for name, value in before.items():
        if name not in frozen:
            assert not torch.equal(value, trainer.model.get_parameter(name)), f"Parameter {name} has not changed."
    return logs


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _distinct_reward(completions, **kwargs):
    return [float(len(set(c))) for c in completions]


# -- initialisation ----------------------------------------------------------------------------------------


def test_init_minimal(env, tmp_path, monkeypatch):
    """test_init_minimal: model, reward model and dataset only (the default config, here FlowRLConfig's)."""
    monkeypatch.chdir(tmp_path)
    trainer = env["adapter"].FlowRLTrainer(model=env["policy"], reward_funcs=env["reward"],
                                           train_dataset=env["train"])
    assert isinstance(trainer.args, env["adapter"].FlowRLConfig) and trainer.args.beta == 0.0


@pytest.mark.parametrize("kind", ["dataset", "dict_of_dataset", "none"])
def test_init_with_eval_dataset(env, tmp_path, kind):
    """test_init_with_eval_dataset (map-style kinds)."""
    eval_dataset = {"dataset": env["test"], "dict_of_dataset": {"a": env["test"], "b": env["test"]},
                    "none": None}[kind]
    _trainer(env, tmp_path, eval_dataset=eval_dataset)


def test_mismatched_reward_processing_classes_length(env, tmp_path):
    with pytest.raises(ValueError, match="must match"):
        _trainer(env, tmp_path, reward_funcs=[env["reward"], env["reward"]],
                 reward_processing_classes=env["tokenizer"])


def test_reward_processing_classes_list_and_single(env, tmp_path):
    """test_correct_reward_processing_classes_list + test_single_reward_model_with_single_processing_class."""
    two = _trainer(env, tmp_path, reward_funcs=[env["reward"], env["reward"]],
                   reward_processing_classes=[env["tokenizer"], env["tokenizer"]])
    assert len(two.reward_processing_classes) == 2
    one = _trainer(env, tmp_path, reward_processing_classes=env["tokenizer"])
    assert one.reward_processing_classes == [env["tokenizer"]]


# -- what FlowRL refuses, clearly ----------------------------------------------------------------------------


@pytest.mark.parametrize("trl_test,option", [
    ("test_train_loss_types[bnpo]", {"loss_type": "bnpo"}),
    ("test_train_loss_types[dr_grpo]", {"loss_type": "dr_grpo"}),
    ("test_train_loss_types[cispo]", {"loss_type": "cispo"}),
    ("test_train_loss_types[sapo]", {"loss_type": "sapo"}),
    ("test_train_loss_types[luspo]", {"loss_type": "luspo"}),
    ("test_train_loss_types[vespo]", {"loss_type": "vespo"}),
    ("test_train_beta_non_zero", {"beta": 0.1}),
    ("test_train_with_off_policy_mask", {"off_policy_mask_threshold": 0.5}),
    ("test_train_with_bias_correction_kl", {"use_bias_correction_kl": True}),
    ("test_train_with_static_entropy", {"entropy_coef": 0.01}),
    ("test_train_with_adaptive_entropy", {"use_adaptive_entropy": True}),
    ("test_train_with_entropy_filter", {"top_entropy_quantile": 0.2}),
    ("test_train_delta_clipping", {"delta": 2.0}),
    ("test_train_sequence_importance_sampling", {"importance_sampling_level": "sequence"}),
    ("test_train_vllm_importance_sampling_correction", {"vllm_importance_sampling_mode": "token_truncate"}),
])
def test_grpo_only_options_are_refused_clearly(env, tmp_path, trl_test, option):
    """These TRL tests train with a GRPO loss option; FlowRL refuses each, naming it and saying why."""
    (name,) = option
    with pytest.raises(ValueError, match=f"`{name}"):
        _args(env, tmp_path, **option)


# -- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "cohere", "gemma2", "mixtral"])
def test_train(env, tmp_path, family):
    """test_train over model families (Cohere: logit scale; Gemma2: softcapping; Mixtral: MoE aux loss)."""
    model = env["policy"] if family == "qwen2" else tiny_model(family, env["policy"])
    trainer = _trainer(env, tmp_path, model=model, processing_class=env["tokenizer"])
    logs = _train_and_check(trainer)
    if family == "mixtral":
        assert trainer.aux_loss_enabled and "aux_loss" in logs[-1]


@pytest.mark.parametrize("conversational", [False, True])
def test_train_dataset_format(env, tmp_path, conversational):
    _train_and_check(_trainer(env, tmp_path, train_dataset=env["chat_train" if conversational else "train"]))


def test_train_with_eval(env, tmp_path):
    """test_train_with_eval + test_train_with_num_generations_eval: FlowRL's loss in eval mode (groups of 1)."""
    trainer = _trainer(env, tmp_path, eval_dataset=env["test"], eval_strategy="steps", eval_steps=1, max_steps=2,
                       per_device_eval_batch_size=3, num_generations_eval=1)
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in evals)


def test_train_with_iterable_dataset(env, tmp_path):
    trainer = _trainer(env, tmp_path, train_dataset=env["train"].to_iterable_dataset())
    assert trainer.args.accelerator_config.dispatch_batches is False
    _train_and_check(trainer)


def test_train_multiple_iterations(env, tmp_path):
    """num_iterations=2: TRL keeps old log-probs, FlowRL weights the sequences by pi / pi_old."""
    logs = _train_and_check(_trainer(env, tmp_path, num_iterations=2))
    assert "flowrl/weight_mean" in logs[-1]


def _peft_frozen(trainer, base_names):
    return {n for n in _snapshot(trainer) if n in base_names}


@pytest.mark.parametrize("how", ["peft_config", "peft_model", "peft_config_gradient_checkpointing"])
def test_train_peft(env, tmp_path, how):
    """test_train_peft_config, test_train_peft_model, test_train_peft_with_gradient_checkpointing."""
    require_framework("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["policy"])
    base = {f"base_model.model.{n}": p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {}
    if how == "peft_model":
        model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    else:
        kwargs["peft_config"] = LoraConfig(target_modules=["q_proj", "v_proj"])
    # Two steps: lora_B starts at 0, so lora_A's gradient is 0 at the first one.
    trainer = _trainer(env, tmp_path, model=model, processing_class=env["tokenizer"], max_steps=2,
                       gradient_checkpointing=how.endswith("checkpointing"), **kwargs)
    _train_and_check(trainer)
    for name, value in base.items():
        if name in dict(trainer.model.named_parameters()):
            assert torch.equal(value, trainer.model.get_parameter(name)), f"base parameter {name} changed"


def test_train_different_reward_model(env, tmp_path):
    """A reward model with its own tokenizer (another vocabulary and chat template), conversational prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    bpe = Tokenizer(models.BPE(unk_token="[unk]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(PROMPTS * 5, trainer=trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[pad]", "[eos]", "[unk]"], initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[pad]", eos_token="[eos]", unk_token="[unk]")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    torch.manual_seed(2)
    reward = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    _train_and_check(_trainer(env, tmp_path, reward_funcs=reward, reward_processing_classes=tokenizer,
                              train_dataset=env["chat_train"]))


def test_train_reward_funcs(env, tmp_path):
    """test_train_reward_func_standard + test_train_multiple_reward_funcs + test_train_multiple_mixed_reward_funcs:
    two functions and the reward model."""
    trainer = _trainer(env, tmp_path, reward_funcs=[_length_reward, _distinct_reward, env["reward"]])
    logs = _train_and_check(trainer)
    assert "rewards/_length_reward/mean" in logs[-1] and "rewards/_distinct_reward/mean" in logs[-1]


def test_train_reward_func_conversational(env, tmp_path):
    def reward(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    _train_and_check(_trainer(env, tmp_path, reward_funcs=reward, train_dataset=env["chat_train"]))


def test_train_multiple_reward_funcs_with_none_output(env, tmp_path):
    def not_applicable(completions, **kwargs):
        return [None] * len(completions)

    _train_and_check(_trainer(env, tmp_path, reward_funcs=[_length_reward, not_applicable]))


def test_train_multiple_reward_funcs_with_weights(env, tmp_path):
    logs = _train_and_check(_trainer(env, tmp_path, reward_funcs=[_length_reward, _distinct_reward],
                                     reward_weights=[0.7, 0.3]))
    for key in ("rewards/_length_reward/mean", "rewards/_length_reward/std", "rewards/_distinct_reward/mean"):
        assert key in logs[-1], key


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_reward_metric_reflects_reward_weights(env, tmp_path, aggregation):
    """test_reward_metric_reflects_reward_weights + test_train_normalize_then_sum_aggregation."""
    def one(completions, **kwargs):
        return [1.0] * len(completions)

    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = _trainer(env, tmp_path, reward_funcs=[one, zero], reward_weights=[0.7, 0.3],
                       multi_objective_aggregation=aggregation)
    trainer.train()
    assert trainer.state.log_history[-2]["reward"] == pytest.approx(0.7, abs=1e-5)


def test_train_reward_func_additional_column(env, tmp_path):
    dataset = env["train"].add_column("some_values", list(range(len(PROMPTS))))
    seen = []

    def reward(completions, some_values, **kwargs):
        seen.extend(some_values)
        return [float(abs(len(c) - v)) for c, v in zip(completions, some_values)]

    _train_and_check(_trainer(env, tmp_path, reward_funcs=reward, train_dataset=dataset))
    assert seen and set(seen) <= set(range(len(PROMPTS)))


def test_train_with_sync_ref_model(env, tmp_path):
    """test_train_with_sync_ref_model (failed with ``zip() argument 2 is longer than argument 1``, issue 19)."""
    trainer = _trainer(env, tmp_path, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    _train_and_check(trainer)
    assert all(not torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())


def test_train_with_pad_to_multiple_of(env, tmp_path):
    _train_and_check(_trainer(env, tmp_path, pad_to_multiple_of=8))


def test_train_with_cast_lm_head_to_fp32(env, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["policy"], dtype=torch.bfloat16)
    trainer = _trainer(env, tmp_path, model=model, processing_class=env["tokenizer"], cast_lm_head_to_fp32=True)
    assert trainer.model.lm_head.weight.dtype == torch.float32
    _train_and_check(trainer)


def test_train_with_generation_kwargs(env, tmp_path):
    """test_train_with_generation_kwargs + test_train_with_additional_generation_kwargs."""
    _train_and_check(_trainer(env, tmp_path, top_k=10, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                              generation_kwargs={"do_sample": True, "num_beams": 2, "length_penalty": -0.1}))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
def test_train_scale_rewards(env, tmp_path, scale_rewards):
    _train_and_check(_trainer(env, tmp_path, scale_rewards=scale_rewards))


def test_train_with_mask_truncated_completions(env, tmp_path):
    """Two of three completions end with EOS (one exactly at the limit), one is truncated and masked out."""
    eos = env["tokenizer"].eos_token_id
    pad = env["tokenizer"].pad_token_id

    def fake_generate(input_ids, **kwargs):
        rows = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, eos, pad, pad, pad, pad], [16, 17, 18, 19, 20, 21, 22, eos]]
        completions = torch.tensor([rows[i % 3] for i in range(input_ids.size(0))], device=input_ids.device)
        return torch.cat([input_ids, completions], dim=1)

    with patch("transformers.generation.utils.GenerationMixin.generate", side_effect=fake_generate):
        _train_and_check(_trainer(env, tmp_path, mask_truncated_completions=True))


def test_train_with_mask_truncated_completions_all_masked(env, tmp_path):
    """Every completion truncated and masked: the loss is 0 and nothing moves, the head included."""
    def fake_generate(input_ids, **kwargs):
        completions = torch.full((input_ids.size(0), 8), 5, device=input_ids.device)
        return torch.cat([input_ids, completions], dim=1)

    trainer = _trainer(env, tmp_path, mask_truncated_completions=True)
    before = _snapshot(trainer)
    with patch("transformers.generation.utils.GenerationMixin.generate", side_effect=fake_generate):
        trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(0.0)
    for name, value in before.items():
        assert torch.equal(value, trainer.model.get_parameter(name)), f"Parameter {name} has changed."


def test_warning_raised_all_rewards_none(env, tmp_path, caplog):
    def none(completions, **kwargs):
        return [None] * len(completions)

    trainer = _trainer(env, tmp_path, reward_funcs=none)
    with caplog.at_level("WARNING", logger="trl.trainer.grpo_trainer"):
        trainer.train()
    assert "All reward functions returned None for the following kwargs:" in caplog.text


def test_train_num_generations_larger_than_batch_size(env, tmp_path):
    """Groups of 6 over two micro-batches of 3: FlowRL's normalizer counts the whole generation batch."""
    _train_and_check(_trainer(env, tmp_path, num_generations=6, gradient_accumulation_steps=2))


def test_reward_funcs_see_trainer_state_log_extra_and_log_metric(env, tmp_path):
    """test_train_with_reward_func_accessing_trainer_state, ..._with_log_extra, ..._with_log_metric."""
    def reward(completions, trainer_state=None, log_extra=None, log_metric=None, **kwargs):
        assert hasattr(trainer_state, "global_step")
        log_extra("test_column", [c[:5] for c in completions])
        log_metric("custom_accuracy", 0.75)
        return [float(len(c)) for c in completions]

    trainer = _trainer(env, tmp_path, reward_funcs=reward, log_completions=True)
    trainer.train()
    assert "test_column" in trainer._logs["extra"]
    assert "custom_accuracy" in {k for entry in trainer.state.log_history for k in entry}


def test_prepare_input_called_with_correct_data(env, tmp_path):
    """TRL's buffering with steps_per_generation=2: each generation batch (2 prompts x 4) is handed to 2 training
    steps, in dataset order; FlowRL's normalizer counts per generation batch."""
    trainer = _trainer(env, tmp_path, per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
                       shuffle_dataset=False, max_steps=4)
    first = [{"prompt": PROMPTS[0]}] * 4 + [{"prompt": PROMPTS[1]}] * 4
    second = [{"prompt": PROMPTS[2]}] * 4 + [{"prompt": PROMPTS[3]}] * 4
    with patch.object(type(trainer), "training_step", wraps=trainer.training_step) as step:
        trainer.train()
    assert step.call_count == 4
    batches = [call.args[1] for call in step.call_args_list]
    assert batches[:2] == [first] * 2 and batches[2:] == [second] * 2


def test_train_with_chat_template_kwargs(env, tmp_path):
    _train_and_check(_trainer(env, tmp_path, train_dataset=env["chat_train"],
                              chat_template_kwargs={"enable_thinking": False}))


def test_the_port_runs_with_flowloss_s_default_path(env, tmp_path):
    """The tests above run with ``flowrl_logprobs="auto"``, which is "hidden" on CPU (``use_cpu=True``)."""
    assert _trainer(env, tmp_path).logprob_path == "hidden"

"""The log-Z head inside verl's FSDP language-model engine: ``FlowRLFSDPEngine.forward_step`` on CPU.

verl's ``forward_step`` (input packing, log-probs from logits, the loss call) runs unchanged on a tiny random
Qwen2; the only stand-ins are the device look-ups (``get_device_id``/``get_device_name`` return ``"cpu"``,
since verl asks CUDA for them) and the engine's constructor (FSDP wrapping needs a process group and a GPU),
replaced by setting the attributes ``forward_step`` reads. The packed (remove-padding) forward keeps sequences
apart through their position ids, so each log Z is checked against the sequence run alone.
"""

from __future__ import annotations

import pytest
import torch
from framework_required import require_framework

require_framework("verl")
require_framework("transformers")

import verl.workers.engine.fsdp.transformer_impl as transformer_impl  # noqa: E402
from test_verl_loss import _actor_config, _batch, _micro_batch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402

import flowloss  # noqa: E402
from flowloss.adapters import verl as fv  # noqa: E402
from flowloss.adapters.common import LOG_Z_HEAD_NAME, without_log_z_head  # noqa: E402


def _tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


@pytest.fixture
def cpu_device(monkeypatch):
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")


def _engine(model, flowrl: fv.FlowRLConfig):
    engine = object.__new__(fv.FlowRLFSDPEngine)
    engine.flowrl_config = flowrl
    engine._flowrl_head, engine._flowrl_ctx = fv.attach_log_z_head(model, flowrl)
    engine.module = model
    engine.pad_to_length = None
    engine.pass_packed_cu_seqlens = False
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine._autocast_dtype = torch.float32
    engine.get_data_parallel_group = lambda: None
    return engine


def _recording(loss_fn=None):
    """A loss function that keeps each model_output it sees (log_z is for the loss only: the engine's returned
    outputs leave it out, since verl concatenates them as nested tensors)."""
    seen = []

    def loss(model_output, data, dp_group=None):
        seen.append(model_output)
        if loss_fn is None:
            return torch.zeros(()), {}
        return loss_fn(model_output=model_output, data=data, dp_group=dp_group)

    return loss, seen


def _micro(seed: int = 0):
    data, *_ = _batch(seed)
    mb = _micro_batch(data, list(range(6)), dp_size=1, global_batch_size=6)
    tu.assign_non_tensor(mb, use_remove_padding=True, temperature=1.0)
    return data, mb


def _prompt_pooled_by_hand(hidden: torch.Tensor, prompt_lens, seq_lens) -> torch.Tensor:
    rows, start = [], 0
    for p, n in zip(prompt_lens.tolist(), seq_lens.tolist()):
        rows.append(hidden[start:start + p].mean(dim=0))
        start += n
    return torch.stack(rows)


def test_forward_step_emits_log_z_and_loss_equals_trajectory_balance(cpu_device):
    model = _tiny_model()
    flowrl = fv.FlowRLConfig(log_z_dropout=0.0)
    engine = _engine(model, flowrl)
    data, mb = _micro()
    loss_fn, seen = _recording(fv.make_flowrl_loss_fn(_actor_config(), flowrl))
    loss, out = engine.forward_step(mb, loss_function=loss_fn, forward_only=False)
    model_output = seen[0]
    assert set(model_output.keys()) >= {"log_probs", "log_z"}
    assert "log_z" not in out["model_output"]

    # log Z = head(mean of the prompt's last-layer hidden states), recomputed from the same packed forward.
    prompt_lens = mb["prompts"].offsets().diff() if mb["prompts"].is_nested else (
        mb["attention_mask"][:, : mb["prompts"].shape[1]].sum(1))
    seq_lens = mb["input_ids"].offsets().diff()
    pooled = []
    with torch.no_grad():  # each sequence alone, unpacked: the packed forward must not mix sequences
        for ids, p in zip(mb["input_ids"].unbind(), prompt_lens.tolist()):
            hidden = model.model(input_ids=ids.unsqueeze(0), use_cache=False).last_hidden_state[0]
            pooled.append(hidden[:p].mean(dim=0))
        expected_log_z = engine._flowrl_head(torch.stack(pooled))
    assert seq_lens.sum() == mb["input_ids"].values().numel()
    torch.testing.assert_close(model_output["log_z"], expected_log_z, rtol=1e-5, atol=1e-5)

    # The loss is trajectory_balance_loss on the engine's own log-probs and log Z.
    from verl.workers.utils.padding import no_padding_2_padding

    log_probs = no_padding_2_padding(model_output["log_probs"], mb)
    mask = data["response_mask"].bool()
    expected = flowloss.trajectory_balance_loss(
        log_probs, data["ref_log_prob"], flowloss.masked_mean(data["advantages"].float(), mask),
        model_output["log_z"], mask, old_logprobs=data["old_log_probs"], normalizer=6,
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)

    loss.backward()
    head_grad = sum(p.grad.abs().sum() for p in engine._flowrl_head.parameters())
    llm_grad = model.model.layers[0].mlp.up_proj.weight.grad.abs().sum()
    assert head_grad > 0 and llm_grad > 0  # the head trains and its gradient reaches the LLM (no detach)


def test_optimizer_updates_head_and_checkpoint_round_trips(cpu_device, tmp_path):
    model = _tiny_model()
    flowrl = fv.FlowRLConfig(log_z_dropout=0.0)
    engine = _engine(model, flowrl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built after attaching, as verl does
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, mb = _micro()
    loss, _ = engine.forward_step(mb, loss_function=fv.make_flowrl_loss_fn(_actor_config(), flowrl),
                                  forward_only=False)
    loss.backward()
    optimizer.step()
    state = model.state_dict()
    head_keys = [k for k in state if k.startswith(LOG_Z_HEAD_NAME + ".")]
    assert head_keys and all(not torch.equal(state[k], before[k]) for k in head_keys if k.endswith("weight"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(state[key], before[key])

    torch.save(state, tmp_path / "actor.pt")
    restored = _tiny_model(seed=1)
    restored_engine = _engine(restored, flowrl)
    restored.load_state_dict(torch.load(tmp_path / "actor.pt"), strict=True)
    _, mb1 = _micro()
    _, mb2 = _micro()
    record1, seen1 = _recording()
    record2, seen2 = _recording()
    with torch.no_grad():
        engine.forward_step(mb1, loss_function=record1, forward_only=True)
        restored_engine.forward_step(mb2, loss_function=record2, forward_only=True)
    torch.testing.assert_close(seen1[0]["log_z"], seen2[0]["log_z"])


def test_weight_sync_leaves_the_head_out():
    model = _tiny_model()
    fv.attach_log_z_head(model)
    state = model.state_dict()
    synced = without_log_z_head(state)
    assert not any(LOG_Z_HEAD_NAME in k for k in synced)
    assert len(synced) == len(state) - sum(LOG_Z_HEAD_NAME in k for k in state)
    from_generator = list(without_log_z_head((k, v) for k, v in state.items()))
    assert [k for k, _ in from_generator] == list(synced)


def test_packed_pooling_ignores_pad_suffix_and_drops_last_token():
    torch.manual_seed(0)
    head = flowloss.LogZHead(8, dropout=0.0)
    hidden = torch.randn(1, 12, 8)
    prompt_lens, seq_lens = torch.tensor([2, 3]), torch.tensor([4, 6])  # rows 10, 11: static pad
    got = fv.packed_prompt_log_z(head, hidden, prompt_lens, seq_lens)
    torch.testing.assert_close(got, head(_prompt_pooled_by_hand(hidden[0], prompt_lens, seq_lens)))
    dropped = fv.packed_prompt_log_z(head, hidden, prompt_lens, seq_lens, drop_last_prompt_token=True)
    torch.testing.assert_close(dropped, head(_prompt_pooled_by_hand(hidden[0], prompt_lens - 1, seq_lens)))
    with pytest.raises(ValueError, match="packed layout"):
        fv.packed_prompt_log_z(head, hidden, prompt_lens, torch.tensor([8, 6]))


def test_sequence_parallel_is_refused(cpu_device):
    engine = _engine(_tiny_model(), fv.FlowRLConfig())
    engine.use_ulysses_sp = True
    _, mb = _micro()
    with pytest.raises(ValueError, match="sequence parallelism"):
        engine.prepare_model_inputs(mb)


def test_register_flowrl_engine_replaces_language_model_engine(monkeypatch):
    from verl.workers.engine.base import EngineRegistry

    saved = {k: dict(v) for k, v in EngineRegistry._engines["language_model"].items()}
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    try:
        cls = fv.register_flowrl_engine({"beta": 10.0})
        assert cls.flowrl_config.loss.beta == 10.0 and issubclass(cls, fv.FlowRLFSDPEngine)
        assert EngineRegistry.get_engine_cls("language_model", "fsdp") is cls
        assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is cls
    finally:
        EngineRegistry._engines["language_model"] = saved


def _delta_engine(model):
    engine = _engine(model, fv.FlowRLConfig(log_z_dropout=0.0))
    engine._is_offload_param = False
    engine._uses_fsdp2_cpu_offload_policy = False
    engine.delta_pin_snapshots = False
    return engine


def test_shard_export_leaves_the_head_out(cpu_device):
    # verl's delta checkpoint engine and prime_delta_snapshots read get_per_tensor_param_shard, which exports
    # the module's whole state dict (the head included) as (name, local_flat_shard, ShardSpec).
    model = _tiny_model()
    engine = _delta_engine(model)
    gen, peft_config = engine.get_per_tensor_param_shard()
    exported = list(gen)
    names = [name for name, _, _ in exported]
    expected = [k for k in model.state_dict() if LOG_Z_HEAD_NAME not in k]
    assert peft_config is None
    assert names == expected and len(expected) < len(model.state_dict())
    for name, local, spec in exported:
        assert local.numel() == model.state_dict()[name].numel() and spec.full_shape == tuple(
            model.state_dict()[name].shape)


def test_delta_sync_snapshots_and_deltas_leave_the_head_out(cpu_device, monkeypatch):
    # prime_delta_snapshots (verl's own, in engine/base.py) snapshots what get_per_tensor_param_shard yields;
    # get_per_tensor_param_delta_shard hands the same export to verl.workers.engine.utils.hf_delta_export.
    # That function imports verl.checkpoint_engine, whose package import needs rollout-side servers (uvicorn)
    # this CPU venv lacks, so it is replaced by a stand-in recording the (name, shard, spec) stream it gets.
    import verl.workers.engine.utils as engine_utils

    model = _tiny_model()
    engine = _delta_engine(model)
    engine.prime_delta_snapshots()
    snaps = engine._delta_shard_snap
    assert snaps and not any(LOG_Z_HEAD_NAME in k for k in snaps)
    assert set(snaps) == {k for k in model.state_dict() if LOG_Z_HEAD_NAME not in k}

    def recording_export(gen, snap_dict, entry_fn):
        for name, local, _spec in gen:
            assert snap_dict[name].numel() == local.numel()  # what verl's hf_delta_export asserts
            yield name

    monkeypatch.setattr(engine_utils, "hf_delta_export", recording_export)
    gen, peft_config = engine.get_per_tensor_param_delta_shard()
    names = list(gen)
    assert peft_config is None and names == list(snaps)

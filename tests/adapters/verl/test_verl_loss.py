"""flowloss.adapters.verl against the installed verl: the worker loss on real TensorDict micro-batches.

Checks: the loss function called as verl's worker calls it equals ``trajectory_balance_loss`` (and the formula
written out in float64); data-parallel / micro-batch aggregation through ``global_batch_size`` and ``dp_size``
reproduces the whole-batch gradient; the registered policy-loss name resolves through verl's
``get_policy_loss_fn`` and runs inside verl's own ``ppo_loss``.
"""

from __future__ import annotations

import math

import pytest
import torch
from framework_required import require_framework

require_framework("verl")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import flowloss  # noqa: E402
from flowloss.adapters import verl as fv  # noqa: E402

BETA = 15.0


def _actor_config(**overrides) -> FSDPActorConfig:
    options = dict(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, use_kl_loss=True,
                   kl_loss_coef=0.0, rollout_n=1)
    options.update(overrides)
    return FSDPActorConfig(**options)


def _batch(seed: int, batch: int = 6, prompt: int = 5, response: int = 7, groups: int = 3):
    """Left-padded prompts, right-padded responses, verl's field names; rollout-side tensors."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, prompt + 1, (batch,), generator=g)
    response_lens = torch.randint(1, response + 1, (batch,), generator=g)
    response_lens[0] = response  # at least one full-length response, as verl pads to the longest
    prompt_mask = torch.arange(prompt).unsqueeze(0) >= (prompt - prompt_lens).unsqueeze(1)
    response_mask = torch.arange(response).unsqueeze(0) < response_lens.unsqueeze(1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    prompts = torch.randint(3, 50, (batch, prompt), generator=g) * prompt_mask
    responses = torch.randint(3, 50, (batch, response), generator=g) * response_mask
    scores = torch.randn(batch, generator=g)
    uid = torch.arange(batch) % groups
    adv = flowloss.group_normalize_rewards(scores, uid)
    data = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask.long(),
        "old_log_probs": -torch.rand(batch, response, generator=g) * 2 * response_mask,
        "ref_log_prob": -torch.rand(batch, response, generator=g) * 2 * response_mask,
        "advantages": adv.unsqueeze(1) * response_mask,
        "uid": uid,
    }
    token_lp = (-torch.rand(batch, response, generator=g) * 2) * response_mask
    log_z = torch.randn(batch, generator=g)
    return data, token_lp, log_z, prompt_lens, response_lens


def _micro_batch(data: dict, rows: list[int], *, dp_size: int, global_batch_size: int | None) -> TensorDict:
    """The worker's micro-batch: verl's no-padding conversion plus the global batch info the engine adds."""
    td = TensorDict({k: v[rows] for k, v in data.items()}, batch_size=[len(rows)])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, dp_size=dp_size, global_batch_size=global_batch_size,
                         batch_num_tokens=int(data["response_mask"].sum()))
    return td


def _model_output(token_lp: torch.Tensor, rows: list[int], prompt_lens, response_lens, log_z=None):
    """A nested ``log_probs`` over prompt+response (shifted like the engine's output), from leaf tensors."""
    flat = []
    for i in rows:
        full = torch.zeros(int(prompt_lens[i] + response_lens[i]), dtype=token_lp.dtype)
        p, r = int(prompt_lens[i]), int(response_lens[i])
        # Position p - 1 + t holds the log-prob of response token t (the model predicts the next token).
        full = torch.cat([full[: p - 1], token_lp[i, :r], full[p - 1 + r:]])
        flat.append(full)
    lengths = torch.tensor([len(f) for f in flat])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(torch.cat(flat), offsets)}
    if log_z is not None:
        out["log_z"] = log_z[rows]
    return out


def _f64_formula(token_lp, ref, old, adv, mask, log_z, normalizer, eps=(0.2, 0.28)):
    """``sum_i clip(exp(sum_t (lp - old)), 1-eps_lo, 1+eps_hi) * delta_i^2 / N`` in float64, spelled out."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(token_lp.shape[0]):
        m = mask[i].bool()
        n = int(m.sum())
        lp, rf, od = token_lp[i, m].double(), ref[i, m].double(), old[i, m].double()
        r_hat = float(adv[i, m][0])
        log_w = float((lp - od).sum())
        w = math.exp(min(max(log_w, math.log(1 - eps[0])), math.log(1 + eps[1])))
        delta = log_z[i].double() + lp.sum() / n - BETA * r_hat - rf.sum() / n
        total = total + w * delta**2
    return total / normalizer


def test_loss_fn_equals_trajectory_balance_loss_on_verl_micro_batch():
    data, token_lp, log_z, pl, rl = _batch(0)
    rows = list(range(6))
    lp = token_lp.clone().requires_grad_(True)
    lz = log_z.clone().requires_grad_(True)
    loss_fn = fv.make_flowrl_loss_fn(_actor_config())
    loss, metrics = loss_fn(model_output=_model_output(lp, rows, pl, rl, lz), data=_micro_batch(
        data, rows, dp_size=1, global_batch_size=6), dp_group=None)
    loss.backward()

    lp2 = token_lp.clone().requires_grad_(True)
    lz2 = log_z.clone().requires_grad_(True)
    mask = data["response_mask"].bool()
    adv = flowloss.masked_mean(data["advantages"].float(), mask)
    expected = flowloss.trajectory_balance_loss(
        lp2, data["ref_log_prob"], adv, lz2, mask, beta=BETA, old_logprobs=data["old_log_probs"],
        importance_weights="sequence_clipped", eps_low=0.2, eps_high=0.28,
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lz.grad, lz2.grad, rtol=1e-6, atol=1e-7)
    formula = _f64_formula(token_lp, data["ref_log_prob"], data["old_log_probs"], data["advantages"], mask,
                           log_z, 6)
    assert abs(loss.item() - formula.item()) <= 1e-5 * max(1.0, abs(formula.item()))
    assert "actor/pg_loss" in metrics and "actor/flowrl/weight_mean" in metrics


def test_sequence_rewards_recovers_grpo_group_zscore():
    """verl writes the GRPO z-score on every response token; the adapter reads it back per sequence."""
    data, *_ = _batch(1)
    r = fv.sequence_rewards(data["advantages"].float(), data["response_mask"])
    torch.testing.assert_close(r, data["advantages"].float()[:, 0])  # every response has >= 1 token
    empty = torch.zeros(2, 3)
    torch.testing.assert_close(fv.sequence_rewards(empty, torch.zeros(2, 3)), torch.zeros(2))


@pytest.mark.parametrize("log_z_source", ["head", "vargrad"])
def test_two_ranks_with_global_batch_info_match_one_rank(log_z_source):
    """DDP averages gradients over ranks; with global_batch_size that equals the whole-batch gradient."""
    data, token_lp, log_z, pl, rl = _batch(2, batch=8, groups=4)
    loss_fn = fv.make_flowrl_loss_fn(_actor_config(), {"log_z": log_z_source})

    def grads(rows_per_rank: list[list[list[int]]]):
        lp = token_lp.clone().requires_grad_(True)
        lz = log_z.clone().requires_grad_(True)
        dp = len(rows_per_rank)
        total = torch.zeros(())
        for rank_micro_batches in rows_per_rank:
            for rows in rank_micro_batches:  # gradient accumulation over micro-batches, as the engine does
                loss, _ = loss_fn(model_output=_model_output(lp, rows, pl, rl, lz),
                                  data=_micro_batch(data, rows, dp_size=dp, global_batch_size=8))
                total = total + loss / dp  # the all-reduce averages over ranks
        total.backward()
        return lp.grad, lz.grad

    # Groups {0,4}, {1,5}, {2,6}, {3,7} stay whole within each micro-batch (VarGrad needs the group).
    one_rank = grads([[[0, 1, 2, 3, 4, 5, 6, 7]]])
    two_ranks = grads([[[0, 4, 1, 5]], [[2, 6], [3, 7]]])
    torch.testing.assert_close(two_ranks[0], one_rank[0], rtol=1e-5, atol=1e-7)
    if log_z_source == "head":
        torch.testing.assert_close(two_ranks[1], one_rank[1], rtol=1e-5, atol=1e-7)


def test_vargrad_uses_uid_groups():
    data, token_lp, _, pl, rl = _batch(3)
    rows = list(range(6))
    loss, _ = fv.make_flowrl_loss_fn(_actor_config(), {"log_z": "vargrad"})(
        model_output=_model_output(token_lp, rows, pl, rl), data=_micro_batch(data, rows, dp_size=1,
                                                                               global_batch_size=None))
    mask = data["response_mask"].bool()
    adv = flowloss.masked_mean(data["advantages"].float(), mask)
    log_z = flowloss.vargrad_log_z(token_lp, data["ref_log_prob"], adv, mask, data["uid"], beta=BETA)
    expected = flowloss.trajectory_balance_loss(token_lp, data["ref_log_prob"], adv, log_z, mask,
                                                old_logprobs=data["old_log_probs"])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_clear_errors_for_missing_inputs():
    data, token_lp, log_z, pl, rl = _batch(4)
    rows = list(range(6))
    loss_fn = fv.make_flowrl_loss_fn(_actor_config())
    mb = _micro_batch(data, rows, dp_size=1, global_batch_size=6)
    with pytest.raises(ValueError, match="log_z"):
        loss_fn(model_output=_model_output(token_lp, rows, pl, rl), data=mb)
    no_ref = {k: v for k, v in data.items() if k != "ref_log_prob"}
    with pytest.raises(ValueError, match="use_kl_loss=True"):
        loss_fn(model_output=_model_output(token_lp, rows, pl, rl, log_z),
                data=_micro_batch(no_ref, rows, dp_size=1, global_batch_size=6))
    with pytest.raises(ValueError, match="global_batch_size"):
        loss_fn(model_output=_model_output(token_lp, rows, pl, rl, log_z),
                data=_micro_batch(data, rows, dp_size=2, global_batch_size=None))
    no_uid = {k: v for k, v in data.items() if k != "uid"}
    with pytest.raises(ValueError, match="uid"):
        fv.make_flowrl_loss_fn(_actor_config(), {"log_z": "vargrad"})(
            model_output=_model_output(token_lp, rows, pl, rl), data=_micro_batch(no_uid, rows, dp_size=1,
                                                                                  global_batch_size=6))
    with pytest.raises(TypeError, match="unknown FlowRL option"):
        fv.FlowRLConfig.from_any({"bta": 1.0})
    with pytest.raises(ValueError, match="log_z"):
        fv.FlowRLConfig(log_z="table")


def test_kl_loss_added_only_with_nonzero_coef():
    data, token_lp, log_z, pl, rl = _batch(5)
    rows = list(range(6))
    args = dict(model_output=_model_output(token_lp, rows, pl, rl, log_z),
                data=_micro_batch(data, rows, dp_size=1, global_batch_size=6))
    base, _ = fv.make_flowrl_loss_fn(_actor_config())(**args)
    kl_config = _actor_config(kl_loss_coef=0.5, kl_loss_type="low_var_kl")
    with_kl, metrics = fv.make_flowrl_loss_fn(kl_config)(**args)
    assert "kl_loss" in metrics
    kl = float(metrics["kl_loss"].aggregate())
    assert kl > 0
    assert abs((with_kl - base).item() - 0.5 * kl) <= 1e-5


def test_registered_policy_loss_resolves_and_runs_inside_ppo_loss():
    fv.register_flowrl_policy_loss()
    fn = get_policy_loss_fn(fv.REGISTERED_POLICY_LOSS)
    data, token_lp, _, pl, rl = _batch(6)
    rows = list(range(6))
    config = _actor_config(use_kl_loss=False, policy_loss={"loss_mode": fv.REGISTERED_POLICY_LOSS})
    lp = token_lp.clone().requires_grad_(True)
    loss, metrics = ppo_loss(config, _model_output(lp, rows, pl, rl),
                             _micro_batch(data, rows, dp_size=1, global_batch_size=6))
    loss.backward()

    lp2 = token_lp.clone().requires_grad_(True)
    mask = data["response_mask"].bool()
    adv = flowloss.masked_mean(data["advantages"].float(), mask)
    old = data["old_log_probs"]
    log_z = flowloss.vargrad_log_z(lp2, old, adv, mask, torch.zeros(6, dtype=torch.long), beta=BETA)
    expected = flowloss.trajectory_balance_loss(lp2, old, adv, log_z, mask, old_logprobs=old, normalizer=6)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-6, atol=1e-7)
    direct, _ = fn(old_log_prob=old, log_prob=token_lp, advantages=data["advantages"].float(),
                   response_mask=data["response_mask"], loss_agg_mode="token-mean", config=_actor_config())
    torch.testing.assert_close(direct, expected.detach(), rtol=1e-6, atol=1e-6)
    assert "actor/pg_loss" in metrics


def test_kl_loss_uses_loss_scale_factor_like_ppo_loss():
    # verl's ppo_loss passes config.loss_scale_factor to agg_loss for the KL term; with
    # "seq-mean-token-sum-norm" it replaces the padded horizon (T = 7 here) as the divisor.
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty

    data, token_lp, log_z, pl, rl = _batch(6)
    rows = list(range(6))
    config = _actor_config(kl_loss_coef=0.5, kl_loss_type="low_var_kl",
                           loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=64)
    _, metrics = fv.make_flowrl_loss_fn(config)(
        model_output=_model_output(token_lp, rows, pl, rl, log_z),
        data=_micro_batch(data, rows, dp_size=1, global_batch_size=6))
    mask = data["response_mask"].bool()
    kld = kl_penalty(logprob=token_lp, ref_logprob=data["ref_log_prob"], kl_penalty="low_var_kl")
    expected = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode="seq-mean-token-sum-norm",
                        dp_size=1, global_batch_size=6, loss_scale_factor=64)
    assert mask.shape[-1] != 64
    assert abs(float(metrics["kl_loss"].aggregate()) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))


def test_config_keys_of_0_1_still_work_with_a_deprecation_warning():
    """0.1's verl config said `use_rollout_log_probs` / `drop_last_prompt_token`; one name per concept now, the
    old keys translated (a compatible path) with a warning."""
    with pytest.warns(DeprecationWarning, match="use `rollout_tis`"):
        old = fv.FlowRLConfig.from_any({"use_rollout_log_probs": True, "drop_last_prompt_token": True})
    assert old == fv.FlowRLConfig(rollout_tis=True, log_z_drop_last_prompt_token=True)
    with pytest.raises(TypeError, match="both `use_rollout_log_probs` and its new name"), pytest.warns(
        DeprecationWarning
    ):
        fv.FlowRLConfig(use_rollout_log_probs=True, rollout_tis=False)


def _sequence_is_weights(data: dict, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's rollout correction with rollout_is=sequence: one truncated weight per sequence on every token."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(data["response_mask"].shape[0], generator=g) * 1.5 + 0.25
    return c, c.unsqueeze(1) * data["response_mask"]


def _per_sequence_terms(token_lp, ref, adv, log_z, mask, old, normalizer):
    return flowloss.trajectory_balance_loss(token_lp, ref, adv, log_z, mask, old_logprobs=old,
                                            normalizer=normalizer, reduction="none")


def test_registered_policy_loss_uses_rollout_is_weights():
    """Issue 19 item 7: flowrl_old_ref ignored verl's rollout_is_weights without a word. They multiply each
    sequence's term: sum_i c_i w_i delta_i^2 / N, c_i their mean over the response (the sequence weight)."""
    fv.register_flowrl_policy_loss()
    data, token_lp, _, pl, rl = _batch(7)
    c, weights = _sequence_is_weights(data)
    rows = list(range(6))
    config = _actor_config(use_kl_loss=False, policy_loss={"loss_mode": fv.REGISTERED_POLICY_LOSS})
    lp = token_lp.clone().requires_grad_(True)
    loss, metrics = ppo_loss(config, _model_output(lp, rows, pl, rl),
                             _micro_batch({**data, "rollout_is_weights": weights}, rows, dp_size=1,
                                          global_batch_size=6))
    loss.backward()

    lp2 = token_lp.clone().requires_grad_(True)
    mask = data["response_mask"].bool()
    adv = flowloss.masked_mean(data["advantages"].float(), mask)
    old = data["old_log_probs"]
    log_z = flowloss.vargrad_log_z(lp2, old, adv, mask, torch.zeros(6, dtype=torch.long), beta=BETA)
    expected = (c * _per_sequence_terms(lp2, old, adv, log_z, mask, old, 6)).sum()
    expected.backward()
    unweighted = _per_sequence_terms(token_lp, old, adv, log_z.detach(), mask, old, 6).sum()
    assert not torch.allclose(expected.detach(), unweighted)  # the weights matter on this input
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-6, atol=1e-7)
    assert abs(metrics["actor/flowrl/rollout_is_weight_mean"].aggregate() - float(c.mean())) < 1e-6


def test_flowrl_loss_uses_rollout_is_weights_and_refuses_them_with_rollout_tis():
    data, token_lp, log_z, pl, rl = _batch(8)
    c, weights = _sequence_is_weights(data)
    rows = list(range(6))
    weighted = {**data, "rollout_is_weights": weights}
    lp = token_lp.clone().requires_grad_(True)
    loss, _ = fv.make_flowrl_loss_fn(_actor_config())(
        model_output=_model_output(lp, rows, pl, rl, log_z), data=_micro_batch(weighted, rows, dp_size=1,
                                                                               global_batch_size=6))
    mask = data["response_mask"].bool()
    adv = flowloss.masked_mean(data["advantages"].float(), mask)
    expected = (c * _per_sequence_terms(token_lp, data["ref_log_prob"], adv, log_z, mask, data["old_log_probs"],
                                        6)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with_tis = {**weighted, "rollout_log_probs": data["old_log_probs"]}
    with pytest.raises(ValueError, match="rollout_tis=True` both correct"):
        fv.make_flowrl_loss_fn(_actor_config(), {"rollout_tis": True})(
            model_output=_model_output(lp, rows, pl, rl, log_z), data=_micro_batch(with_tis, rows, dp_size=1,
                                                                                   global_batch_size=6))


def test_actor_settings_flowrl_would_ignore_are_refused_together():
    """Issue 20: entropy_coeff, clip ratios and dual clip were ignored without a word; one error lists them."""
    config = _actor_config(entropy_coeff=0.01, clip_ratio_high=0.3, clip_ratio_c=2.0)
    with pytest.raises(ValueError, match="3 verl setting") as info:
        fv.make_flowrl_loss_fn(config)
    message = str(info.value)
    for needle in ("entropy_coeff=0.01", "clip_ratio_high=0.3", "actor_rollout_ref.flowrl.eps_high",
                   "clip_ratio_c=2.0"):
        assert needle in message
    # FlowRL's own clip range written in verl's names, and verl's defaults, are accepted.
    fv.make_flowrl_loss_fn(_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28))
    fv.make_flowrl_loss_fn(_actor_config(clip_ratio_high=0.3), {"eps_high": 0.3})


# The public names of flowloss.adapters.verl when it was one module (0.1): the package keeps them all.
_NAMES_OF_0_1 = ("REGISTERED_POLICY_LOSS", "FlowRLConfig", "FlowRLFSDPEngine", "LogZSource", "attach_log_z_head",
                 "flowrl_loss", "install_flowrl_loss", "make_flowrl_loss_fn", "packed_prompt_log_z",
                 "register_flowrl", "register_flowrl_engine", "register_flowrl_policy_loss",
                 "register_flowrl_trainer", "sequence_rewards", "set_flowrl_loss_fn")


def test_every_name_of_the_single_module_still_imports():
    import importlib

    module = importlib.import_module("flowloss.adapters.verl")
    for name in _NAMES_OF_0_1:
        assert getattr(module, name) is not None, name
    assert set(_NAMES_OF_0_1) - {"LogZSource"} <= set(module.__all__)
    assert module.FlowRLFSDPEngine is module.FlowRLFSDPEngine  # built once, on first access
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018

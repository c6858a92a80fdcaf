"""The promise of `flowloss.strict`, input by input: outside strict mode a non-finite value at a position that takes
part gives a non-finite result, never a silently finite one.

Every float tensor input of every public function is poisoned at one position that takes part (an unmasked
token, a row with a kept token, a kept label's row), with each of NaN, +inf and -inf, and the output must be
non-finite. The exceptions are legal values with a defined meaning, listed in ``docs/hot-path.md``:

* ``-inf`` in logits is a token of probability 0 (a padded or banned column): finite unless it is the label;
* ``-inf`` in ``rollout_logprobs`` is ``pi_rollout = 0``: the TIS factor is truncated to exactly ``tis_cap``;
* `ratio_clip_token_mask` returns a bool mask, which has no NaN: a NaN ratio keeps its token, whose NaN then
  reaches the loss through the log-probs themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import flowloss
from flowloss import (
    LogZHead,
    clipped_importance_weights,
    group_normalize_rewards,
    masked_mean,
    masked_sum,
    pool_prompt_hidden_states,
    reduce_sequences,
    reverse_kl_surrogate,
    token_logprobs,
    token_logprobs_from_hidden,
    trajectory_balance_loss,
    vargrad_log_z,
)

B, T, V, H = 4, 5, 7, 3
NAN, INF = float("nan"), float("inf")
POISONS = {"nan": NAN, "+inf": INF, "-inf": -INF}


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3] = False  # an all-masked row: poison there must not matter (checked separately)
    return {
        "logprobs": lp,
        "ref_logprobs": -torch.rand(B, T, generator=g),
        "old_logprobs": lp + 0.1 * torch.randn(B, T, generator=g),
        "rollout_logprobs": lp + 0.1 * torch.randn(B, T, generator=g),
        "rewards": torch.randn(B, generator=g),
        "log_z": torch.randn(B, generator=g),
        "baseline": torch.randn(B, generator=g),
        "normalizer": torch.tensor(3.0),
        "mask": mask,
        "logits": torch.randn(B, T, V, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g),
        "bias": torch.randn(V, generator=g),
        "pooled": torch.randn(B, H, generator=g),
        "per_sequence": torch.randn(B, generator=g),
    }


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    inputs: tuple[str, ...]  # float tensor inputs to poison
    legal: tuple[tuple[str, str], ...] = ()  # (input, poison) with a defined finite meaning


def _tb(x, **kw):
    return trajectory_balance_loss(x["logprobs"], x["ref_logprobs"], x["rewards"], x["log_z"], x["mask"], **kw)


def _rkl(x, **kw):
    return reverse_kl_surrogate(x["logprobs"], x["ref_logprobs"], x["rewards"], x["mask"], **kw)


CASES = [
    Case("trajectory_balance_loss", lambda x: _tb(x), ("logprobs", "ref_logprobs", "rewards", "log_z")),
    Case(
        "trajectory_balance_loss, weights and TIS",
        lambda x: _tb(x, old_logprobs=x["old_logprobs"], rollout_logprobs=x["rollout_logprobs"],
                      normalizer=x["normalizer"]),
        ("logprobs", "ref_logprobs", "rewards", "log_z", "old_logprobs", "rollout_logprobs", "normalizer"),
        legal=(("rollout_logprobs", "-inf"),),
    ),
    *[
        Case(f"trajectory_balance_loss, {mode}", lambda x, mode=mode: _tb(x, old_logprobs=x["old_logprobs"],
                                                                         importance_weights=mode),
             ("old_logprobs",))
        for mode in ("sequence_capped", "sequence", "geometric_clipped")
    ],
    Case(
        "trajectory_balance_loss, token clip mask",
        lambda x: _tb(x, old_logprobs=x["old_logprobs"], token_clip_mask=True),
        ("logprobs", "ref_logprobs", "rewards", "log_z", "old_logprobs"),
    ),
    Case(
        "reverse_kl_surrogate",
        lambda x: _rkl(x, baseline=x["baseline"], old_logprobs=x["old_logprobs"],
                       rollout_logprobs=x["rollout_logprobs"], normalizer=x["normalizer"]),
        ("logprobs", "ref_logprobs", "rewards", "baseline", "old_logprobs", "rollout_logprobs", "normalizer"),
        legal=(("rollout_logprobs", "-inf"),),
    ),
    Case("masked_sum", lambda x: masked_sum(x["logprobs"], x["mask"]), ("logprobs",)),
    Case("masked_mean", lambda x: masked_mean(x["logprobs"], x["mask"]), ("logprobs",)),
    Case(
        "reduce_sequences",
        lambda x: reduce_sequences(x["per_sequence"], x["mask"].any(-1), normalizer=x["normalizer"]),
        ("per_sequence", "normalizer"),
    ),
    Case(
        "clipped_importance_weights",
        lambda x: clipped_importance_weights(x["logprobs"], x["old_logprobs"], x["mask"],
                                             rollout_logprobs=x["rollout_logprobs"]),
        ("logprobs", "old_logprobs", "rollout_logprobs"),
        legal=(("rollout_logprobs", "-inf"),),
    ),
    Case("group_normalize_rewards", lambda x: group_normalize_rewards(x["rewards"], 2), ("rewards",)),
    Case(
        "vargrad_log_z",
        lambda x: vargrad_log_z(x["logprobs"], x["ref_logprobs"], x["rewards"], x["mask"], 2),
        ("logprobs", "ref_logprobs", "rewards"),
    ),
    Case("pool_prompt_hidden_states", lambda x: pool_prompt_hidden_states(x["hidden"], x["mask"]), ("hidden",)),
    Case("LogZHead", lambda x: _head()(x["pooled"]), ("pooled",)),
    Case(
        "token_logprobs",
        lambda x: token_logprobs(x["logits"], x["labels"], mask=x["mask"], return_entropy=True)[0],
        ("logits",),
        legal=(("logits", "-inf"),),  # unless at the label: see the next case
    ),
    Case(
        "token_logprobs entropy",
        lambda x: token_logprobs(x["logits"], x["labels"], mask=x["mask"], return_entropy=True)[1],
        ("logits",),
        legal=(("logits", "-inf"),),
    ),
    Case(
        "token_logprobs_from_hidden",
        lambda x: token_logprobs_from_hidden(x["hidden"], x["weight"], x["labels"], mask=x["mask"], bias=x["bias"]),
        ("hidden", "weight", "bias"),
    ),
]


def _head() -> LogZHead:
    torch.manual_seed(0)
    return LogZHead(H, dropout=0.0).eval()


def _poison(x: dict[str, torch.Tensor], name: str, value: float) -> None:
    """Put ``value`` at a position of ``x[name]`` that takes part in the result (row 0, unmasked token 1)."""
    t = x[name].clone()
    if name == "logits":
        t[0, 1, int(x["labels"][0, 1]) - 1] = value  # not the label's column
    elif name == "weight":
        t[int(x["labels"][0, 1])] = value  # the label's row of W
    elif t.dim() == 0:
        t.fill_(value)
    elif t.dim() == 1:
        t[0 if name != "bias" else int(x["labels"][0, 1])] = value
    elif t.dim() == 2:
        t[0, 1] = value
    else:
        t[0, 1, 0] = value
    x[name] = t


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_non_finite_input_where_it_takes_part_gives_a_non_finite_result(case, poison):
    clean = case.run(_inputs())
    assert torch.isfinite(clean).all(), f"{case.name}: the clean inputs give a finite result"
    for name in case.inputs:
        x = _inputs()
        _poison(x, name, POISONS[poison])
        out = case.run(x)
        if (name, poison) in case.legal:
            assert torch.isfinite(out).all(), f"{case.name}: {poison} in `{name}` has a finite meaning"
        else:
            assert not torch.isfinite(out).all(), f"{case.name}: {poison} in `{name}` gave a finite {out}"


def test_minus_inf_at_the_label_gives_minus_inf():
    x = _inputs()
    x["logits"][0, 1, int(x["labels"][0, 1])] = -INF
    assert token_logprobs(x["logits"], x["labels"], mask=x["mask"])[0, 1] == -INF


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("name", ["logprobs", "ref_logprobs", "old_logprobs", "rollout_logprobs", "rewards",
                                  "log_z"])
def test_poison_on_an_all_masked_row_or_a_masked_token_changes_nothing(name, poison):
    """Masked positions and all-masked rows take no part: the loss and its gradients are bitwise unchanged."""

    def loss_and_grads(x):
        lp = x["logprobs"].clone().requires_grad_(True)
        lz = x["log_z"].clone().requires_grad_(True)
        loss = trajectory_balance_loss(lp, x["ref_logprobs"], x["rewards"], lz, x["mask"],
                                       old_logprobs=x["old_logprobs"], rollout_logprobs=x["rollout_logprobs"])
        loss.backward()
        return loss.detach(), lp.grad, lz.grad

    expected = loss_and_grads(_inputs())
    x = _inputs()
    t = x[name].clone()
    if t.dim() == 1:
        t[3] = POISONS[poison]  # row 3 is all masked
    else:
        t[3, 0] = POISONS[poison]
        t[1, 4] = POISONS[poison]  # masked token of a live row
    x[name] = t
    got = loss_and_grads(x)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_the_bool_mask_of_ratio_clip_token_mask_keeps_a_nan_token():
    """Documented exception: a bool has no NaN. The token is kept, so its NaN reaches the loss."""
    x = _inputs()
    _poison(x, "old_logprobs", NAN)
    kept = flowloss.ratio_clip_token_mask(x["logprobs"], x["old_logprobs"], x["rewards"], x["mask"])
    assert bool(kept[0, 1])
    loss = _tb(x, old_logprobs=x["old_logprobs"], token_clip_mask=True)
    assert not torch.isfinite(loss)

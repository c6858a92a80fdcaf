"""The training hot path: no host synchronisation, fake/meta tensors, torch.compile(fullgraph=True), and
exact second derivatives.

A host synchronisation is any call that needs a tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``, ``int(t)``, ``float(t)``, ``.nonzero()``). On a GPU each one stalls the queue mid-step and rules
out CUDA graphs; here they are caught three ways: by counting those calls (CPU), by running on the meta device
and under ``FakeTensorMode`` (where no value exists, so any such call raises), and by tracing with
``torch.compile(fullgraph=True)`` (where one would break the graph). The GPU lane adds
``torch.cuda.set_sync_debug_mode("error")`` (``tests/test_hot_path_gpu.py``).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flowloss
from flowloss import reference
from flowloss.ops import chunked

SYNCING = ("item", "__bool__", "tolist", "__int__", "__float__", "nonzero")
FLOWLOSS_SRC = os.path.dirname(flowloss.__file__)


@contextlib.contextmanager
def count_host_syncs():
    """Count host-reading calls made *from flowloss's source* (the tests' own calls are not counted)."""
    import sys

    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(FLOWLOSS_SRC):
                calls.append(f"{name} from {os.path.relpath(caller, FLOWLOSS_SRC)}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return counted

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def batch(device="cpu", b=6, t=5, v=11, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    mask = (torch.rand(b, t, generator=g) > 0.25).to(device)
    mask[0] = False  # an empty row
    return dict(
        logits=rand(b, t + 1, v).requires_grad_(),
        labels=torch.randint(0, v, (b, t), generator=g).to(device),
        mask=mask,
        hidden=rand(b, t, h).requires_grad_(),
        weight=rand(v, h).requires_grad_(),
        rewards=rand(b),
        old=-rand(b, t).abs(),
        rollout=-rand(b, t).abs(),
        ref=-rand(b, t).abs(),
        groups=torch.tensor([3, 1, 3, 1, 7, 7], device=device)[:b],
    )


def full_step(x, head):
    """One FlowRL update's loss path: log-probs from logits and from hidden states, group-normalized rewards,
    log Z from the prompt's hidden states, both losses with every per-call feature, and the building blocks."""
    lp = flowloss.token_logprobs(x["logits"][:, :-1], x["labels"], mask=x["mask"], temperature=0.7)
    lp_h, ent = flowloss.token_logprobs_from_hidden(
        x["hidden"], x["weight"], x["labels"], mask=x["mask"], return_entropy=True
    )
    r_hat = flowloss.group_normalize_rewards(x["rewards"], x["groups"])
    r_fixed = flowloss.group_normalize_rewards(x["rewards"], 2)
    log_z = head(flowloss.pool_prompt_hidden_states(x["hidden"], x["mask"]))
    n = flowloss.count_valid_sequences(x["mask"])
    tb, stats = flowloss.trajectory_balance_loss(
        lp, x["ref"], r_hat, log_z, x["mask"], old_logprobs=x["old"], rollout_logprobs=x["rollout"],
        token_clip_mask=True, normalizer=n, return_stats=True,
    )
    tb_h = flowloss.trajectory_balance_loss(lp_h, x["ref"], r_fixed, log_z, x["mask"], penalty="huber")
    vargrad = flowloss.vargrad_log_z(lp_h, x["ref"], r_hat, x["mask"], x["groups"])
    rkl = flowloss.reverse_kl_surrogate(lp, x["ref"], r_hat, x["mask"], baseline=-vargrad, return_stats=True)[0]
    w = flowloss.clipped_importance_weights(lp, x["old"], x["mask"])
    kept = flowloss.ratio_clip_token_mask(lp, x["old"], r_hat, x["mask"])
    extra = flowloss.masked_mean(ent, kept).sum() + flowloss.masked_sum(lp, x["mask"]).sum() * w.sum()
    extra = extra + flowloss.reduce_sequences(w, kept.any(-1), normalizer=n)
    return tb + tb_h + rkl + 0.0 * extra + 0.0 * sum(v.sum() for v in stats.values() if v.is_floating_point())


def test_a_full_step_makes_no_host_synchronisation_outside_cpu_only_branches():
    """Counted on CPU: the only host reads allowed are the chunked ops' CPU branches (free on CPU, skipped on
    any other device: see the meta-device test), which run inside the custom ops."""
    x = batch()
    head = flowloss.LogZHead(8)
    with count_host_syncs() as calls:
        full_step(x, head).backward()
    outside = [c for c in calls if not c.split(" from ")[1].startswith(("ops/chunked.py", "ops/_block_math.py"))]
    assert outside == [], outside


def test_a_full_step_runs_on_the_meta_device():
    """No value exists on meta: any host read raises. Covers forward and backward of the whole step."""
    x = batch("meta")
    head = flowloss.LogZHead(8).to("meta")
    loss = full_step(x, head)
    loss.backward()
    assert loss.device.type == "meta" and x["logits"].grad.shape == x["logits"].shape
    assert x["weight"].grad.shape == x["weight"].shape and head.out.weight.grad is not None


@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_chunked_implementations_make_no_host_read_off_cpu(kind):
    """The chunked code's device path (what runs for CUDA tensors with impl='chunked') on meta tensors."""
    m = torch.device("meta")
    labels = torch.tensor([3, -1, 0, 7], device=m)
    if kind == "logits":
        logits = torch.empty(4, 11, device=m)
        logp, ent = chunked.logits_forward(logits, labels, temperature=0.7, return_entropy=True, chunk_rows=2,
                                           vocab_size=11)
        out = chunked.logits_backward(logits, labels, ent, logp, logp, temperature=0.7, chunk_rows=2, vocab_size=9,
                                      out=torch.empty_like(logits))
        assert out.shape == logits.shape
    else:
        hidden, weight = torch.empty(4, 5, device=m), torch.empty(11, 5, device=m)
        logp, ent = chunked.linear_forward(hidden, weight, None, labels, temperature=0.7, return_entropy=True,
                                           chunk_rows=3)
        grads = chunked.linear_backward(hidden, weight, None, labels, ent, logp, logp, temperature=0.7,
                                        chunk_rows=3, need_hidden=True, need_weight=True, need_bias=False)
        assert grads[0].shape == hidden.shape and grads[1].shape == weight.shape


def test_fake_tensor_mode():
    with FakeTensorMode():
        x = batch()
        head = flowloss.LogZHead(8)
        loss = full_step(x, head)
        loss.backward()
        assert loss.shape == ()


def test_strict_mode_reads_values_and_the_default_does_not():
    """The same call with strict=True makes host reads (that is its job); without it, none."""
    x = batch()
    args = (x["old"], x["ref"], x["rewards"], x["rewards"], x["mask"])
    with count_host_syncs() as calls:
        flowloss.trajectory_balance_loss(*args)
    assert calls == []
    with count_host_syncs() as calls:
        flowloss.trajectory_balance_loss(*args, strict=True)
    assert calls, "strict mode checks values"


# ------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): a graph break or a host read inside would fail here


def _compiled_equals_eager(fn, *args, backend="aot_eager"):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = compiled(*args)
    grads = torch.autograd.grad(out, leaves)
    expected = fn(*args)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_trajectory_balance_and_reverse_kl():
    x = batch()
    lp = x["old"].clone().requires_grad_()
    log_z = x["rewards"].clone().requires_grad_()

    def tb(lp, log_z):
        loss, stats = flowloss.trajectory_balance_loss(
            lp, x["ref"], x["rewards"], log_z, x["mask"], old_logprobs=x["ref"], rollout_logprobs=x["rollout"],
            token_clip_mask=True, penalty="linex", normalizer=torch.tensor(5.0), return_stats=True,
        )
        return loss + stats["residual_mean"]

    def rkl(lp):
        return flowloss.reverse_kl_surrogate(lp, x["ref"], x["rewards"], x["mask"], baseline=x["rewards"])

    _compiled_equals_eager(tb, lp, log_z)
    _compiled_equals_eager(rkl, lp)


def test_compile_fullgraph_inductor_trajectory_balance():
    """The default backend too (Inductor generates C++ for the loss on CPU)."""
    x = batch()
    lp, log_z = x["old"].clone().requires_grad_(), x["rewards"].clone().requires_grad_()

    def tb(lp, log_z):
        return flowloss.trajectory_balance_loss(lp, x["ref"], x["rewards"], log_z, x["mask"], old_logprobs=x["ref"])

    _compiled_equals_eager(tb, lp, log_z, backend="inductor")


def test_compile_fullgraph_whole_step_through_the_log_prob_ops():
    x = batch()
    head = flowloss.LogZHead(8, dropout=0.0)

    def step(logits, hidden, weight):
        y = {**x, "logits": logits, "hidden": hidden, "weight": weight}
        return full_step(y, head)

    _compiled_equals_eager(step, x["logits"], x["hidden"], x["weight"])


# ------------------------------------------------------------------------------------------------------
# Second derivatives: exact (never silently dropped)


def _hvp(fn, inputs, vectors):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return torch.autograd.grad(dot, inputs)


def test_hessian_vector_products_through_the_log_prob_ops_match_float64():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 4, -100, 8, 0])
    upstream = torch.randn(5, generator=g, dtype=torch.float64)
    v = torch.randn(5, 9, generator=g, dtype=torch.float64)

    def ours(z):
        lp, h = flowloss.token_logprobs(z, labels, temperature=0.8, return_entropy=True, chunk_size=2)
        return (lp * upstream).sum() + (h * upstream.flip(0)).sum()

    def exact(z):
        lp, h = reference.token_logprobs(z, labels, temperature=0.8)
        return (lp * upstream).sum() + (h * upstream.flip(0)).sum()

    torch.testing.assert_close(_hvp(ours, [logits], [v])[0], _hvp(exact, [logits], [v])[0])

    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(9, generator=g, dtype=torch.float64)
    vh, vw, vb = (torch.randn_like(t) for t in (hidden, weight, bias))

    def ours_linear(h, w, b):
        lp = flowloss.token_logprobs_from_hidden(h, w, labels, bias=b, chunk_size=2)
        return (lp * upstream).sum()

    def exact_linear(h, w, b):
        return (reference.token_logprobs(h @ w.t() + b, labels)[0] * upstream).sum()

    for a, e in zip(_hvp(ours_linear, [hidden, weight, bias], [vh, vw, vb]),
                    _hvp(exact_linear, [hidden, weight, bias], [vh, vw, vb])):
        torch.testing.assert_close(a, e)


def test_second_derivative_of_the_whole_loss_through_the_logits():
    """The composition that used to raise a misleading 'appears to not have been used in the graph'."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.2
    ref_lp, r, lz = -torch.rand(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.zeros(3)
    v = torch.randn_like(logits)

    def loss(z, log_probs):
        return flowloss.trajectory_balance_loss(log_probs(z), ref_lp, r, lz.double(), mask, beta=1.0)

    ours = _hvp(lambda z: loss(z, lambda y: flowloss.token_logprobs(y, labels)), [logits], [v])[0]
    exact = _hvp(
        lambda z: loss(z, lambda y: reference.token_logprobs(y.reshape(-1, 7), labels.reshape(-1))[0].reshape(3, 4)),
        [logits],
        [v],
    )[0]
    torch.testing.assert_close(ours, exact)

"""``flowloss bench --op step`` on CPU with the ``tiny`` preset: the batch layout, agreement of the paths with each
other and with float64, the batch-size search, and the JSON / table / PNG of a whole run.

Tolerances (fp32 on CPU, the tiny Qwen2: 2 layers, H = 128, V = 32000, 4 x 24 positions):

- fp32 vs the same step in float64: the log-probs (|logp| ~ log V = 10.4, one fp32 ulp there is 9.5e-7) differ by
  about 1e-6 after two layers and a 128-term dot product per logit; 2e-5 leaves a 20x margin. The loss (~56) by
  about 2e-7 relative; 1e-5 relative. Policy gradients by 2e-6 in relative L2 norm over all parameters (fp32 sums
  over the batch's tokens and 32000 logits per token); 1e-4.
- the two flowloss paths in fp32 run the same arithmetic on the same fp32 values (the lm_head rows either through
  ``nn.Linear`` or block by block): 1e-6 relative on the loss, 1e-5 on the gradients (a few fp32 roundings).
- the loss given its inputs, against `flowloss.reference` in float64: float32 accumulation over 4 sequences of at most
  18 tokens, 1e-6 relative.

No timing is asserted.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from flowloss import reference as flref
from flowloss.bench import step as st
from flowloss.bench import step_model as sm
from flowloss.bench import step_paths as sp
from flowloss.cli import main

CPU = torch.device("cpu")
B, G, L = 4, 2, 24
SETTINGS = sp.StepSettings(temperature=0.7)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models() -> sm.StepModels:
    m = sm.build_models("tiny", torch.float32, CPU, seed=0)
    m.head.eval()  # no dropout: the float64 twin must see the same head
    return m


@pytest.fixture(scope="module")
def batch(models) -> sm.StepBatch:
    b = sm.make_batch(B, G, L, models.vocab_size, seed=0, device=CPU)
    st.fill_old_logprobs(models, b, SETTINGS)
    return b


@pytest.fixture(scope="module")
def models64(models) -> sm.StepModels:
    """The same weights in float64 (policy, reference and log-Z head)."""
    policy = copy.deepcopy(models.policy).double()
    return sm.StepModels(
        policy,
        copy.deepcopy(models.ref).double(),
        copy.deepcopy(models.head).double(),
        torch.optim.SGD(policy.parameters(), lr=0.0),
        "tiny",
        torch.float64,
    )


def _params(m: sm.StepModels) -> list[torch.nn.Parameter]:
    return [*m.policy.parameters(), *m.head.parameters()]


def _run(path, m: sm.StepModels, b: sm.StepBatch):
    """One forward + backward of ``path`` from zeroed gradients; the output (log-probs / log Z retain grad)."""
    for p in _params(m):
        p.grad = None
    out = path(m, b, SETTINGS)
    for t in (out.logprobs, out.log_z):
        if t is not None:
            t.retain_grad()
    out.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in _params(m)]
    return out, grads


def _rel_l2(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - e.double()).pow(2).sum()) for a, e in zip(actual, expected))
    den = sum(float(e.double().pow(2).sum()) for e in expected)
    return math.sqrt(num / den)


PATHS = {
    "grpo-logits": lambda: sp.build_grpo_logits(CPU),
    "flowloss-logits": lambda: sp.flowloss_logits,
    "flowloss-hidden": lambda: sp.flowloss_hidden,
}


def test_batch_layout_left_padded_prompts_right_padded_responses():
    b = sm.make_batch(8, 4, 40, 100, seed=3, device=CPU)
    lp, lr = b.prompt_len, b.response_len
    assert (lp, lr) == (10, 30) and b.input_ids.shape == (8, 40) and b.labels.shape == (8, 30)
    prompt_lens = b.prompt_mask.sum(-1)
    response_lens = b.response_mask.sum(-1)
    for i in range(8):
        p, r = int(prompt_lens[i]), int(response_lens[i])
        # [pad | prompt ending at Lp - 1 | response from Lp | pad]
        assert b.prompt_mask[i, lp - p : lp].all() and not b.prompt_mask[i, : lp - p].any()
        assert b.response_mask[i, :r].all() and not b.response_mask[i, r:].any()
        response_at = torch.cat([torch.zeros(lp, dtype=torch.bool), b.response_mask[i]])
        assert (b.attention_mask[i].bool() == (b.prompt_mask[i] | response_at)).all()
        assert (b.input_ids[i][b.attention_mask[i] == 0] == sm.PAD_ID).all()
        assert (b.input_ids[i][b.attention_mask[i] == 1] != sm.PAD_ID).all()
        assert b.position_ids[i, lp - p] == 0 and b.position_ids[i, lp + r - 1] == p + r - 1  # counted from token 1
        assert (b.labels[i, :r] == b.input_ids[i, lp : lp + r]).all() and (b.labels[i, r:] == -100).all()
    # the G responses of a prompt share it; prompts and responses vary in length; the longest fill L exactly
    assert (b.input_ids[:4, :lp] == b.input_ids[0, :lp]).all() and (b.input_ids[4:, :lp] == b.input_ids[4, :lp]).all()
    assert int(prompt_lens.max()) == lp and int(response_lens.max()) == lr and len(set(response_lens.tolist())) > 2
    assert set(b.rewards.tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"--sequences \(6\) must be a multiple of --group-size \(4\)"):
        sm.make_batch(6, 4, 40, 100, seed=0, device=CPU)


def test_presets_have_the_qwen2_shapes():
    """Parameter counts of the released Qwen2-0.5B / 1.5B (494,032,768 and 1,543,714,304, tied embeddings)."""
    assert sm.parameter_count("qwen2-0.5b") == 494_032_768
    assert sm.parameter_count("qwen2-1.5b") == 1_543_714_304
    with torch.device("meta"):
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM(sm.model_config("qwen2-0.5b"))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="--preset must be one of"):
        sm.model_config("qwen2-7b")


def test_flowloss_paths_agree_loss_and_policy_gradients(models, batch):
    """From logits and from hidden states: the same loss, log-probs, log Z and gradients of every parameter."""
    out_l, grads_l = _run(sp.flowloss_logits, models, batch)
    out_h, grads_h = _run(sp.flowloss_hidden, models, batch)
    assert float(out_l.loss) > 0 and math.isfinite(float(out_l.loss))
    assert float(out_h.loss) == pytest.approx(float(out_l.loss), rel=1e-6)
    torch.testing.assert_close(out_h.logprobs, out_l.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_h.log_z, out_l.log_z, rtol=0, atol=1e-6)
    assert all(float(g.abs().max()) > 0 for g in grads_l[:3])  # embeddings and first layer receive gradient
    assert _rel_l2(grads_h, grads_l) < 1e-5


@pytest.mark.parametrize("name", list(PATHS))
def test_each_path_matches_the_same_step_in_float64(name, models, models64, batch):
    """fp32 step == the same tiny model and batch in float64: log-probs, loss, gradients of every parameter."""
    path = PATHS[name]()
    out32, grads32 = _run(path, models, batch)
    out64, grads64 = _run(path, models64, batch)
    mask = batch.response_mask
    err = ((out32.logprobs.double() - out64.logprobs.double()).abs() * mask).max()
    assert float(err) < 2e-5, f"log softmax(h W^T / T)[y]: fp32 vs float64 differ by {float(err):.2e}"
    assert float(out32.loss) == pytest.approx(float(out64.loss), rel=1e-5, abs=1e-6)
    assert _rel_l2(grads32, grads64) < 1e-4


@pytest.mark.parametrize("name", ["flowloss-logits", "flowloss-hidden"])
def test_loss_and_its_gradients_match_the_float64_reference(name, models, batch):
    """The step's loss and d loss / d logprobs, d loss / d log Z == flowloss.reference.trajectory_balance_loss
    in float64 on the same inputs (importance weights sequence_clipped, group z-scored rewards, beta = 15)."""
    out, _ = _run(PATHS[name](), models, batch)
    mask = batch.response_mask
    lp64 = out.logprobs.detach().double().requires_grad_(True)
    z64 = out.log_z.detach().double().requires_grad_(True)
    old64 = batch.old_logprobs.double()
    weights = flref.importance_weights(lp64.detach(), old64, mask, mode="sequence_clipped")
    r_hat = flref.group_normalize_rewards(batch.rewards, [i // G for i in range(B)], eps=1e-6)
    expected = flref.trajectory_balance_loss(
        lp64, out.ref_logprobs.double(), r_hat, z64, mask, beta=sp.FLOWRL_BETA, weights=weights
    )
    expected.backward()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(out.logprobs.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.log_z.grad.double(), z64.grad, rtol=1e-5, atol=1e-7)
    assert (out.logprobs.grad[~mask] == 0).all()  # padding gets no gradient


def test_grpo_loss_formula():
    """GRPO per token -min(rho A, clip(rho) A) + beta k3, token mean per sequence, mean over sequences."""
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    old = torch.tensor([[-1.5, -2.0, -3.0], [-0.5, -1.0, 0.0]])
    ref_lp = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.5, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    expected = 0.0
    for i in range(2):
        terms = []
        for t in range(2):
            rho = math.exp(lp[i, t] - old[i, t])
            surrogate = -min(rho * adv[i], min(max(rho, 0.8), 1.2) * adv[i])
            d = float(ref_lp[i, t] - lp[i, t])
            terms.append(float(surrogate) + 0.04 * (math.exp(d) - d - 1))
        expected += sum(terms) / 2 / 2
    assert float(sp.grpo_loss(lp, old, ref_lp, adv, mask)) == pytest.approx(expected, rel=1e-6)


def test_plain_selective_log_softmax_is_the_float64_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    index = torch.randint(0, 50, (3, 5), generator=g)
    got = sp.plain_selective_log_softmax(logits, index, 0.7)
    expected, _ = flref.token_logprobs(logits.reshape(15, 50), index.reshape(15), temperature=0.7)
    torch.testing.assert_close(got.reshape(15).double(), expected, rtol=0, atol=2e-6)


def test_largest_fit_doubles_then_bisects():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 52

    found = st.largest_fit(fits, start=8, unit=4, limit=10_000)
    # doubling 8, 16, 32 fit, 64 does not; then (32 + 64) / 2 = 48 fits, 56 does not, 52 fits
    assert calls == [8, 16, 32, 64, 48, 56, 52]
    assert found == {"sequences": 52, "probes": [[n, n <= 52] for n in calls], "bounded": False}
    assert st.largest_fit(lambda n: True, 8, 4, 40)["sequences"] == 32  # stops at the limit, says so
    assert st.largest_fit(lambda n: True, 8, 4, 40)["bounded"] is True
    assert st.largest_fit(lambda n: False, 8, 4, 40) == {"sequences": None, "probes": [[8, False]], "bounded": False}


def test_step_cli_json_table_png(tmp_path, capsys):
    """The whole run: every path in the table, every documented JSON field, a PNG (one timed step each)."""
    pytest.importorskip("matplotlib")
    json_path, png_path = tmp_path / "step.json", tmp_path / "step.png"
    argv = ["bench", "--op", "step", "--sequences", "4", "--group-size", "2", "--seq-len", "16"]
    argv += ["--warmup", "0", "--reps", "1", "--no-progress", "--json", str(json_path), "--plot", str(png_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step  tiny (4.466M params, V=32000) fp32 cpu, B=4 (2 prompts x G=2) x L=16 = 64 tokens" in out
    for name in ("model", "grpo-logits", "flowloss-logits", "flowloss-hidden", "liger-grpo"):
        assert name in out

    report = json.loads(json_path.read_text())
    assert report["command"] == (
        "flowloss bench --op step --preset tiny --sequences 4 --group-size 2 --seq-len 16 --dtype fp32 "
        "--device cpu --warmup 0 --reps 1 --temperature 0.7 --seed 0"
    )
    assert report["settings"]["step"] == {
        "preset": "tiny",
        "sequences": 4,
        "group_size": 2,
        "seq_len": 16,
        "dtypes": ["fp32"],
        "warmup": 0,
        "reps": 1,
    }
    assert report["machine"]["transformers"]
    (case,) = report["cases"]
    for key in ("preset", "model", "dtype", "device", "sequences", "group_size", "prompts", "seq_len", "prompt_len"):
        assert key in case, key
    for key in ("response_len", "tokens", "valid_tokens", "prompt_tokens", "response_tokens", "temperature"):
        assert key in case, key
    assert (case["tokens"], case["prompt_len"], case["response_len"]) == (64, 4, 12)
    assert 0 < case["response_tokens"] < case["valid_tokens"] < case["tokens"]
    assert case["model"]["parameters"] == sm.parameter_count("tiny") and case["model"]["vocab_size"] == 32000
    base = case["memory_baseline"]
    parts = ("policy_weights_bytes", "policy_grad_bytes", "optimizer_state_bytes", "ref_weights_bytes")
    parts += ("logz_head_bytes", "batch_bytes")
    assert base["total_bytes"] == sum(base[k] for k in parts) and "what" in base
    # gradients kept allocated, AdamW's two states per parameter: grads == weights, states == 2 x (policy + head)
    assert base["policy_grad_bytes"] == base["policy_weights_bytes"] == base["ref_weights_bytes"]
    assert base["optimizer_state_bytes"] >= 2 * base["policy_weights_bytes"]
    assert case["optimizer_peak_bytes"] > 0

    res = {r["impl"]: r for r in case["results"]}
    assert list(res) == ["model", "grpo-logits", "flowloss-logits", "flowloss-hidden", "trl-fused-head", "liger-grpo"]
    for name in ("model", "grpo-logits", "flowloss-logits", "flowloss-hidden"):
        r = res[name]
        assert r["status"] == "ok", r
        assert set(r["step_ms"]) == {"median", "p20", "p80", "reps"} and r["step_ms"]["reps"] == 1
        assert 0 < r["step_ms"]["p20"] <= r["step_ms"]["median"] <= r["step_ms"]["p80"]
        assert r["tokens_per_s"] > r["valid_tokens_per_s"] > 0
        assert r["peak_mem_fwdbwd_bytes"] > 0 and r["peak_mem_bytes"] >= r["peak_mem_fwdbwd_bytes"]
        assert r["peak_mem_bytes"] == max(r["peak_mem_fwdbwd_bytes"], case["optimizer_peak_bytes"])
        assert r["max_fit"] is None and r["max_fit_reason"] == "CUDA only"
        assert "profiler" in r["memory_method"]
    for name in ("grpo-logits", "flowloss-logits", "flowloss-hidden"):
        r = res[name]
        assert math.isfinite(r["loss"]) and r["max_abs_err_logprobs"] < 2e-5 and r["max_abs_err_loss"] < 1e-3
        assert r["loss_path_ms"] == pytest.approx(r["step_ms"]["median"] - res["model"]["step_ms"]["median"])
        assert r["loss_path_fraction"] == pytest.approx(r["loss_path_ms"] / r["step_ms"]["median"])
    hidden = res["flowloss-hidden"]
    assert hidden["compared_with"] == "flowloss-logits" and hidden["grad_rel_diff"] < 1e-5
    assert hidden["loss_diff"] <= 1e-6 * res["flowloss-logits"]["loss"]
    # the logits paths hold [B, Lr, V] logits at their peak, the hidden-state path does not
    assert res["flowloss-logits"]["peak_mem_fwdbwd_bytes"] > hidden["peak_mem_fwdbwd_bytes"]
    if res["liger-grpo"]["status"] == "skipped":
        assert res["liger-grpo"]["reason"] == "liger_kernel not installed"

    png = png_path.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_batch_search_recovers_from_out_of_memory(models, monkeypatch):
    """The CUDA search's logic on CPU: a step that raises torch.OutOfMemoryError above 12 sequences; the search
    reports 12, the gradients are zero again afterwards, and an error that is not out-of-memory propagates."""
    real_step = st.run_step

    def step_or_oom(fn, m, b, s):
        if b.sequences > 12:
            fn(m, b, s).backward()  # partial gradients, as an interrupted backward would leave
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(fn, m, b, s)

    monkeypatch.setattr(st, "run_step", step_or_oom)
    case = {"sequences": 4, "group_size": 2, "seq_len": 16}
    found = st.search_fit(sp.model_only, models, SETTINGS, case, CPU, seed=0)
    assert found["sequences"] == 12 and found["tokens"] == 12 * 16 and found["seq_len"] == 16
    assert found["probes"] == [[4, True], [8, True], [16, False], [12, True], [14, False]]
    assert all(float(p.grad.abs().max()) == 0 for p in models.policy.parameters())

    def broken(fn, m, b, s):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(st, "run_step", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        st.search_fit(sp.model_only, models, SETTINGS, case, CPU, seed=0)


def _liger_stand_in(monkeypatch):
    """A stand-in ``liger_kernel.chunked_loss`` whose GRPO loss is computed in plain PyTorch from exactly the
    arguments Liger documents: wiring only (which tensor goes where), not Liger's arithmetic."""
    import sys
    import types

    class LigerFusedLinearGRPOLoss(torch.nn.Module):
        def __init__(self, beta=0.04, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
                     temperature=1.0):  # fmt: skip
            super().__init__()
            assert loss_type == "grpo" and use_ref_model and epsilon_low == epsilon_high == sp.GRPO_EPSILON
            self.beta, self.temperature = beta, temperature

        def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                    ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None):  # fmt: skip
            def logp(h, w):
                z = (h.float() @ w.float().T) / self.temperature
                return torch.log_softmax(z, -1).gather(-1, selected_token_ids[..., None]).squeeze(-1)

            with torch.no_grad():
                ref = logp(ref_input, ref_weight)
            lp = logp(_input, lin_weight)
            mask = attention_mask.bool()
            return sp.grpo_loss(lp, old_per_token_logps, ref, advantages, mask, kl_beta=self.beta), ()

    module = types.ModuleType("liger_kernel.chunked_loss")
    module.LigerFusedLinearGRPOLoss = LigerFusedLinearGRPOLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", module)


@pytest.mark.parametrize("real", [False, True], ids=["stand-in", "liger_kernel"])
def test_liger_grpo_is_the_grpo_of_grpo_logits(real, models, batch, monkeypatch):
    """liger-grpo and grpo-logits compute the same GRPO loss and policy gradients (old log-probs perturbed so that
    the clip is active). With the real Liger (when installed) this checks its arithmetic too."""
    if real:
        pytest.importorskip("liger_kernel.chunked_loss")
    else:
        _liger_stand_in(monkeypatch)
    b = copy.copy(batch)
    b.old_logprobs = batch.old_logprobs + 0.3 * torch.randn(
        batch.old_logprobs.shape, generator=torch.Generator().manual_seed(1)
    )
    out_g, grads_g = _run(sp.build_grpo_logits(CPU), models, b)
    out_l, grads_l = _run(sp.build_liger_grpo(CPU), models, b)
    assert float(out_g.loss) != 0.0  # the perturbed old log-probs make the surrogate non-zero
    assert float(out_l.loss) == pytest.approx(float(out_g.loss), rel=1e-4, abs=1e-6)
    assert _rel_l2(grads_l, grads_g) < 1e-5


def test_a_step_that_cannot_fit_is_skipped_with_the_bytes_it_needs(monkeypatch, capsys):
    """The models and optimizer states must fit before anything is built (on CPU the OOM killer would end the run)."""
    from flowloss._console import make_console
    from flowloss.bench import runner
    from flowloss.bench.config import BenchConfig
    from flowloss.bench.report import build_report, print_report

    monkeypatch.setattr(runner, "available_bytes", lambda device: 2**20)
    config = BenchConfig(ops=("step",), device="cpu", sequences=2, group_size=2, seq_len=8, warmup=0, reps=1)
    (case,) = runner.run_suite(config)
    assert [r["impl"] for r in case["results"]] == ["model", *PATHS, "trl-fused-head", "liger-grpo"]
    need = sm.state_bytes("tiny", torch.float32)  # 5 copies of the 4.47M parameters in fp32
    for r in case["results"]:
        assert r["status"] == "skipped" and r["reason"].startswith("shape needs about"), r
    assert need == 5 * 4 * sm.parameter_count("tiny") and case["tokens"] == 16
    print_report(build_report(config, [case]), make_console())
    out = capsys.readouterr().out
    assert "skipped (see below)" in out and "model skipped: shape needs about" in out


def test_grpo_logits_falls_back_to_the_plain_twin_and_says_why(monkeypatch):
    """Without trl, or with a trl that cannot be imported here, grpo-logits runs the PyTorch twin and notes it."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "trl", None)
    fn = sp.build_grpo_logits(CPU)
    assert fn.note == "trl not installed: the plain PyTorch twin of TRL's helper ran"
    broken = types.ModuleType("trl")  # installed, but its helper is missing (a version this bench does not know)
    broken.__version__ = "0.0"
    for name in ("trl", "trl.trainer", "trl.trainer.utils"):
        monkeypatch.setitem(sys.modules, name, broken if name == "trl" else types.ModuleType(name))
    fn = sp.build_grpo_logits(CPU)
    assert fn.note.startswith("trl not importable (ImportError: cannot import name 'selective_log_softmax'")


@pytest.mark.parametrize("real", [False, True], ids=["stand-in", "trl"])
def test_trl_fused_head_is_the_flowrl_of_flowloss_hidden(real, models, batch, monkeypatch):
    """trl-fused-head (TRL's ChunkedLogProbFunction on the response hidden states) and flowloss-hidden: the same
    FlowRL loss, log-probs and policy gradients. With the real trl (from .venv-trl) this checks TRL's arithmetic."""
    if real:
        pytest.importorskip("trl.kernels")
    else:
        from tests.bench.test_parts import trl_stand_in

        trl_stand_in(monkeypatch, compact=True)
    out_t, grads_t = _run(sp.build_trl_fused_head(CPU), models, batch)
    out_h, grads_h = _run(sp.flowloss_hidden, models, batch)
    assert float(out_t.loss) == pytest.approx(float(out_h.loss), rel=1e-5)
    torch.testing.assert_close(out_t.logprobs, out_h.logprobs, rtol=0, atol=2e-6)
    assert (out_t.logprobs[~batch.response_mask] == 0).all()
    assert _rel_l2(grads_t, grads_h) < 1e-5


def test_largest_fit_stops_when_told():
    """The time budget reaches into the batch search: no probe starts once stop() is true; what was found stays."""
    calls = []
    found = st.largest_fit(lambda n: calls.append(n) or True, 8, 4, 10_000, stop=lambda: len(calls) >= 2)
    assert calls == [8, 16] and found == {"sequences": 16, "probes": [[8, True], [16, True]], "bounded": True,
                                          "stopped": True}  # fmt: skip

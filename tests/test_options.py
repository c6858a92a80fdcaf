"""`FlowRLOptions` / `ReverseKLOptions`: one default per option, read by every layer; no value-keyed cache."""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flowloss
from flowloss import (
    FlowRLOptions,
    ReverseKLOptions,
    ReverseKLSurrogate,
    TrajectoryBalanceLoss,
    clipped_importance_weights,
    ratio_clip_token_mask,
    reverse_kl_surrogate,
    trajectory_balance_loss,
)
from flowloss import reference as ref

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "flowloss"


def _defaults(fn) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize(
    ("fn", "options"),
    [(trajectory_balance_loss, FlowRLOptions()), (reverse_kl_surrogate, ReverseKLOptions())],
)
def test_signature_defaults_are_the_options_defaults(fn, options):
    """Every option keyword of the function exists in its options type, with the same default."""
    defaults = _defaults(fn)
    for name, value in options.to_dict().items():
        assert name in defaults, f"{fn.__name__} lacks the option {name!r}"
        assert defaults[name] == value and type(defaults[name]) is type(value), name
    assert ReverseKLOptions().length_normalization is False  # the exact KL, unlike TB's default


def test_building_blocks_take_the_losses_defaults():
    d = FlowRLOptions()
    weights = _defaults(clipped_importance_weights)
    assert weights["importance_weights"] == d.resolved_importance_weights(has_old_logprobs=True)
    for name in ("eps_low", "eps_high", "max_weight", "tis_cap"):
        assert weights[name] == getattr(d, name), name
    mask = _defaults(ratio_clip_token_mask)
    assert (mask["eps_low"], mask["eps_high"]) == (d.eps_low, d.eps_high)
    assert _defaults(flowloss.vargrad_log_z)["beta"] == d.beta
    assert _defaults(flowloss.vargrad_log_z)["length_normalization"] == d.length_normalization
    assert _defaults(ref.trajectory_balance_loss)["beta"] == d.beta
    assert _defaults(ref.reverse_kl_surrogate)["beta"] == ReverseKLOptions().beta
    assert TrajectoryBalanceLoss().options == d and ReverseKLSurrogate().options == ReverseKLOptions()


_OPTION_NAMES = set(FlowRLOptions.field_names()) | set(ReverseKLOptions.field_names())
# Parameters that share an option's name but not its meaning, each with the reason.
_SAME_NAME_OTHER_CONCEPT: dict[tuple[str, str, str], str] = {
    ("reductions.py", "sequence_logprobs", "reduction"): "deprecated; a token reduction ('mean' over tokens)",
}


def test_no_option_default_is_written_twice():
    """Outside `flowloss/options.py` no function writes a literal default for a loss option (it reads the
    options type's): a change of one default is a one-line change."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "options.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                literal = isinstance(default, ast.Constant) and default.value is not Ellipsis
                key = (path.relative_to(SRC).as_posix(), node.name, arg.arg)
                if arg.arg in _OPTION_NAMES and literal and key not in _SAME_NAME_OTHER_CONCEPT:
                    offenders.append(f"{key[0]}:{node.lineno} {node.name}({arg.arg}={default.value!r})")
    assert not offenders, "option defaults written outside flowloss/options.py:\n" + "\n".join(offenders)


_PROBE = textwrap.dedent(
    """
    import inspect, json
    import flowloss
    from flowloss import reference
    from flowloss.adapters.common import AdapterConfig
    from flowloss.adapters.verl.config import FlowRLConfig as VerlConfig  # imports no framework

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    print(json.dumps({
        "FlowRLOptions": flowloss.FlowRLOptions().beta,
        "ReverseKLOptions": flowloss.ReverseKLOptions().beta,
        "trajectory_balance_loss": default(flowloss.trajectory_balance_loss, "beta"),
        "reverse_kl_surrogate": default(flowloss.reverse_kl_surrogate, "beta"),
        "TrajectoryBalanceLoss": flowloss.TrajectoryBalanceLoss().options.beta,
        "ReverseKLSurrogate": flowloss.ReverseKLSurrogate().options.beta,
        "vargrad_log_z": default(flowloss.vargrad_log_z, "beta"),
        "reference.trajectory_balance_loss": default(reference.trajectory_balance_loss, "beta"),
        "reference.reverse_kl_surrogate": default(reference.reverse_kl_surrogate, "beta"),
        "AdapterConfig": AdapterConfig().loss.beta,
        "verl FlowRLConfig": VerlConfig().loss.beta,
    }))
    """
)


NEW_BETA = 7.25


def beta_seen_with_a_new_default(tmp_path: Path, probe: str) -> dict[str, float]:
    """Copy the package, change `beta`'s default in its one line of options.py to `NEW_BETA`, and run ``probe``
    (Python printing a JSON ``{layer: beta}`` as its last line) against the copy; returns what it printed. The
    framework venvs' tests call this with a probe of their adapter's config."""
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy / "flowloss", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", copy / "flowloss" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    options = copy / "flowloss" / "options.py"
    text = options.read_text()
    line = "    beta: float = 15.0\n"
    assert text.count(line) == 1, "the beta default should be written exactly once"
    options.write_text(text.replace(line, f"    beta: float = {NEW_BETA}\n"))
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_beta_default_is_one_line_that_every_layer_sees(tmp_path):
    """Change `beta`'s default in one line of a copy of options.py and read it back from every layer (the TRL and
    OpenRLHF configs: in their venvs, tests/adapters/<framework>/test_one_default.py)."""
    seen = beta_seen_with_a_new_default(tmp_path, _PROBE)
    assert len(seen) == 11 and seen == dict.fromkeys(seen, NEW_BETA), seen


def _weighted_batch():
    torch.manual_seed(3)
    b, t = 6, 5
    logprobs = -torch.rand(b, t, dtype=torch.float64)
    # token log-ratios far enough from 0 that the geometric weight clips at both bounds
    old = logprobs - torch.linspace(-0.6, 0.6, b, dtype=torch.float64)[:, None]
    return logprobs, -torch.rand(b, t, dtype=torch.float64), torch.randn(b, dtype=torch.float64), old, torch.ones(
        b, t, dtype=torch.bool
    )


def test_options_are_not_shared_between_calls_with_equal_values_under_other_names():
    """A module built with eps_low/eps_high swapped must not change a later plain call (the old options cache
    was keyed by the values in call order, not by name)."""
    lp, ref_lp, rewards, old, mask = _weighted_batch()

    def weight_mean():
        _, stats = reverse_kl_surrogate(lp, ref_lp, rewards, mask, old_logprobs=old,
                                        importance_weights="geometric_clipped", return_stats=True)
        return float(stats["weight_mean"])

    before = weight_mean()
    ReverseKLSurrogate(beta=15.0, importance_weights="geometric_clipped", eps_high=0.2, eps_low=0.28, max_weight=10.0,
                       tis_cap=2.0, length_normalization=False, reduction="mean")
    TrajectoryBalanceLoss(beta=15.0, importance_weights="geometric_clipped", eps_high=0.2, eps_low=0.28)
    after = weight_mean()
    expected = ref.importance_weights(lp, old, mask, mode="geometric_clipped", eps_low=0.2, eps_high=0.28).mean()
    assert before == after
    assert abs(after - float(expected)) < 1e-12


def test_options_reject_the_other_losses_type_and_unknown_fields():
    with pytest.raises(TypeError, match="expected ReverseKLOptions"):
        ReverseKLSurrogate(FlowRLOptions())
    with pytest.raises(TypeError, match="expected FlowRLOptions"):
        TrajectoryBalanceLoss(ReverseKLOptions())
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['penalty'\] for ReverseKLOptions"):
        ReverseKLOptions.from_any({"penalty": "huber"})
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['penalty'\]"):
        ReverseKLSurrogate(penalty="huber")
    with pytest.raises(TypeError, match="`length_normalization` must be a bool"):
        ReverseKLOptions(length_normalization="false")
    with pytest.raises(ValueError, match="`eps_low` must be a number in"):
        ReverseKLOptions(eps_low=1.0)
    assert ReverseKLOptions(beta=2).beta == 2.0 and type(ReverseKLOptions(beta=2).beta) is float

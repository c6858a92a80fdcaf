"""Import structure of the log-prob ops and the kernels: no import circle, one Triton availability check.

The graph counts every import statement, at module level or inside a function (a lazy import is still an edge
a reader and a tool must follow): an edge ``a -> b`` when module ``a`` imports ``b`` or a name from it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"flowloss.ops": ROOT / "src" / "flowloss" / "ops", "flowloss.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            mods[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_circle_among_the_ops_and_kernels():
    graph = _graph()
    assert "flowloss.ops.library" in graph["flowloss.ops.token_logprobs"], "the graph must see lazy imports"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_kernels_import_nothing_from_the_ops():
    """Dependencies point one way: ops -> kernels."""
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("flowloss.kernels"):
            assert not {d for d in deps if d.startswith("flowloss.ops")}, name


def test_one_triton_availability_check():
    """Only `flowloss.ops.dispatch.triton_available` tries to import triton (``except ImportError``) or looks
    for it (``find_spec``); everything else asks it."""
    found = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                found.append(name)
            if isinstance(node, ast.Attribute) and node.attr == "find_spec":
                found.append(name)
    assert found == ["flowloss.ops.dispatch"], found


def test_the_kernels_folder_does_not_break_a_probe_for_hugging_faces_kernels_package():
    """From a checkout's root, `import kernels` finds this folder (the import name of HF's `kernels` package, which
    transformers imports to probe for it). Without triton that import raised ModuleNotFoundError and took
    `import transformers.modeling_utils` down with it (the OpenRLHF venv has no triton): it must import, empty."""
    probe = (
        "import sys; sys.modules['triton'] = None\n"  # as where triton is not installed
        "import kernels\n"
        "assert kernels.__all__ == [] and not hasattr(kernels, '__version__'), dir(kernels)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_operator_is_a_custom_op_wrapper():
    """Every ``flowloss::`` operator is defined with `flowloss.ops._define.define_op`: ``torch.library.custom_op``'s
    wrapper imports ``torch._dynamo`` (Inductor, sympy, triton: ~190 MB) on its first call."""
    found = []
    for path in [*sorted((ROOT / "src" / "flowloss").rglob("*.py")), *sorted((ROOT / "kernels").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "custom_op":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], found


_FIRST_CALLS = r"""
import sys, torch, flowloss
import flowloss.kernels.tb_loss as tb
calls = []
forward = tb.tb_forward
tb.tb_forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
logits = torch.randn(4, 7, requires_grad=True)
flowloss.token_logprobs(logits, torch.tensor([0, 1, 2, 3])).sum().backward()
lp, lz = torch.randn(3, 5, requires_grad=True), torch.zeros(3, requires_grad=True)
mask = torch.ones(3, 5, dtype=torch.bool)
flowloss.trajectory_balance_loss(lp, torch.randn(3, 5), torch.randn(3), lz, mask, impl="triton").backward()
assert calls == [1], calls  # the fused kernel ran
assert lp.grad is not None and lz.grad is not None
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""


def test_first_calls_of_the_operators_do_not_import_dynamo():
    """The log-prob op (CPU) and the fused loss op (under Triton's interpreter) forward + backward, in a fresh
    process: ``torch._dynamo`` stays unimported (the fused op's custom_op wrapper imported it)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "no dynamo", out.stdout

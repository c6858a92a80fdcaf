"""The public API is typed for its users: mypy --strict on tests/typecheck/public_api.py reports nothing, and that
script runs (the types it asserts are the types returned). tests/typecheck/pending_overloads.py holds what is not
typed yet, one xfail test per item.

mypy runs as a user's would on code that imports flowloss: ``--strict``, errors inside flowloss not reported
(``--follow-imports=silent``, as for an installed package), ``src/`` on its path (the editable install's import
hook is invisible to it), Python 3.10 (the oldest supported). One exception to ``--strict``: calls of torch's own
unannotated methods (``Tensor.backward``) are allowed (``--untyped-calls-exclude=torch``); flowloss's are not.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "typecheck"
PUBLIC_API = SCRIPTS / "public_api.py"
PENDING = SCRIPTS / "pending_overloads.py"
MYPY_FLAGS = ("--strict", "--untyped-calls-exclude=torch", "--follow-imports=silent", "--python-version", "3.10",
              "--no-error-summary", "--show-error-codes")  # fmt: skip
ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<message>.*)$", re.MULTILINE)

needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")


@pytest.fixture(scope="module")
def mypy_errors(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """``{script name: [(line, message), ...]}`` from one mypy run over both scripts (cached between sessions in
    pytest's cache: a cold run analyses torch, ~15 s)."""
    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("mypy-public-api") if cache is not None else tmp_path_factory.mktemp("mypy-cache")
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", *MYPY_FLAGS, "--cache-dir", str(cache_dir), str(PUBLIC_API), str(PENDING)],
        capture_output=True, text=True, env=env, cwd=tmp_path_factory.mktemp("mypy-cwd"),  # no project config
    )  # fmt: skip
    if out.returncode not in (0, 1) or "error: " in out.stderr:  # 2: mypy itself failed (bad flag, crash)
        pytest.fail(f"mypy did not run (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    errors: dict[str, list] = {PUBLIC_API.name: [], PENDING.name: []}
    for m in ERROR.finditer(out.stdout):
        errors.setdefault(Path(m["path"]).name, []).append((int(m["line"]), m["message"]))
    return errors


def _pending_lines(what: str | None = None) -> set[int]:
    """Line numbers of ``# pending: <what>`` markers in pending_overloads.py (all of them for ``what=None``)."""
    marker = re.compile(r"#\s*pending:\s*(\S+)")
    return {n for n, line in enumerate(PENDING.read_text().splitlines(), 1)
            if (m := marker.search(line)) and (what is None or m[1] == what)}  # fmt: skip


@needs_mypy
def test_the_public_api_type_checks_under_strict_mypy(mypy_errors):
    """trajectory_balance_loss (tensor; (tensor, stats) with return_stats=True), TrajectoryBalanceLoss, LogZHead,
    token_logprobs and token_logprobs_from_hidden with and without return_entropy: no mypy error."""
    assert set(mypy_errors) == {PUBLIC_API.name, PENDING.name}, mypy_errors  # no error in any other file
    assert mypy_errors[PUBLIC_API.name] == []


def test_the_typed_script_runs_with_the_types_it_asserts():
    runpy.run_path(str(PUBLIC_API), run_name="__main__")


@needs_mypy
def test_only_the_marked_lines_of_the_pending_script_fail(mypy_errors):
    """Every mypy error of pending_overloads.py is on a ``# pending:`` line, so an xfail below fails for its item."""
    lines = {line for line, _ in mypy_errors[PENDING.name]}
    assert lines <= _pending_lines(), mypy_errors[PENDING.name]


@needs_mypy
@pytest.mark.parametrize("what", [
    pytest.param("token_logprobs", marks=pytest.mark.xfail(
        strict=True, reason="token_logprobs has no typing.overload on return_entropy")),
    pytest.param("from_hidden", marks=pytest.mark.xfail(
        strict=True, reason="token_logprobs_from_hidden has no typing.overload on return_entropy")),
])  # fmt: skip
def test_pending_items_type_check(mypy_errors, what):
    """Passes (an XPASS, which fails the run) once ``what`` is typed: then drop its xfail and its markers."""
    lines = _pending_lines(what)
    assert lines, f"no '# pending: {what}' line"
    assert [e for e in mypy_errors[PENDING.name] if e[0] in lines] == []

"""The public API is typed for its users: mypy --strict on tests/typecheck/public_api.py and on the README's
example reports nothing, and the script runs (the types it asserts are the types returned).

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
MYPY_FLAGS = ("--strict", "--untyped-calls-exclude=torch", "--follow-imports=silent", "--python-version", "3.10",
              "--no-error-summary", "--show-error-codes")  # fmt: skip
README_EXAMPLE = "readme_example.py"
ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<message>.*)$", re.MULTILINE)

needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")


@pytest.fixture(scope="module")
def mypy_errors(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """``{script name: [(line, message), ...]}`` from one mypy run over the script and the README's example (cached
    between sessions in pytest's cache: a cold run analyses torch, ~15 s)."""
    from tests.docs.code_blocks import python_blocks

    (block,) = python_blocks("README.md")
    readme = tmp_path_factory.mktemp("readme") / README_EXAMPLE
    readme.write_text(block.code)
    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("mypy-public-api") if cache is not None else tmp_path_factory.mktemp("mypy-cache")
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", *MYPY_FLAGS, "--cache-dir", str(cache_dir), str(PUBLIC_API), str(readme)],
        capture_output=True, text=True, env=env, cwd=tmp_path_factory.mktemp("mypy-cwd"),  # no project config
    )  # fmt: skip
    if out.returncode not in (0, 1) or "error: " in out.stderr:  # 2: mypy itself failed (bad flag, crash)
        pytest.fail(f"mypy did not run (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    errors: dict[str, list] = {PUBLIC_API.name: [], README_EXAMPLE: []}
    for m in ERROR.finditer(out.stdout):
        errors.setdefault(Path(m["path"]).name, []).append((int(m["line"]), m["message"]))
    return errors


@needs_mypy
def test_the_public_api_type_checks_under_strict_mypy(mypy_errors):
    """trajectory_balance_loss (tensor; (tensor, stats) with return_stats=True), TrajectoryBalanceLoss, LogZHead,
    token_logprobs and token_logprobs_from_hidden with and without return_entropy: no mypy error."""
    assert set(mypy_errors) == {PUBLIC_API.name, README_EXAMPLE}, mypy_errors  # no error in any other file
    assert mypy_errors[PUBLIC_API.name] == []


@needs_mypy
def test_the_readme_example_type_checks_under_strict_mypy(mypy_errors):
    assert mypy_errors[README_EXAMPLE] == []


def test_the_typed_script_runs_with_the_types_it_asserts():
    runpy.run_path(str(PUBLIC_API), run_name="__main__")

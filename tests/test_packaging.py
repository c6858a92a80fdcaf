"""The built wheel installs into a fresh virtual environment and exposes the public API and the kernels.

A training job installs flowloss with torch and triton only: the command-line tools' rich and matplotlib are
the ``cli`` extra, and `import flowloss` never imports them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
RUNTIME = {"torch", "triton"}
CLI_ONLY = {"rich", "matplotlib"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower()


def test_import_flowloss_imports_no_cli_dependency():
    """Not the library, not the bench or demo packages, not the console script's parser."""
    probe = (
        "import sys, flowloss, flowloss.bench, flowloss.demo, flowloss.cli;"
        "flowloss.cli.build_parser();"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'matplotlib', 'einops'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"import flowloss imported {out.stdout.strip()}"


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path: Path):
    # Build from a copy of what the wheel is made of: an in-tree build/ directory could carry stale modules.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("flowloss-*.whl")
    (sdist,) = dist.glob("flowloss-*.tar.gz")
    import flowloss

    assert wheel.name.startswith(f"flowloss-{flowloss.__version__}-") and flowloss.__version__ in sdist.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "flowloss/py.typed" in names, "the wheel does not ship flowloss/py.typed (PEP 561)"
        packages = sorted(p.parent.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("__init__.py"))
        missing = [p for p in packages if f"{p}/__init__.py" not in names]
        assert not missing, f"packages missing from the wheel (pyproject.toml [tool.setuptools] packages): {missing}"
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel lacks the LICENSE"
        (meta_path,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(meta_path).decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Version"] == flowloss.__version__
    assert "Typing :: Typed" in (metadata.get_all("Classifier") or [])
    requires = metadata.get_all("Requires-Dist") or []
    runtime = {_name(r) for r in requires if "extra ==" not in r}
    assert runtime == RUNTIME, f"runtime requirements {sorted(runtime)}, expected {sorted(RUNTIME)}"
    cli = {_name(r) for r in requires if re.search(r"extra\s*==\s*['\"]cli['\"]", r)}
    assert cli == CLI_ONLY, f"the cli extra holds {sorted(cli)}"
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", str(wheel)]
    if CONSTRAINTS.exists():  # CI pins the CPU build of torch
        install[4:4] = ["-c", str(CONSTRAINTS)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    probe = (
        "import flowloss, flowloss.kernels, flowloss.reference, sys;"
        "from flowloss import trajectory_balance_loss, LogZHead, group_normalize_rewards;"
        "assert 'site-packages' in flowloss.kernels.__file__, flowloss.kernels.__file__;"
        "assert not any(m.split('.')[0] in ('trl', 'verl', 'openrlhf') for m in sys.modules);"
        "print(sorted(flowloss.__all__))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "trajectory_balance_loss" in out.stdout
    find = "import importlib.util as u; print([m for m in ('rich', 'matplotlib', 'einops') if u.find_spec(m)])"
    installed = subprocess.run(
        [str(python), "-c", find], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert installed.stdout.strip() == "[]", f"pip install flowloss installed {installed.stdout.strip()}"
    console = subprocess.run(
        [str(env_dir / "bin" / "flowloss"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert console.returncode == 0, console.stderr
    assert "bench" in console.stdout
    # Without the cli extra the tools stop at once and say what to install.
    bench = subprocess.run(
        [str(env_dir / "bin" / "flowloss"), "bench"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert bench.returncode == 2 and 'pip install -e ".[cli]"' in bench.stderr, bench.stderr
    # The README's trainer example, exactly as written, with only what `pip install flowloss` brings.
    from tests.docs.code_blocks import python_blocks

    (block,) = python_blocks("README.md")
    example = tmp_path / "readme_example.py"
    example.write_text(block.code)
    run = subprocess.run([str(python), str(example)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0 and run.stdout.startswith("loss "), run.stdout + run.stderr

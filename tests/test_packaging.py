"""The built wheel installs into a fresh virtual environment and exposes the public API and the kernels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path: Path):
    # Build from a copy of what the wheel is made of: an in-tree build/ directory could carry stale modules.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("flowloss-*.whl")
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
    console = subprocess.run(
        [str(env_dir / "bin" / "flowloss"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert console.returncode == 0, console.stderr
    assert "bench" in console.stdout

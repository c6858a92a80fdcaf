#!/usr/bin/env bash
# Virtual environment for the OpenRLHF adapter tests (tests/adapters/openrlhf), CPU only.
#
# Usage: bash .ci/install-openrlhf.sh VENV_DIR CONSTRAINTS_FILE
#
# openrlhf's full requirements cannot install on a CPU machine (flash-attn builds only against CUDA, vllm is
# GPU-only), so openrlhf is installed without dependencies and the modules the adapter tests import are added
# by hand: deepspeed (built without ops, against the already installed CPU torch), transformers at openrlhf's
# pin, peft, ray, torchdata and a few pure-Python needs. The GPU-only modules openrlhf imports at top level
# (flash_attn, vllm) are replaced by minimal stand-ins inside tests/adapters/openrlhf/ only (flash-attn's
# padding helpers as CPU twins, for the packed-samples tests).
set -euo pipefail

VENV=${1:?usage: install-openrlhf.sh VENV_DIR CONSTRAINTS_FILE}
CONSTRAINTS=${2:?usage: install-openrlhf.sh VENV_DIR CONSTRAINTS_FILE}
CONSTRAINTS=$(realpath "$CONSTRAINTS")
cd "$(dirname "$0")/.."

# Versions checked against openrlhf 0.11.2's own pins (deepspeed==0.19.6, transformers==5.15.0, ray==2.55.0).
OPENRLHF_VERSION=0.11.2
DEEPSPEED_VERSION=0.19.6
TRANSFORMERS_VERSION=5.15.0
RAY_VERSION=2.55.0

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
# .ci/constraints.txt pins transformers for the main venv; this framework needs its own: drop that one line.
grep -v '^transformers==' "$CONSTRAINTS" > "$VENV/constraints.txt"
CONSTRAINTS="$VENV/constraints.txt"
PIP=("$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS")
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps "openrlhf==$OPENRLHF_VERSION"
# deepspeed's setup.py imports torch: build it against the CPU torch above, with no C++/CUDA ops.
DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "${PIP[@]}" --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
# What `import openrlhf.trainer.ray.ppo_actor` needs (read from its imports): transformers, peft, ray, torchdata,
# and aiohttp / pillow / sympy / pylatexenc through openrlhf.utils; what the launcher's train() imports once Ray
# is up: datasets (openrlhf.datasets, through openrlhf.trainer.ppo_trainer).
"${PIP[@]}" "transformers==$TRANSFORMERS_VERSION" peft "ray==$RAY_VERSION" torchdata tqdm numpy \
    einops sympy pylatexenc jsonlines aiohttp pillow datasets
# flowloss itself (its test extra pulls docs tooling this venv does not need), rich for `flowloss bench` (the docs
# compare OpenRLHF's helper from this venv) and the test runner.
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "rich>=13" "pytest>=8" "hypothesis>=6.100"
# Fail here, not in the tests, when the install is incomplete.
PYTHONPATH=tests/adapters/openrlhf/standins "$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import deepspeed, openrlhf, peft, ray, transformers  # noqa: F401,E401
import openrlhf.trainer.ray.ppo_actor  # noqa: F401  (flash_attn / vllm: the test stand-ins)
import openrlhf.cli.train_ppo_ray, openrlhf.trainer.ppo_trainer  # noqa: F401,E401  (the launcher's imports)
import flowloss.adapters.openrlhf.trainer, flowloss.adapters.openrlhf.worker  # noqa: F401,E401
print(f"openrlhf venv ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"deepspeed {deepspeed.__version__}, ray {ray.__version__}")
PY

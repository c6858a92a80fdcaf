#!/usr/bin/env bash
# Create the verl adapter's virtual environment: bash .ci/install-verl.sh <venv-dir> <constraints-file>
# verl 0.9 with its own dependencies (Ray, tensordict, transformers < 5.11, hydra, ...); torch stays the CPU build
# pinned by the constraints file. Idempotent: re-running reuses the venv and only installs what is missing.
set -euo pipefail

VENV="${1:?usage: install-verl.sh <venv-dir> <constraints-file>}"
CONSTRAINTS="${2:?usage: install-verl.sh <venv-dir> <constraints-file>}"
VERL_VERSION="${VERL_VERSION:-0.9.1}"

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
# .ci/constraints.txt pins transformers for the main venv; this framework needs its own: drop that one line.
grep -v '^transformers==' "$CONSTRAINTS" > "$VENV/constraints.txt"
CONSTRAINTS="$VENV/constraints.txt"
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off -c "$CONSTRAINTS")

"$VENV/bin/python" -m pip install --quiet --progress-bar off --upgrade pip
# torch first, from the constraints (CPU build), so nothing below can pull a CUDA build.
"${PIP[@]}" torch
# verl-core: what main_ppo imports on its way to training (TransferQueue for the V1 trainer, cachetools and uvicorn
# for the legacy trainer and the checkpoint engines); plain `verl` lacks them. Not [vllm]: it pins its own torch.
"${PIP[@]}" "verl[verl-core]==${VERL_VERSION}"
# flowloss itself (editable), rich for `flowloss bench` (the docs compare verl's helpers from this venv) and the
# test runner; the docs/lint extras are not needed here.
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "rich>=13" "pytest>=8" "hypothesis>=6.100"

# Fail loudly if the environment cannot do what the tests need.
"$VENV/bin/python" - <<'PY'
import torch
import verl
from verl.trainer.ppo.core_algos import get_policy_loss_fn, register_policy_loss  # noqa: F401
import transfer_queue, verl.trainer.main_ppo, verl.trainer.main_ppo_v0, verl.checkpoint_engine  # noqa: F401,E401
# verl's LoRA step (get_peft_model) and Ray's pickling of the FlowRL worker class, both used by the tests.
import peft, cloudpickle  # noqa: F401,E401

import flowloss

assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print(f"verl {verl.__version__}, torch {torch.__version__}, flowloss {flowloss.__version__}: ok")
PY

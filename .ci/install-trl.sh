#!/usr/bin/env bash
# Build the virtual environment for the TRL adapter tests: `bash .ci/install-trl.sh <venv> <constraints>`.
# Idempotent (re-running upgrades nothing that is already satisfied); fails loudly on any error.
set -euo pipefail

VENV="${1:?usage: install-trl.sh <venv dir> <constraints file>}"
CONSTRAINTS="${2:?usage: install-trl.sh <venv dir> <constraints file>}"
PYTHON="${PYTHON:-python3}"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# .ci/constraints.txt pins transformers for the main venv; this framework needs its own: drop that one line.
grep -v '^transformers==' "$CONSTRAINTS" > "$VENV/constraints.txt"
CONSTRAINTS="$VENV/constraints.txt"
PIP=("$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS")
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The CPU build of torch first (pinned by the constraints), so nothing below can pull a CUDA build.
"${PIP[@]}" torch
# TRL and what the tiny end-to-end test needs: transformers' Qwen2, a locally trained BPE tokenizer, datasets.
# trl 1.16.0 (override with TRL_VERSION=...): the adapter overrides GRPOTrainer internals checked in 1.16.
# transformers < 5.11 keeps the TRL venv on the same transformers line as verl 0.9.1.
# peft 0.21.2 (trl's `peft` extra asks >= 0.13): the LoRA tests (tests/adapters/trl/test_trl_peft.py) run with it.
"${PIP[@]}" "trl==${TRL_VERSION:-1.16.0}" "transformers>=4.56,<5.11" "peft==${PEFT_VERSION:-0.21.2}" accelerate \
    datasets tokenizers
# flowloss itself (editable), rich for `flowloss bench` (the docs compare TRL's helper from this venv) and the
# test runner; its docs/lint extras are not needed here.
"${PIP[@]}" -e . "rich>=13" "pytest>=8" "hypothesis>=6.100"
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, peft, flowloss
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"peft {peft.__version__}, flowloss {flowloss.__version__}")
PY

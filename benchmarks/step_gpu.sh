#!/usr/bin/env bash
# One whole RL update per loss path (flowloss bench --op step) on a GPU: Qwen2-0.5B shapes, random weights, bf16,
# 8 x 2,048 tokens (2 prompts x 4 responses), and each path's largest batch that fits (grown until out of memory).
# TRL's and Liger's rows run when trl / liger-kernel are importable. Needs the `step` extra (transformers).
# Usage (repository root): bash benchmarks/step_gpu.sh   (PY: a Python whose torch is a CUDA build; default
# .venv/bin/python; on a bare machine PY=python3). Not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
NAME=${NAME:-gpu-$("$PY" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')}
"$PY" -m flowloss bench --device cuda --op step --preset qwen2-0.5b --sequences 8 --group-size 4 --seq-len 2048 \
    --no-progress --json "$OUT/$NAME-step-qwen2-0.5b.json" --plot "$OUT/$NAME-step-qwen2-0.5b.png"

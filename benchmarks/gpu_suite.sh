#!/usr/bin/env bash
# The H100 suite of kernel-notes "How the best measure": N in {4k, 16k, 32k} x V in {32000, 128256, 151936, 262144},
# bf16 and fp32, T = 0.7, 20 % masked rows, random upstream gradient; then the fused lm_head op at H = 4096.
# Shapes that do not fit the GPU's free memory are listed as skipped with the bytes they need.
# Then one whole RL update of a Qwen2-0.5B-shaped model per loss path (--op step; needs the `step` extra).
# Usage (from the repository root, with a CUDA build of torch in .venv, e.g. `make setup CONSTRAINTS=`):
#   bash benchmarks/gpu_suite.sh            # writes benchmarks/results/gpu-*.json / .csv / .png
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=benchmarks/results
mkdir -p "$OUT"
NAME=${NAME:-gpu-$("$BIN/python" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')}

# log-prob op and loss, all shapes: one CSV row per (N, V, dtype, implementation)
"$BIN/python" benchmarks/sweep_vocab.py --device cuda --n 4096 16384 32768 --v 32000 128256 151936 262144 \
    --dtype bf16 fp32 --name "$NAME-logprobs"

# the default GPU run (log-prob op, loss and fused lm_head at N = 16384, V in {32000, 151936}, H = 4096) with a plot
"$BIN/flowloss" bench --device cuda --json "$OUT/$NAME-default.json" --plot "$OUT/$NAME-default.png"

# one whole RL update per loss path (--op step): Qwen2-0.5B shapes, random weights, bf16, 8 x 2,048 tokens (2 prompts x
# 4 responses) and each path's largest batch; TRL's and Liger's rows run when trl / liger-kernel are in $BIN's venv
"$BIN/flowloss" bench --device cuda --op step --preset qwen2-0.5b --sequences 8 --group-size 4 --seq-len 2048 \
    --json "$OUT/$NAME-step-qwen2-0.5b.json" --plot "$OUT/$NAME-step-qwen2-0.5b.png"

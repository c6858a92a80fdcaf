#!/usr/bin/env bash
# Fused lm_head + per-token log-prob on one GPU (written for an H200, < 6 minutes): the flowloss Triton launchers
# (exact two-pass, one-pass, filtered) against naive, Liger and Cut Cross-Entropy at N in {16384, 4096}, H = 4096,
# V in {151936, 32000, 262144}, bf16, T = 0.7, 20 % ignored rows, random per-token upstream gradient. Forward and
# forward+backward time (triton.testing.do_bench), peak extra memory, max error vs float64 on a row/column subset.
# Writes benchmarks/results/fused-linear-<gpu>.{csv,json,md}; see benchmarks/fused_linear_gpu.py for the columns.
# Usage (repository root, CUDA build of torch in .venv, e.g. `make setup CONSTRAINTS=`; Liger / Cut Cross-Entropy
# are measured when installed):
#   bash benchmarks/fused_linear_gpu.sh [extra fused_linear_gpu.py arguments, e.g. --n 16384 --v 151936]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
GPU=$("$BIN/python" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')
"$BIN/python" benchmarks/fused_linear_gpu.py --out "benchmarks/results/fused-linear-$GPU" --time-budget 330 "$@"

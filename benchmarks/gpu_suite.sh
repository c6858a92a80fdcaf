#!/usr/bin/env bash
# The GPU suite of the log-prob op and the loss (written for an H200, about 6 minutes; not yet run on one):
#  1. the log-prob op at N in {4096, 16384} x V in {32000, 151936, 262144}, bf16 and fp32, T = 0.7, 20 % masked
#     rows, random upstream gradient: naive, torch.compile, flowloss-triton and Liger (when installed) side by
#     side; GB/s and % of a copy counted on the bytes the op must move (results/<gpu>-logprobs.csv);
#  2. the issue's headline run: N = 16384, V = 151936, bf16 and fp32, with its JSON and plot;
#  3. the loss at B = 16 x T = 1024, the PyTorch path beside the fused Triton loss (flowloss-fused-loss).
# The fused lm_head op and one whole RL update have their own scripts: fused_linear_gpu.sh and step_gpu.sh.
# Usage (repository root): bash benchmarks/gpu_suite.sh   with PY a Python whose torch is a CUDA build
# (default .venv/bin/python, e.g. after `make setup CONSTRAINTS=`; on a bare machine PY=python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
NAME=${NAME:-gpu-$("$PY" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')}
IMPLS=(naive compile flowloss-triton liger)

"$PY" benchmarks/sweep_vocab.py --device cuda --n 4096 16384 --v 32000 151936 262144 --dtype bf16 fp32 \
    --impl "${IMPLS[@]}" --name "$NAME-logprobs"
"$PY" -m flowloss bench --device cuda --op logprobs --n 16384 --v 151936 --dtype bf16 fp32 --impl "${IMPLS[@]}" \
    --no-progress --json "$OUT/$NAME-logprobs-16k.json" --plot "$OUT/$NAME-logprobs-16k.png"
"$PY" -m flowloss bench --device cuda --op loss --n 16384 --dtype fp32 --no-progress \
    --json "$OUT/$NAME-loss.json"

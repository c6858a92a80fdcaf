#!/usr/bin/env bash
# One call on a machine with one CUDA GPU and no network (sized for an H200: under 6 minutes in all):
#   1. `make test-gpu` (the GPU test lane);
#   2. the GPU benchmark suite through `flowloss bench`: logprobs, fused_linear (with the peers that are present:
#      Liger, Cut Cross-Entropy, TRL), loss, step;
#   3. a short summary (benchmarks/summarize.py) of every part and its figures.
# Each part has its own time budget (killed past it; the bench parts also get --time-budget so they stop starting
# measurements in time and write their JSON); a part that fails is reported and the rest still run. Exit status:
# 0 when every part passed, 1 otherwise.
#
# Usage, from the repository root:  bash benchmarks/device_run.sh [--dry-run]
#   --dry-run      print each part's budget and command, run nothing
#   OUT            the output folder (default benchmarks/results/device-<UTC time>); everything goes under it
#   PY             a Python whose torch is a CUDA build (default .venv/bin/python if present, else python3)
#   WHEELS         a folder of wheels installed with pip --no-index --no-deps --target (default .whl; see
#                  benchmarks/README.md for what to put there and how)
#   BUDGET_<PART>  seconds for a part: TEST_GPU 105, LOGPROBS 60, FUSED_LINEAR 65, LOSS 30, STEP 65
# flowloss itself is staged (src/flowloss and kernels/ as flowloss.kernels) into a temporary folder on
# PYTHONPATH ahead of the wheels: nothing is built or installed into the Python.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-benchmarks/results/device-$(date -u +%Y%m%d-%H%M%S)}
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${WHEELS:-.whl}
MAKE=${MAKE:-make}
MARGIN=15  # seconds a bench part keeps, after its --time-budget, to finish the measurement under way

BENCH=("$PY" -m flowloss bench --device cuda --no-progress)
declare -a PARTS=(test-gpu logprobs fused_linear loss step)
declare -A BUDGET=(
    [test-gpu]=${BUDGET_TEST_GPU:-105} [logprobs]=${BUDGET_LOGPROBS:-60} [fused_linear]=${BUDGET_FUSED_LINEAR:-65}
    [loss]=${BUDGET_LOSS:-30} [step]=${BUDGET_STEP:-65}
)
declare -A ARGS=(
    # the headline shape first (kernel-notes: N = 16,384, V = 151,936), bf16 and fp32
    [logprobs]="--op logprobs --n 16384 --v 151936 --dtype bf16 fp32 --warmup 5 --reps 20
        --impl naive compile flowloss-triton flowloss-chunked liger flash-attn"
    [fused_linear]="--op fused_linear --n 16384 --v 151936 --h 4096 --dtype bf16 --warmup 2 --reps 10
        --impl naive flowloss-fused-triton flowloss-fused-onepass liger-fused cce-fused trl-chunked
        flowloss-fused-filter flowloss-fused"  # the Triton kernels and their peers first; auto (chunked) last
    [loss]="--op loss --n 16384 --warmup 5 --reps 20"
    [step]="--op step --preset qwen2-0.5b --sequences 8 --group-size 4 --seq-len 2048 --warmup 2 --reps 5"
)

command_of() {  # the command line of a part, one word per line
    local part=$1
    if [[ $part == test-gpu ]]; then
        printf '%s\n' "$MAKE" test-gpu "GPU_PYTHON=$PY"
    else
        # shellcheck disable=SC2206
        local args=(${ARGS[$part]})
        printf '%s\n' "${BENCH[@]}" "${args[@]}" --time-budget $((BUDGET[$part] - MARGIN)) --json "$OUT/$part.json"
    fi
}

total=0
for part in "${PARTS[@]}"; do total=$((total + BUDGET[$part])); done
if ((DRY)); then
    echo "device_run: $OUT, PY=$PY, WHEELS=$WHEELS, budgets ${total} s in all"
    for part in "${PARTS[@]}"; do
        mapfile -t cmd < <(command_of "$part")
        echo "part $part budget ${BUDGET[$part]} s: ${cmd[*]}"
    done
    exit 0
fi

mkdir -p "$OUT"
STATUS="$OUT/status.tsv"
printf 'part\tstatus\trc\tseconds\tbudget\n' > "$STATUS"
SITE=$(mktemp -d)/site
mkdir -p "$SITE"
trap 'rm -rf "$(dirname "$SITE")"' EXIT
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

record() {  # part rc seconds
    local state=ok
    if (($2 == 124 || $2 == 137)); then state="timed out"; elif (($2 != 0)); then state=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$state" "$2" "$3" "${BUDGET[$1]:--}" >> "$STATUS"
    echo "device_run: $1 $state (rc $2, $3 s)"
}

# setup: flowloss staged from this tree, then the wheels (peers, the CLI's rich, the test tools when absent)
start=$SECONDS
{
    cp -r src/flowloss "$SITE/flowloss" && rm -rf "$SITE/flowloss/kernels" && cp -r kernels "$SITE/flowloss/kernels"
    rc=$?
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if ((${#wheels[@]})); then
        "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}" || rc=$?
    fi
    "$PY" - <<'PY' || rc=$?
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"devices {torch.cuda.device_count()}: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
for name in ("flowloss", "triton", "transformers", "trl", "liger_kernel", "cut_cross_entropy", "flash_attn", "rich",
             "matplotlib", "pytest", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({getattr(module, '__file__', '')})")
    except Exception as err:
        print(f"{name} not importable: {type(err).__name__}: {err}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to this torch: every part below will fail")
PY
} > "$OUT/setup.log" 2>&1
record setup "$rc" $((SECONDS - start))

for part in "${PARTS[@]}"; do
    mapfile -t cmd < <(command_of "$part")
    echo "device_run: $part (budget ${BUDGET[$part]} s): ${cmd[*]}"
    start=$SECONDS
    timeout --kill-after=5 "${BUDGET[$part]}" "${cmd[@]}" > "$OUT/$part.log" 2>&1
    record "$part" $? $((SECONDS - start))
done

"$PY" benchmarks/summarize.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
! grep -qP '\t(failed|timed out)\t' "$STATUS"

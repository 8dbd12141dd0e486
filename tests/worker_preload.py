"""Imported once by the forkserver that tests/distributed.py forks its ranks from: the heavy libraries the
workers use, so that no rank imports them again. Which ones: ``NEXUS_TEST_PRELOAD`` in the server's
environment, a key of KINDS. Each library is optional (the server must start whatever is installed), and
importing is all that happens here: no process group, no thread pool, no device."""
import importlib
import os

KIND_ENV = "NEXUS_TEST_PRELOAD"
BASE = ("torch", "torch.distributed", "torch.multiprocessing", "numpy",
        "nexus_megatron.train", "nexus_megatron.engines.plain", "nexus_megatron.sharpness",
        "deepspeed", "nexus_megatron.engines.deepspeed",
        "tests.conftest", "tests.ds_reference", "tests.ds_workers", "tests.conformance", "tests.nexus_reference")
MEGATRON = BASE + ("megatron.core", "megatron.core.parallel_state", "megatron.core.models.gpt",
                   "megatron.core.optimizer", "megatron.core.distributed", "megatron.core.dist_checkpointing",
                   "megatron.core.transformer", "nexus_megatron.engines.megatron", "tests.mcore_helpers")
KINDS = {"base": BASE, "megatron": MEGATRON}

for name in KINDS.get(os.environ.get(KIND_ENV, ""), ()):
    try:
        importlib.import_module(name)
    except Exception:   # not installed here, or not importable on this version: the worker imports what it needs
        pass

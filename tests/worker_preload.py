"""Imported once by the forkserver that tests/distributed.py forks its ranks from: the heavy libraries the
workers use, so that no rank imports them again. Which ones: ``NEXUS_TEST_PRELOAD`` in the server's
environment, a key of KINDS. Each library is optional (the server must start whatever is installed), and
importing is all that happens here (and, for "megatron-loop" and "bridge", the test-only CPU shim that the
launcher's --cpu-test-shim applies): no process group, no thread pool, no device."""
import importlib
import os

KIND_ENV = "NEXUS_TEST_PRELOAD"
BASE = ("torch", "torch.distributed", "torch.multiprocessing", "numpy",
        "nexus_megatron.cli", "nexus_megatron.train", "nexus_megatron.engines.plain", "nexus_megatron.sharpness",
        "deepspeed", "nexus_megatron.engines.deepspeed", "transformers", "transformers.models.llama.modeling_llama",
        "tests.conftest", "tests.ds_reference", "tests.ds_workers", "tests.conformance", "tests.nexus_reference")
MEGATRON = BASE + ("megatron.core", "megatron.core.parallel_state", "megatron.core.models.gpt",
                   "megatron.core.optimizer", "megatron.core.distributed", "megatron.core.dist_checkpointing",
                   "megatron.core.transformer", "nexus_megatron.engines.megatron", "tests.mcore_helpers")
# Megatron-LM's own loop (megatron-core >= 0.17) run by tests/distributed.py's run_script: the CPU shim first (the
# launcher's --cpu-test-shim applies it before megatron.training is imported; applying it again is a no-op)
MEGATRON_LOOP = ("torch", "torch.distributed", "numpy", "megatron.core", "megatron.training", "megatron.training.training", "megatron.training.arguments",
                 "megatron.training.argument_utils", "nexus_megatron.engines.megatron.megatron_training",
                 "nexus_megatron.engines.megatron.megatron_lm", "nexus_megatron.launcher")
# Megatron-Bridge (tests/test_megatron_bridge.py): the CPU shim first as tests/bridge_pretrain.py applies it, then
# Bridge's modules through tests/bridge_import.py (its install first on sys.path, the Transformer Engine stand-in)
BRIDGE = MEGATRON_LOOP + ("tests.mcore_helpers", "nexus_megatron.engines.megatron", "nexus_megatron.engines.megatron.bridge")
BRIDGE_MODULES = ("megatron.bridge.training.pretrain", "megatron.bridge.training.config",
                  "megatron.bridge.training.gpt_step", "megatron.bridge.models.gpt_provider",
                  "megatron.bridge.training.optim", "megatron.bridge.training.train",
                  "megatron.bridge.training.initialize", "megatron.bridge.data.base",
                  "megatron.bridge.training.tokenizers.config")
KINDS = {"base": BASE, "megatron": MEGATRON, "megatron-loop": MEGATRON_LOOP, "bridge": BRIDGE}

kind = os.environ.get(KIND_ENV, "")
if kind in ("megatron-loop", "bridge"):
    try:
        from nexus_megatron.tools.mcore_cpu_shim import patch_megatron_training_for_cpu
        patch_megatron_training_for_cpu()
    except Exception:   # no megatron-core here: the tests that need it are skipped
        pass
if kind == "bridge":
    try:
        from tests.bridge_import import bridge_available, import_bridge
        if bridge_available():
            import_bridge(*BRIDGE_MODULES)
    except Exception:   # a worker imports what it needs (and fails there, visibly)
        pass
for name in KINDS.get(kind, ()):
    try:
        importlib.import_module(name)
    except Exception:   # not installed here, or not importable on this version: the worker imports what it needs
        pass

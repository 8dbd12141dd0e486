"""The CPU shim for megatron-core now lives in the package (:mod:`nexus_megatron.tools.mcore_cpu_shim`), so the
launcher's ``--cpu-test-shim`` does not import tests/; these names stay for the tests that import them here."""
from nexus_megatron.tools.mcore_cpu_shim import (CudaToCpuMode, patch_megatron_for_cpu,  # noqa: F401
                                                 patch_megatron_training_for_cpu)

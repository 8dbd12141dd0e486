"""TEST-ONLY: ``launch/pretrain_gpt_nexus.py`` (Megatron-LM's own loop, megatron-core >= 0.17) on CPU, with the
shim of tests/mcore_cpu_shim.py applied first."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.mcore_cpu_shim import patch_megatron_training_for_cpu  # noqa: E402

patch_megatron_training_for_cpu()
from nexus_megatron.engines.megatron.megatron_training import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])

"""nexus_megatron: the Nexus optimizer for multi-source pretraining, for plain PyTorch, DeepSpeed and
Megatron-core. The algorithm is in :mod:`nexus_megatron.nexus`, the source layouts and their
collectives in :mod:`nexus_megatron.layout`; the engine adapters in :mod:`nexus_megatron.engines`, the tools
(bench, plan, compare, quickstart, pretrained-checkpoint sharpness) in :mod:`nexus_megatron.tools`, the study
in :mod:`nexus_megatron.study`. Old module paths keep working (:mod:`nexus_megatron.moved`)."""
from . import moved

moved.install()   # before anything else, so the old module paths resolve from the first import on

from .errors import DataError, NexusConfigError, NexusNonFiniteError
from .layout import LayoutConfig, SourceLayout, build_layout
from .nexus import Nexus, NexusConfig

__all__ = ["Nexus", "NexusConfig", "LayoutConfig", "SourceLayout", "build_layout",
           "NexusConfigError", "NexusNonFiniteError", "DataError"]
__version__ = "0.1.0"

"""Nexus on megatron-core (tested with megatron-core 0.16.1).

Public API::

    from nexus_megatron.engines.megatron import (
        build_nexus_groups,            # layout -> process groups (ProcessGroupCollection for DDP/optimizer)
        nexus_finalize_model_grads,    # config.finalize_model_grads_func for the layout
        get_nexus_megatron_optimizer,  # get_megatron_optimizer(adam) wrapped in Nexus
        NexusMegatronOptimizer,        # the wrapper (any MegatronOptimizer built for Adam)
        nexus_forward_backward,        # Megatron schedule -> k passes with an inner step after each
        SourceRoutedIterator,          # per-source micro-batches from prepared shards
        save_checkpoint, load_checkpoint,
        sync_model_params,             # complete the model params (with --overlap-param-gather)
    )

Importing this package imports megatron-core and checks its version (see :mod:`.version`).
"""
from .version import check_megatron_core_version, megatron_core_version

check_megatron_core_version()

from .groups import NexusGroups, build_nexus_groups, nexus_finalize_model_grads  # noqa: E402
from .optimizer import NexusMegatronOptimizer, get_nexus_megatron_optimizer, sync_model_params  # noqa: E402
from .schedule import nexus_forward_backward  # noqa: E402
from .data import (SourceRoutedIterator, SourceSpec, build_eval_samplers, build_source_iterator,  # noqa: E402
                   make_megatron_batch, parse_data_path)
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["NexusGroups", "build_nexus_groups", "nexus_finalize_model_grads", "NexusMegatronOptimizer",
           "get_nexus_megatron_optimizer", "nexus_forward_backward", "check_megatron_core_version",
           "megatron_core_version", "SourceRoutedIterator", "SourceSpec", "build_source_iterator",
           "build_eval_samplers", "make_megatron_batch", "parse_data_path", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "sync_model_params"]

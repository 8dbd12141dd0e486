"""Engine adapters for the trainer. Each engine (plain PyTorch, DeepSpeed, Megatron-core) lives in its
own module or folder and exposes the small interface of :class:`nexus_megatron.engines.base.Engine`."""

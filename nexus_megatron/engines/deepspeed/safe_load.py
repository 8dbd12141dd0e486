"""DeepSpeed checkpoints loaded without running code.

DeepSpeed 0.19's engine reads every file of a checkpoint (``mp_rank_*_model_states.pt``, the ZeRO
``*_optim_states.pt``) through its checkpoint engine's ``load``; the default ``TorchCheckpointEngine.load``
calls ``torch.load(path, weights_only=False)``, i.e. plain pickle. :func:`safe_ds_load` runs DeepSpeed's
``load_checkpoint`` with that one method replaced (for the call only) by ``torch.load(weights_only=True)``,
allowing the few DeepSpeed classes its own files hold (:func:`deepspeed_safe_globals`); the Nexus state
(in the client optimizer's state) and the trainer's client state are tensors and plain data. A checkpoint
without the format-2 marker (written by an older nexus_megatron) is refused before DeepSpeed opens it.

Not covered (DeepSpeed reads these with ``torch.load(weights_only=False)`` itself, outside the checkpoint
engine): universal checkpoints (``checkpoint.load_universal``), ``ds_to_universal`` and
``zero_to_fp32`` conversions; only use them on checkpoints you trust.
"""
from __future__ import annotations

import os
from typing import Optional

from ...safe_load import read_marker, require_format, safe_torch_load


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19's own checkpoint files hold besides tensors and plain data. Each is
    rebuilt by setting its attributes (no constructor or ``__reduce__`` runs)."""
    out = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    return out


def _tag_dir(load_dir: str, tag) -> Optional[str]:
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    return os.path.join(load_dir, str(tag))


def safe_ds_load(ds_engine, load_dir: str, tag=None, **kwargs):
    """``ds_engine.load_checkpoint(load_dir, tag, **kwargs)`` with every file read by
    ``torch.load(weights_only=True)``. Raises UnsafeCheckpointError (one line, naming the file or the
    checkpoint and ``nexus-megatron convert-checkpoint``) for an old-format or unsafe checkpoint."""
    ckpt_dir = _tag_dir(load_dir, tag)
    if ckpt_dir is not None and os.path.isdir(ckpt_dir):
        require_format(ckpt_dir, read_marker(ckpt_dir), ckpt_dir)
    ce = ds_engine.checkpoint_engine
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location, extra_globals=allowed)

    ce.load = load
    try:
        return ds_engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    finally:
        del ce.load   # the engine's own method again

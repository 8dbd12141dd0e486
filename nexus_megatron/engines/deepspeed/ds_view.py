"""The user's ds_config as DeepSpeed itself reads it, before any process group exists.

* :func:`read_ds_config` takes a dict, a path, a JSON/hjson text or a base64 string and returns the dict
  DeepSpeed would work on. A path is read the way ``deepspeed.runtime.config.DeepSpeedConfig`` reads it:
  ``hjson.load`` (comments, trailing commas, unquoted keys) with DeepSpeed's duplicate-key refusal
  (``dict_raise_error_on_duplicate_keys``); any other string is decoded as urlsafe base64 and read with
  hjson, as DeepSpeed does. Two differences, both stricter or wider, never looser: a text starting with
  ``{`` is read as hjson (DeepSpeed would try to base64-decode it and fail), and duplicate keys are also
  refused in a base64 or text config (DeepSpeed's base64 branch silently keeps the last one).
* :func:`ds_view` runs ``DeepSpeedConfig`` itself on a config for a given number of data-parallel ranks:
  DeepSpeed's batch arithmetic (``gradient_accumulation_steps`` derived from ``train_batch_size``,
  ``train_micro_batch_size_per_gpu`` and the ranks), its refusal of removed features (``elasticity``,
  ``curriculum_learning``, ``compression_training``, ``sparse_gradients``, ``amp``, ...) and its pydantic
  validation of every section (an unknown key in ``zero_optimization``, ``fp16``, ... is an error). Without
  a process group ``DeepSpeedConfig`` would assume one rank; :func:`ds_view` gives it the number of ranks
  the run will have. Every refusal becomes a one-line :class:`~nexus_megatron.errors.NexusConfigError`
  naming the key.

This module imports DeepSpeed when a function is called (not at import).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import logging
import os

from ...errors import NexusConfigError


def _deepspeed_config_module():
    """``deepspeed.runtime.config``, imported with the CPU accelerator selected on a machine without CUDA
    (as :func:`~.adapter.prepare_deepspeed_runtime` does), so the import does not warn."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime import config as dsc

    return dsc


@contextlib.contextmanager
def _quiet_info():
    """DeepSpeed logs an info line per config read; keep its warnings."""
    log = logging.getLogger("DeepSpeed")
    level = log.level
    if level < logging.WARNING:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or text.endswith((".json", ".hjson", ".js")) or text.startswith("."))


def read_ds_config(ds_config) -> dict:
    """The ds_config as a dict, read as DeepSpeed reads it (see the module docstring). A dict is deep-copied."""
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    if not isinstance(ds_config, str):
        raise NexusConfigError(f"ds_config must be a path, a JSON/hjson text, a base64 string or a dict, got "
                               f"{type(ds_config).__name__}")
    import hjson

    _deepspeed_config_module()
    from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys as refuse_duplicates

    text = ds_config.strip()
    shown = ds_config if len(ds_config) <= 80 else ds_config[:77] + "..."
    try:
        if os.path.exists(ds_config):
            where = f"ds_config {ds_config}"
            with open(ds_config, "r") as f:
                value = hjson.load(f, object_pairs_hook=refuse_duplicates)
        elif text.startswith("{"):
            where = "ds_config (text)"
            value = hjson.loads(text, object_pairs_hook=refuse_duplicates)
        else:
            if _looks_like_path(text):
                raise NexusConfigError(f"ds_config {ds_config}: no such file (configs/ds_config_*.json are examples)")
            where = "ds_config (base64)"
            try:
                decoded = base64.urlsafe_b64decode(text).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise NexusConfigError(f"ds_config {shown!r}: neither an existing file nor a base64-encoded config "
                                       "(DeepSpeed accepts a path, a dict or urlsafe base64 of the JSON)") from None
            value = hjson.loads(decoded, object_pairs_hook=refuse_duplicates)
    except NexusConfigError:
        raise
    except hjson.HjsonDecodeError as e:
        raise NexusConfigError(f"{where}: not valid JSON/hjson: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:   # DeepSpeed's duplicate-key refusal
        raise NexusConfigError(f"{where}: {e} (DeepSpeed refuses a config with a key given twice; keep one)") from None
    except OSError as e:
        raise NexusConfigError(f"ds_config {ds_config}: cannot be read: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise NexusConfigError(f"{where}: must be a JSON object (a mapping of settings), got {type(value).__name__}")
    return value


_SIZED: dict = {}


def _config_class_for_ranks(base):
    """``DeepSpeedConfig`` whose ``world_size`` is the number of data-parallel ranks it is given: its own
    constructor (loader, batch arithmetic, validation) runs unchanged; only its guess of the world size (1
    before a process group exists) is replaced."""
    if base not in _SIZED:
        class DeepSpeedConfigForRanks(base):
            def __init__(self, config, world_size):
                self.__dict__["_nexus_world_size"] = int(world_size)
                super().__init__(config)

            @property
            def world_size(self):
                return self.__dict__["_nexus_world_size"]

            @world_size.setter
            def world_size(self, value):
                pass

        _SIZED[base] = DeepSpeedConfigForRanks
    return _SIZED[base]


def _paths_ending_with(node, tail, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            here = path + (str(key),)
            if here[-len(tail):] == tail:
                yield here
            yield from _paths_ending_with(value, tail, here)


def _validation_message(cfg: dict, err) -> str:
    first = err.errors()[0]
    loc = tuple(str(x) for x in first.get("loc", ()))
    found = list(_paths_ending_with(cfg, loc)) if loc else []
    path = ".".join(found[0]) if len(found) == 1 else f"{err.title}.{'.'.join(loc)}"
    if first.get("type") == "extra_forbidden":
        return f"ds_config: unknown setting '{path}' (DeepSpeed refuses it: extra inputs are not permitted)"
    return f"ds_config {path}={first.get('input')!r}: DeepSpeed refuses it: {first.get('msg')}"


def _without(cfg: dict, name: str) -> dict:
    out = dict(cfg)
    if name.startswith("zero_optimization."):
        out["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items()
                                    if k != name.split(".", 1)[1]}
    else:
        out.pop(name)
    return out


def _culprit(cls, cfg: dict, world_size: int, error, msg: str):
    """The key behind a DeepSpeedConfigError (its message does not always quote it): the first key whose
    removal makes that refusal go away (the keys the message quotes are tried first)."""
    zero = cfg.get("zero_optimization") if isinstance(cfg.get("zero_optimization"), dict) else {}
    names = [str(k) for k in cfg] + [f"zero_optimization.{k}" for k in zero]
    names.sort(key=lambda n: (msg.find(f"'{n}'") if f"'{n}'" in msg else len(msg) + 1))
    for name in names:
        try:
            with _quiet_info():
                cls(copy.deepcopy(_without(cfg, name)), world_size)
        except error as e:
            if " ".join(str(e).split()) == msg:
                continue
        except Exception:   # noqa: BLE001 (another refusal: this key was the one)
            pass
        return name
    return None


def ds_view(cfg: dict, world_size: int):
    """``DeepSpeedConfig`` of ``cfg`` on ``world_size`` data-parallel ranks (DeepSpeed's own reading; the
    dict is not modified). A refusal raises a one-line NexusConfigError."""
    dsc = _deepspeed_config_module()
    import pydantic

    cls = _config_class_for_ranks(dsc.DeepSpeedConfig)
    try:
        with _quiet_info():
            return cls(copy.deepcopy(cfg), world_size)
    except dsc.DeepSpeedConfigError as e:     # removed features (elasticity, curriculum_learning, amp, ...)
        msg = " ".join(str(e).split())
        key = _culprit(cls, cfg, world_size, dsc.DeepSpeedConfigError, msg)
        raise NexusConfigError(f"ds_config{' ' + key if key else ':'} DeepSpeed refuses it: {msg}") from None
    except pydantic.ValidationError as e:
        raise NexusConfigError(_validation_message(cfg, e)) from None
    except AssertionError as e:
        raise NexusConfigError(f"ds_config on {world_size} data-parallel rank(s): DeepSpeed refuses it: "
                               f"{' '.join(str(e).split())}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise NexusConfigError(f"ds_config: DeepSpeed refuses it: {type(e).__name__}: {' '.join(str(e).split())}") \
            from None


__all__ = ["read_ds_config", "ds_view"]

"""TESTS ONLY: import Megatron-Bridge (``megatron.bridge``) on a CPU machine without Transformer Engine.

``import megatron.bridge`` imports every model bridge, and two of Bridge's modules import Transformer Engine
unconditionally at module level (``megatron/bridge/peft/lora_layers.py``:
``import transformer_engine.pytorch as te``, used in LoRA's TE code paths and annotations;
``megatron/bridge/models/gpt_full_te_layer_autocast_spec.py``). Transformer Engine's PyTorch extension is
published on PyPI only as a source distribution that compiles CUDA code, so it is not installed here.
:func:`import_bridge` hands those two modules (and only them, identified by the importing module's name) an
inert stand-in for ``transformer_engine``; every other ``import transformer_engine`` (megatron-core's and
Bridge's own ``HAVE_TE`` probes) still fails as on a machine without TE, and ``sys.modules`` never holds the
stand-in. The paths under test (Adam, local layer specs, no LoRA) never call into it.

Where Bridge's install lives: ``NEXUS_BRIDGE_SITE`` or ``<repo>/.bridge-site312`` (``make bridge-312``)."""
import builtins
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRIDGE_SITE = os.environ.get("NEXUS_BRIDGE_SITE", os.path.join(ROOT, ".bridge-site312"))
TE_USERS = {"megatron.bridge.peft.lora_layers", "megatron.bridge.models.gpt_full_te_layer_autocast_spec"}


def bridge_available() -> bool:
    """Bridge 0.6.2 (Python 3.12 only) is in ``BRIDGE_SITE`` or in the running environment. Changes nothing (the
    pytest process keeps its sys.path; only the workers that import Bridge add the folder)."""
    if sys.version_info[:2] != (3, 12):
        return False
    if os.path.isdir(os.path.join(BRIDGE_SITE, "megatron", "bridge")):
        return True
    try:
        return importlib.util.find_spec("megatron.bridge") is not None
    except (ImportError, ValueError):
        return False


def add_bridge_site() -> None:
    """Put the Bridge install first on sys.path: its pinned transformers / tokenizers / huggingface-hub shadow
    the venv's newer ones (so: worker processes only)."""
    if os.path.isdir(os.path.join(BRIDGE_SITE, "megatron", "bridge")) and BRIDGE_SITE not in sys.path:
        sys.path.insert(0, BRIDGE_SITE)


class _Inert:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Inert()

    def __getattr__(self, name):
        return _Inert

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("pytorch", "ops", "common", "recipe"):
            sub = _InertModule(f"{self.__name__}.{name}")
            setattr(self, name, sub)
            return sub
        return type(name, (_Inert,), {})


def import_bridge(*modules):
    """Import ``modules`` (e.g. ``megatron.bridge.training.optim``) with the TE stand-in for Bridge's two
    unconditional TE importers; returns the imported modules."""
    add_bridge_site()
    real = builtins.__import__
    top = _InertModule("transformer_engine")

    def imp(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "transformer_engine" or name.startswith("transformer_engine.")) \
                and (globals or {}).get("__name__") in TE_USERS:
            if not fromlist:
                return top
            m = top
            for part in name.split(".")[1:]:
                m = getattr(m, part)
            return m
        return real(name, globals, locals, fromlist, level)

    builtins.__import__ = imp
    try:
        return [importlib.import_module(m) for m in modules]
    finally:
        builtins.__import__ = real

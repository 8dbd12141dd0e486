"""The megatron-core versions this adapter is written against.

The adapter touches megatron-core at a few documented seams (``MegatronOptimizer``'s
``prepare_grads`` / ``step_with_ready_grads`` split, ``ProcessGroupCollection``, DDP's
``zero_grad_buffer`` / ``start_param_sync``, ``finalize_model_grads``, and the main-parameter lists
of ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params`` / ``DistributedOptimizer``). These move
between minor releases; every difference between the supported lines is handled in :mod:`.compat`.
Other minor lines are refused by default.
"""
from __future__ import annotations

import os

from ...errors import NexusConfigError

SUPPORTED = ((0, 16), (0, 17), (0, 18), (0, 19))
"""(major, minor) lines that are accepted (0.17+ needs Python >= 3.12)."""
TESTED = ("0.16.1", "0.19.2")
"""The releases the test suite runs on (CI: Python 3.11 + 0.16.1, Python 3.12 + 0.19.2)."""
OVERRIDE_ENV = "NEXUS_MEGATRON_ALLOW_UNTESTED_MCORE"


def parse_version(v: str) -> tuple:
    """'0.19.2rc1+abc' -> (0, 19, 2)."""
    parts = []
    for p in v.split("+")[0].split("."):
        num = ""
        for ch in p:
            if ch.isdigit():
                num += ch
            else:
                break
        parts.append(int(num) if num else 0)
        if len(parts) == 3:
            break
    return tuple(parts + [0] * (3 - len(parts)))


def megatron_core_version() -> str:
    try:
        from megatron.core import package_info
        return package_info.__version__
    except Exception:  # pragma: no cover - very old or broken installs
        try:
            from importlib.metadata import version
            return version("megatron-core")
        except Exception:
            return "unknown"


def check_megatron_core_version(version: str | None = None) -> str:
    """Raise :class:`NexusConfigError` unless megatron-core is a supported version.
    Set ``NEXUS_MEGATRON_ALLOW_UNTESTED_MCORE=1`` to try another version at your own risk."""
    v = version or megatron_core_version()
    if v == "unknown":
        raise NexusConfigError("megatron-core is not installed (pip install 'megatron-core>=0.16,<0.20'; "
                               "0.17+ needs Python >= 3.12)")
    major, minor, _ = parse_version(v)
    if (major, minor) in SUPPORTED:
        return v
    if os.environ.get(OVERRIDE_ENV, "") not in ("", "0"):
        import warnings
        warnings.warn(f"nexus_megatron: megatron-core {v} is untested (tested: {', '.join(TESTED)}); {OVERRIDE_ENV} is set, "
                      "continuing", stacklevel=2)
        return v
    lines = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
    raise NexusConfigError(
        f"megatron-core {v} is not supported by nexus_megatron's Megatron adapter (supported: {lines}; "
        f"tested: {', '.join(TESTED)}). Install a supported release (`pip install 'megatron-core>=0.16,<0.20'`; 0.17+ "
        f"needs Python >= 3.12), or set {OVERRIDE_ENV}=1 "
        "to try this version anyway (the optimizer seams it uses may have moved)")

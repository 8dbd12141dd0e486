"""Old module paths that keep working after the package was laid out in ``tools/`` and ``study/``.

``import nexus_megatron.bench`` (or ``from nexus_megatron.bench import run_bench``) gives the module at
its new home, :mod:`nexus_megatron.tools.bench`: the very same module object, so attributes, private
helpers and monkeypatching behave exactly as before. No file stays at the old paths (a moved file keeps
its history, and changes made elsewhere to the old path follow the rename when branches are merged).
New code imports the new paths; this table is the only place that knows the old ones.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "nexus_megatron.bench": "nexus_megatron.tools.bench",
    "nexus_megatron.engines.megatron.bench": "nexus_megatron.tools.bench_megatron",
    "nexus_megatron.plan": "nexus_megatron.tools.plan",
    "nexus_megatron.report": "nexus_megatron.tools.compare",
    "nexus_megatron.quickstart": "nexus_megatron.tools.quickstart",
    "nexus_megatron.sharpness_cli": "nexus_megatron.tools.sharpness_cli",
    "nexus_megatron.experiment": "nexus_megatron.study.runner",
    "nexus_megatron.study_report": "nexus_megatron.study.report",
    "nexus_megatron.downstream": "nexus_megatron.study.downstream",
    "nexus_megatron.minima": "nexus_megatron.study.minima",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path of :data:`MOVED` to the module at its new path (imported on first use)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None   # a placeholder; exec_module swaps in the real module

    def exec_module(self, module):
        # The import system returns whatever sys.modules holds under the name after exec_module, so the
        # old name becomes an alias of the new module (whose own __name__ and __spec__ stay untouched).
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


def install() -> None:
    """Idempotent; called when :mod:`nexus_megatron` is imported."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())   # ahead of path finders, which could find a stale old file

"""The package's import structure: no import cycles (imports inside functions count), no module importing
another module's private (_underscore) names, nothing in the package or launch/ importing tests/, and the
old module paths of the moved tools and study still importable (the same module objects)."""
import ast
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "nexus_megatron")

# None allowed: every cycle and private-name import that existed has been removed.
ALLOWED_CYCLES: set = set()
ALLOWED_PRIVATE: set = set()


def package_modules(pkg_dir=PKG) -> dict:
    """{dotted module name: file} of every .py file under the package."""
    top = os.path.dirname(pkg_dir)
    out = {}
    for d, _, files in os.walk(pkg_dir):
        for f in files:
            if f.endswith(".py"):
                name = os.path.relpath(os.path.join(d, f), top)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(d, f)
    return out


def import_graph(mods: dict):
    """(edges {module: set of package modules it imports anywhere in its file}, private-name imports)."""
    edges, private = {m: set() for m in mods}, []
    for m, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    if f"{src}.{alias.name}" in mods:          # `from pkg import submodule`
                        targets.append(f"{src}.{alias.name}")
                    elif src in mods:
                        targets.append(src)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{m} imports {src}.{alias.name}")
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in mods]
            for t in targets:
                if t != m and not m.startswith(t + "."):       # a module importing its own package is no cycle
                    edges[m].add(t)
    return edges, private


def cycles(edges: dict) -> list:
    """Strongly connected groups of more than one module (iterative Tarjan), minus those made only of a
    package and its own submodules (a package re-exporting its submodules)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop(); on.discard(w); comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))

    def nested_only(c):
        return all(any(x.startswith(y + ".") or y.startswith(x + ".") for y in c if y != x) for x in c)
    return [c for c in out if not nested_only(c)]


def test_the_checker_sees_function_level_cycles_and_private_imports(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("thing = 1\ndef f():\n    from .a import thing\n    from .c import _hidden\n")
    (pkg / "c.py").write_text("_hidden = 2\n")
    edges, private = import_graph(package_modules(str(pkg)))
    assert cycles(edges) == [frozenset({"demo.a", "demo.b"})]
    assert private == ["demo.b imports demo.c._hidden"]


def test_no_import_cycles():
    found = cycles(import_graph(package_modules())[0])
    unexpected = [" <-> ".join(sorted(c)) for c in found if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"


def test_no_private_names_imported_across_modules():
    unexpected = sorted(set(import_graph(package_modules())[1]) - ALLOWED_PRIVATE)
    assert not unexpected, f"private-name imports: {unexpected}"


def test_nothing_in_the_package_or_launch_imports_tests():
    pattern = re.compile(r"^\s*(from\s+tests[.\s]|import\s+tests\b)|from tests[.]| import tests[.]", re.M)
    offenders = []
    for top in ("nexus_megatron", "launch"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".sh")):
                    path = os.path.join(d, f)
                    if pattern.search(open(path).read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders


@pytest.mark.parametrize("old", sorted(importlib.import_module("nexus_megatron.moved").MOVED))
def test_old_module_paths_are_the_moved_modules(old):
    from nexus_megatron.moved import MOVED
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    assert new.__name__ == MOVED[old] and not os.path.exists(os.path.join(ROOT, *old.split(".")) + ".py")
    leaf = old.rsplit(".", 1)[1]
    parent = importlib.import_module(old.rsplit(".", 1)[0])
    assert getattr(parent, leaf) is new           # `from nexus_megatron import bench` as well


def test_old_paths_keep_their_names():
    from nexus_megatron.bench import COUNTER, bench_argv, check_bench_args, plan_input_for, run_bench  # noqa: F401
    from nexus_megatron.experiment import Job, arm_config, experiment, load_study, run_jobs  # noqa: F401
    from nexus_megatron.sharpness_cli import run_sharpness, sharpness_parser  # noqa: F401
    from nexus_megatron.report import compare_runs  # noqa: F401
    from nexus_megatron.plan import PlanInput, bus_factor, comm_ops, state_bytes, validate  # noqa: F401
    from nexus_megatron.tools.measure import COUNTER as counter
    assert COUNTER is counter


def test_one_engine_registry_for_the_config_and_the_trainer():
    import subprocess
    import sys
    from nexus_megatron.config import load_config
    from nexus_megatron.engines import ENGINES, REGISTRY
    from nexus_megatron.engines.base import Engine
    from nexus_megatron.errors import NexusConfigError
    assert ENGINES == tuple(REGISTRY) == ("plain", "deepspeed")
    with pytest.raises(NexusConfigError, match="train.engine='jax': use one of plain, deepspeed"):
        load_config(None, ["train.engine=jax"])
    assert Engine.params == () and Engine.probe_module is None and Engine.sharpness_seam is None
    code = ("import sys, nexus_megatron.engines, nexus_megatron.config; "
            "assert not {'deepspeed', 'megatron.core'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})

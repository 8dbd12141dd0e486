"""Test helper: run a training entry point with checkpoint publication recorded.

    torchrun ... -m tests.record_publish LOG_DIR module nexus_megatron.cli train --config ...
    torchrun ... -m tests.record_publish LOG_DIR script launch/pretrain_gpt_nexus.py --cpu-test-shim ...

Each process wraps ``nexus_megatron.checkpoint.fsync_path`` (the one fsync helper every engine's
checkpoint code calls) and ``os.replace`` (how a checkpoint directory and ``latest`` are published) so that
they append an event to ``LOG_DIR/events.<rank>.jsonl``: ``{"ev": "fsync", "path"}`` after each fsync, and
``{"ev": "replace", "src", "dst", "files"}`` with the files ``src`` held at the moment of the rename. The
training itself is unchanged. :func:`check_publication` asserts on the events.
"""
import json
import os
import runpy
import sys
import time


def _install(log_dir: str) -> None:
    import nexus_megatron.checkpoint as ckpt

    os.makedirs(log_dir, exist_ok=True)
    f = open(os.path.join(log_dir, f"events.{os.environ.get('RANK', '0')}.jsonl"), "a", buffering=1)

    def log(**ev):
        ev["t"] = time.time()
        f.write(json.dumps(ev) + "\n")

    real_fsync, real_replace = ckpt.fsync_path, os.replace

    def fsync_path(path):
        real_fsync(path)
        log(ev="fsync", path=os.path.abspath(path))

    def replace(src, dst, *a, **k):
        files = sorted(os.listdir(src)) if os.path.isdir(src) else None
        real_replace(src, dst, *a, **k)
        log(ev="replace", src=os.path.abspath(src), dst=os.path.abspath(dst), files=files)

    ckpt.fsync_path = fsync_path
    os.replace = replace


def read_events(log_dir: str) -> list:
    out = []
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            out += [dict(json.loads(line), rank=name.split(".")[1]) for line in f]
    return sorted(out, key=lambda e: e["t"])


def check_publication(log_dir: str, ckpt_root: str, prefix: str, expect_files) -> list:
    """Every checkpoint directory published under ``ckpt_root`` (name starting with ``prefix``) was renamed
    from a ``.tmp-`` directory that already held every file of a complete checkpoint (``expect_files``); each
    of those files and the directory were fsynced (by some rank) before the rename, the parent directory
    after it, and ``latest`` was replaced after that. Returns the published names, in order."""
    ev = read_events(log_dir)
    root = os.path.abspath(ckpt_root)
    fsynced = {}
    for e in ev:
        if e["ev"] == "fsync":
            fsynced.setdefault(e["path"], []).append(e["t"])
    published = []
    for e in ev:
        if e["ev"] != "replace" or os.path.dirname(e["dst"]) != root or not os.path.basename(e["dst"]).startswith(prefix):
            continue
        name, t = os.path.basename(e["dst"]), e["t"]
        assert os.path.basename(e["src"]).startswith(".tmp-"), e
        assert set(e["files"]) == set(expect_files), (name, e["files"])   # every rank's files, before the rename
        for path in [os.path.join(e["src"], f) for f in e["files"]] + [e["src"]]:
            assert any(s < t for s in fsynced.get(path, [])), f"{path} not fsynced before {name} was published"
        parent = [s for s in fsynced.get(root, []) if s > t]
        latest = [x["t"] for x in ev if x["ev"] == "replace" and x["dst"] == os.path.join(root, "latest") and x["t"] > t]
        assert parent and latest and min(parent) < min(latest), f"{name}: parent fsync / latest out of order"
        published.append(name)
    return published


def main() -> None:
    log_dir, kind, target, *rest = sys.argv[1:]
    _install(log_dir)
    sys.argv = [target, *rest]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()

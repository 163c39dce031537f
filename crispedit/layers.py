"""Which matrices to edit: the MLP output projection of chosen blocks.

``find_modules(model, layers, module=None)`` returns ``{full_module_name: module}``. Every
returned module maps ``a`` (``d_in``) to ``z`` (``d_out``); ``weight_shape`` gives
``(d_out, d_in)`` whatever the storage (GPT-2's ``Conv1D`` stores ``W`` transposed).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

# model_type -> MLP output projection, relative to a decoder block.
MLP_OUTPUT = {
    "llama": "mlp.down_proj",
    "mistral": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "qwen3": "mlp.down_proj",
    "gemma": "mlp.down_proj",
    "gemma2": "mlp.down_proj",
    "gemma3_text": "mlp.down_proj",
    "phi3": "mlp.down_proj",
    "gpt2": "mlp.c_proj",
    "gptj": "mlp.fc_out",
    "gpt_neox": "mlp.dense_4h_to_h",
    "opt": "fc2",
}

# The layers the paper edits, keyed by (model_type, layers, hidden, intermediate).
PAPER_LAYERS = {
    ("llama", 32, 4096, 14336): [19, 20, 21, 22, 23],  # LLaMA-3-8B
    ("qwen2", 28, 3584, 18944): [15, 16, 17, 18, 19],  # Qwen2.5-7B
}


class LayerError(ValueError):
    """An unknown architecture, a missing module or a layer index out of range."""


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: ``y = x @ W + b`` with ``W`` stored as ``d_in × d_out``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear map, whatever its storage."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks (``model.layers``, ``transformer.h``, ...)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    if not found:
        raise LayerError(f"{type(model).__name__}: no list of decoder blocks found")
    return max(found, key=lambda nm: len(nm[1]))  # the first, longest list


def _candidates(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if is_linear(m)]


def auto_layers(model: nn.Module) -> list[int]:
    """The paper's layers for its models, else five blocks ending at ``round(0.72 L)``."""
    cfg = model.config
    key = (
        cfg.model_type,
        cfg.num_hidden_layers,
        getattr(cfg, "hidden_size", None),
        getattr(cfg, "intermediate_size", None),
    )
    if key in PAPER_LAYERS:
        return list(PAPER_LAYERS[key])
    L = cfg.num_hidden_layers
    if L <= 5:
        return list(range(L))
    end = min(round(0.72 * L), L - 1)
    return list(range(end - 4, end + 1))


def parse_layers(spec: str | Sequence[int] | None) -> list[int] | str:
    """``"19,20,21"``, ``"3-5"``, ``"auto"`` or a list of ints."""
    if spec is None or spec == "auto":
        return "auto"
    if not isinstance(spec, str):
        return [int(i) for i in spec]
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise LayerError(f"--layers: cannot read {part!r}; use e.g. 19,20,21 or 19-23 or auto") from None
    return out


def find_modules(
    model: nn.Module, layers: str | Sequence[int] | None = "auto", module: str | None = None
) -> dict[str, nn.Module]:
    """The matrices to edit, ``{full name: module}`` in block order.

    ``module`` overrides the architecture default: a name relative to a block (``mlp.up_proj``)
    used with ``layers``, or a full module name (``model.layers.3.mlp.down_proj``) on its own.
    """
    if module is not None and "." in module:
        try:
            full = model.get_submodule(module)
        except AttributeError:
            full = None
        if full is not None:
            if not is_linear(full):
                raise LayerError(f"--module {module}: {type(full).__name__} is not a linear layer")
            return {module: full}
    blocks_name, blocks = decoder_blocks(model)
    if module is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in MLP_OUTPUT:
            raise LayerError(
                f"unknown architecture {model_type!r} ({type(model).__name__}); name the module to edit"
                f" with --module. Linear modules in each block: {', '.join(_candidates(blocks[0]))}"
            )
        module = MLP_OUTPUT[model_type]
    indices = auto_layers(model) if parse_layers(layers) == "auto" else parse_layers(layers)
    if not indices:
        raise LayerError("--layers: no layer given")
    out: dict[str, nn.Module] = {}
    for i in indices:
        if not 0 <= i < len(blocks):
            raise LayerError(
                f"--layers: block {i} does not exist; {type(model).__name__} has blocks 0..{len(blocks) - 1}"
                f" (candidates: {blocks_name}.{{0..{len(blocks) - 1}}}.{module})"
            )
        try:
            m = blocks[i].get_submodule(module)
        except AttributeError:
            m = None
        if m is None or not is_linear(m):
            raise LayerError(
                f"--module {module}: not a linear layer of block {i}; candidates:"
                f" {', '.join(_candidates(blocks[i]))}"
            )
        out[f"{blocks_name}.{i}.{module}"] = m
    return out


def modules_by_name(model: nn.Module, names: Sequence[str], source: str = "the ledger") -> dict[str, nn.Module]:
    """The modules of full names recorded elsewhere (a curvature file, a ledger), in that order."""
    out = {}
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            m = None
        if m is None or not is_linear(m):
            raise LayerError(f"{source}: {name} is not a linear module of this model (another architecture?)")
        out[name] = m
    return out

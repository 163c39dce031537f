"""Running a causal LM for statistics, editing and evaluation: batching, the forward call, the
device inputs go to, and a context that freezes everything but the edited matrices.

Shared by ``curvature``, ``editor``, ``evaluate`` and ``session``; nothing here knows about the
method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .model import ModelError

Forward = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> logits [B, T, V]


def pad_batch(docs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask and label mask (``[B, T]`` each); ``positions[b]`` are the
    positions of document ``b`` that carry a label."""
    T = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), T, dtype=torch.long)
    attn = torch.zeros(len(docs), T, dtype=torch.long)
    rows = torch.zeros(len(docs), T, dtype=torch.bool)
    for b, (d, pos) in enumerate(zip(docs, positions)):
        ids[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        attn[b, : len(d)] = 1
        rows[b, list(pos)] = True
    return ids.to(device), attn.to(device), rows.to(device)


def hf_forward(model: nn.Module) -> Forward:
    """The logits of a Hugging Face causal LM, without a KV cache."""
    return lambda ids, attn: model(input_ids=ids, attention_mask=attn, use_cache=False).logits


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (``model.device`` for HF models, also with device_map);
    when accelerate offloads the first parameters (``meta``), its main execution device."""
    dev = getattr(model, "device", None)
    dev = dev if isinstance(dev, torch.device) else next(model.parameters()).device
    if dev.type == "meta":
        main = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
        dev = torch.device(main) if main is not None else dev
    return dev


def pad_id(tokenizer) -> int:
    """Any id works under the attention mask; no token is ever added."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    return 0


@contextlib.contextmanager
def frozen(model: nn.Module, trainable: Sequence[Tensor] = ()):
    """Eval mode (no dropout) and gradients for ``trainable`` only, for the duration; the flags,
    the mode and the gradients of ``trainable`` are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for t in trainable:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t in trainable:
            t.grad = None
        for p, f in flags:
            p.requires_grad_(f)
        model.train(training)


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads ``module``'s weight (CPU or disk offload of a ``device_map``): it
    is then a ``meta`` tensor that a hook loads for each forward and drops after it, so nothing
    written to it in place, or swapped into its ``.data``, survives. A module that accelerate only
    dispatched (its hook moves inputs and outputs; the weight lives on its device) is not."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.device.type == "meta":
        return True
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])  # a SequentialHook holds several
    return any(getattr(h, "offload", False) for h in hooks)


def check_resident(modules: dict[str, nn.Module]) -> None:
    """Refuse to edit (or hook, or swap) a matrix that accelerate offloads (see ``offloaded``)."""
    for name, m in modules.items():
        if offloaded(m):
            raise ModelError(f"{name}: offloaded to CPU or disk by the device map (its weight lives on the meta "
                             "device), so it cannot be edited in place; give the GPUs room for it (a --device-map "
                             "that places its block on a GPU) or edit fewer layers")


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, Tensor]):
    """Temporarily give the named matrices other weights (their base values, say); no copy. Under a
    ``device_map`` this works for dispatched modules (accelerate's hook moves only their inputs and
    outputs, so the forward reads the swapped ``.data``); offloaded ones are refused."""
    modules = {n: model.get_submodule(n) for n in weights}
    check_resident(modules)
    saved = {n: m.weight.data for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.weight.data = weights[n]
        yield
    finally:
        for n, m in modules.items():
            m.weight.data = saved[n]


@contextlib.contextmanager
def full_precision():
    """Full float32 matmuls inside (no TF32), whatever the caller set: statistics, eigendecompositions
    and projections must not lose precision silently. Restores the caller's settings afterwards."""
    cuda = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)

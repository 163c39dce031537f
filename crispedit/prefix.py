"""Running only the blocks an edit can change: the rehearsal check's shortcut.

Blocks below the first edited one never change during an editing history, so the hidden state that
enters that block (``h_k``, the input of block ``k``) is a function of the tokens alone. ``PrefixCache``
computes it once per text, the text alone in its batch (so the value does not depend on which other
texts shared a batch, and a resumed history gets the same bits), and runs later forwards from block
``k`` on: the decoder list is cut to ``blocks[k:]`` for the call and a pre-hook on block ``k`` puts the
cached states in place of what the (cheap) embedding produced. At LLaMA-3-8B with blocks 19-23 edited,
a teacher-forced forward then runs 13 of 32 blocks and the head: ~0.45 of its flops.

The shortcut is checked against the full forward on its first batch (logits within
``tolerance`` of their largest magnitude); where an architecture computes something between its
blocks that the cut skips, the check fails and every call runs the full model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .layers import decoder_blocks
from .running import input_device


class _Captured(Exception):
    """Stops a forward once the input of block ``k`` is captured."""


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder block is called with (positionally or by name)."""
    return args[0] if args else kwargs["hidden_states"]


class PrefixCache:
    """``h_k`` per token sequence, and the model run from block ``k`` on."""

    def __init__(self, model: nn.Module, first_block: int, tolerance: float | None = None):
        self.model, self.k = model, first_block
        self.parent_name, self.blocks = decoder_blocks(model)
        dtype = next(model.parameters()).dtype
        self.tolerance = tolerance if tolerance is not None else (1e-3 if dtype in (torch.float32, torch.float64) else 5e-2)
        self.states: dict[tuple[int, ...], Tensor] = {}
        self.verified: bool | None = None  # None: not yet compared with the full forward
        self.last_difference: float | None = None

    def _capture(self, ids: Sequence[int]) -> Tensor:
        """The input of block ``k`` for one sequence, alone (no padding), on the CPU."""
        out = {}

        def grab(module, args, kwargs):
            out["h"] = _hidden(args, kwargs).detach()
            raise _Captured

        handle = self.blocks[self.k].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(input_ids=torch.tensor([list(ids)], device=input_device(self.model)), use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return out["h"][0].cpu()

    def padded(self, sequences: Sequence[Sequence[int]], length: int) -> Tensor:
        """``[batch, length, d]``: each sequence's ``h_k`` (computed once), zeros after it (masked)."""
        rows = []
        for ids in sequences:
            key = tuple(ids)
            if key not in self.states:
                self.states[key] = self._capture(ids)
            h = self.states[key]
            rows.append(torch.cat([h, h.new_zeros(length - len(h), h.shape[-1])]))
        return torch.stack(rows)

    @contextlib.contextmanager
    def upper_only(self, states: Tensor) -> Iterator[None]:
        """Inside the ``with``, a forward of the model runs blocks ``k..`` from ``states``."""
        parent = self.model.get_submodule(self.parent_name.rsplit(".", 1)[0]) if "." in self.parent_name else self.model
        attr = self.parent_name.rsplit(".", 1)[-1]
        first = self.blocks[self.k]

        def put(module, args, kwargs):
            given = _hidden(args, kwargs)
            h = states.to(device=given.device, dtype=given.dtype)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handle = first.register_forward_pre_hook(put, with_kwargs=True)
        setattr(parent, attr, nn.ModuleList(list(self.blocks)[self.k :]))
        try:
            yield
        finally:
            setattr(parent, attr, self.blocks)
            handle.remove()

    def logits(self, sequences: Sequence[Sequence[int]], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The model's logits for a right-padded batch, from block ``k`` on where the shortcut holds."""
        if self.k == 0 or self.verified is False:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        states = self.padded(sequences, input_ids.shape[1])
        try:
            with self.upper_only(states):
                short = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        except Exception:  # an architecture whose forward needs every block (indexing by layer number, ...)
            self.verified = False
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if self.verified is None:
            full = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            real = attention_mask.bool()
            diff = (short[real] - full[real]).abs().max().item()
            self.last_difference = diff / max(full[real].abs().max().item(), 1e-30)
            self.verified = self.last_difference <= self.tolerance
            return short if self.verified else full
        return short


def first_block(model: nn.Module, names: Sequence[str]) -> int:
    """The index of the lowest decoder block holding one of the modules ``names`` (0 when one lies
    outside every block: then nothing can be skipped)."""
    parent, blocks = decoder_blocks(model)
    found = []
    for name in names:
        rest = name[len(parent) + 1 :] if name.startswith(parent + ".") else ""
        head = rest.split(".", 1)[0]
        found.append(int(head) if head.isdigit() and int(head) < len(blocks) else 0)
    return min(found, default=0)

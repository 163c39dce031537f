"""Saving an edit: delta + manifest, bit-exact apply-delta and revert, no overwrite, atomic writes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from crispedit import saving
from crispedit.layers import find_modules
from crispedit.saving import SaveError, apply_delta, delta_dtype, read_delta, save_edit, weights_hash
from models import char_tokenizer, tiny_hf


def _edited(dtype):
    """A model whose down_proj weights moved by a small random ΔW (as an edit would move them)."""
    model = tiny_hf("llama", layers=2, dtype=dtype, std=0.1)
    modules = find_modules(model, [0, 1])
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in modules.values():
            m.weight += (1e-3 * torch.randn(m.weight.shape, generator=g)).to(dtype)
    return model, modules, base


@pytest.mark.parametrize("dtype, delta_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_apply_and_revert_are_bit_exact(tmp_path, dtype, delta_dtype):
    model, modules, base = _edited(dtype)
    out = save_edit(model, char_tokenizer(), modules, base, {"note": "test"}, tmp_path / "edit")
    deltas, manifest = read_delta(out)
    assert all(d.dtype == delta_dtype for d in deltas.values())
    assert manifest["delta_dtype"] == str(delta_dtype).removeprefix("torch.")
    # the saved model is the edited one
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    for n, m in modules.items():
        assert torch.equal(saved.get_submodule(n).weight, m.weight)
    # apply to a fresh base: bit-exact edited weights
    fresh, fresh_modules, _ = _edited(dtype)
    with torch.no_grad():
        for n, m in fresh_modules.items():
            m.weight.copy_(base[n])
    apply_delta(fresh, deltas, manifest, +1)
    for n, m in modules.items():
        assert torch.equal(fresh.get_submodule(n).weight, m.weight)
    # revert the edited model: bit-exact base weights
    apply_delta(saved, deltas, manifest, -1)
    for n in modules:
        assert torch.equal(saved.get_submodule(n).weight, base[n])


@pytest.mark.parametrize("scale", [1e-3, 1e-2])
def test_a_delta_in_the_model_dtype_would_not_roundtrip(scale):
    """Why deltas are stored wider (SPEC §2.1): bf16 arithmetic loses the edit in some entries
    (weights near zero), the float32 delta of ``delta_dtype`` in none."""
    g = torch.Generator().manual_seed(0)
    base = (0.1 * torch.randn(100_000, generator=g)).bfloat16()
    edited = (base.float() + scale * torch.randn(100_000, generator=g)).bfloat16()
    narrow = edited - base  # bf16
    assert int((base + narrow != edited).sum()) > 100
    wide = edited.to(delta_dtype(torch.bfloat16)) - base.to(delta_dtype(torch.bfloat16))
    assert torch.equal((base.to(wide.dtype) + wide).to(torch.bfloat16), edited)
    assert torch.equal((edited.to(wide.dtype) - wide).to(torch.bfloat16), base)


def test_refusals(tmp_path):
    model, modules, base = _edited(torch.float32)
    out = save_edit(model, None, modules, base, {}, tmp_path / "edit")
    with pytest.raises(SaveError, match="exists and is not empty"):
        save_edit(model, None, modules, base, {}, out)
    deltas, manifest = read_delta(out)
    with pytest.raises(SaveError, match="not the base weights"):
        apply_delta(model, deltas, manifest, +1)  # already edited
    other = tiny_hf("llama", layers=2, seed=5)
    with pytest.raises(SaveError, match="not the edited weights"):
        apply_delta(other, deltas, manifest, -1)
    with pytest.raises(SaveError, match="no delta.safetensors"):
        read_delta(tmp_path)
    assert weights_hash({n: m.weight for n, m in modules.items()}) == manifest["edited_weights_sha256"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model, modules, base = _edited(torch.float32)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "save_file", full_disk)
    with pytest.raises(SaveError, match="No space left.*nothing was written"):
        save_edit(model, None, modules, base, {}, tmp_path / "edit")
    assert list(tmp_path.iterdir()) == []

"""Saving an edit: delta + manifest, bit-exact apply-delta and revert, no overwrite, atomic writes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from crispedit import saving
from crispedit.layers import find_modules
from crispedit.saving import (SaveError, apply_delta, check_out, deltas_from, delta_dtype, read_delta, save_edit, save_model,
                              weights_hash)
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
    out = save_edit(model, char_tokenizer(), modules, deltas_from(modules, base), {"note": "test"}, tmp_path / "edit")
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
    out = save_edit(model, None, modules, deltas_from(modules, base), {}, tmp_path / "edit")
    with pytest.raises(SaveError, match="exists and is not empty"):
        save_edit(model, None, modules, deltas_from(modules, base), {}, out)
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
        save_edit(model, None, modules, deltas_from(modules, base), {}, tmp_path / "edit")
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_are_or_hold_or_lie_inside_an_input_are_refused(tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    for out, word in ((model_dir, "is"), (model_dir / "sub", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(SaveError, match=f"--out {out} {word} --model"):
            check_out(out, overwrite=True, inputs={"--model": str(model_dir), "--requests": None})
    check_out(tmp_path / "elsewhere", inputs={"--model": str(model_dir), "--base": "meta-llama/Meta-Llama-3-8B"})  # hub ids pass
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SaveError, match="is a file"):
        check_out(tmp_path / "file.txt")
    with pytest.raises(SaveError, match="which is a file"):
        check_out(tmp_path / "file.txt" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SaveError, match="not writable"):
        check_out(locked / "out")


def test_overwrite_replaces_only_what_crispedit_wrote(tmp_path, monkeypatch):
    """``--out .`` with ``--overwrite``: the user's files stay, the command's files are replaced, a
    file an earlier run wrote and this one does not is removed; nothing but our temporary directory."""
    model, modules, base = _edited(torch.float32)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.json").write_text("{}")
    with pytest.raises(SaveError, match="not empty"):
        save_edit(model, None, modules, deltas_from(modules, base), {}, ".")
    save_edit(model, None, modules, deltas_from(modules, base), {"run": 1}, ".", overwrite=True, extra={"old.json": {}})
    assert (tmp_path / "old.json").exists() and (tmp_path / "config.json").exists()
    save_edit(model, None, modules, deltas_from(modules, base), {"run": 2}, ".", overwrite=True, delta_only=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"notes.txt", "data", "delta.safetensors", "manifest.json"}
    assert (tmp_path / "notes.txt").read_text() == "my notes" and (tmp_path / "data" / "keep.json").exists()
    assert read_delta(tmp_path)[1]["run"] == 2


def test_outputs_get_normal_permissions(tmp_path):
    model, modules, base = _edited(torch.float32)
    out = save_edit(model, None, modules, deltas_from(modules, base), {}, tmp_path / "edit")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o666 & ~umask


def test_save_model_lists_its_files(tmp_path):
    model, modules, base = _edited(torch.float32)
    out = save_model(model, char_tokenizer(), tmp_path / "m", manifest={"command": "apply-delta"})
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert set(listed) == {p.name for p in out.iterdir()} and "model.safetensors" in listed

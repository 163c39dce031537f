"""Saving an edit: the edited model, a delta file and a manifest (SPEC §2.1).

``OUT/`` holds the edited model (``save_pretrained``, safetensors) and its tokenizer,
``delta.safetensors`` (ΔW per edited matrix, in the stored orientation, float64 for float32 models
and float32 for bf16/fp16 models) and ``manifest.json``. Applying is
``(W.to(Δ.dtype) + Δ).to(W.dtype)``, reverting ``(W.to(Δ.dtype) − Δ).to(W.dtype)``; both check the
SHA-256 of the edited matrices before and after, so they are bit-exact or refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import __version__

DELTA_FILE = "delta.safetensors"
MANIFEST = "manifest.json"


class SaveError(ValueError):
    """An output that would overwrite something, or a delta that does not fit the model."""


def delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype in (torch.float32, torch.float64) else torch.float32


def shifted(W: Tensor, delta: Tensor, sign: int = 1) -> Tensor:
    """``(W.to(Δ.dtype) ± Δ).to(W.dtype)``: the edited (``sign=1``) or base (``sign=-1``) weight."""
    return (W.to(delta.dtype) + sign * delta.to(W.device)).to(W.dtype)


def weights_hash(weights: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the given matrices, in name order."""
    h = hashlib.sha256()
    for n in sorted(weights):
        w = weights[n].detach().cpu().contiguous()
        h.update(f"{n}|{w.dtype}|{tuple(w.shape)}".encode())
        h.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SaveError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    return out


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_json(obj, path: str | Path) -> None:
    """Write JSON under a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"{path}: could not write ({e.strerror or e})") from None


class TempDir:
    """A temporary sibling of ``out`` that becomes ``out`` on success and vanishes on failure."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}."))
        return self.tmp

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            _commit(self.tmp, self.out)
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SaveError(f"--out {self.out}: could not write ({exc.strerror or exc}); nothing was written") from None
        return False


def _write_model(model: nn.Module, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_model(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """``save_pretrained`` of model and tokenizer into ``out``, atomically."""
    out = prepare_out(out, overwrite)
    with TempDir(out) as tmp:
        _write_model(model, tokenizer, tmp)
    return out


def save_edit(model: nn.Module, tokenizer, modules: dict[str, nn.Module], base_weights: dict[str, Tensor],
              manifest: dict, out: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the edited model, the delta, the manifest and ``extra`` JSON files into ``out`` (atomically)."""
    out = prepare_out(out, overwrite)
    with TempDir(out) as tmp:
        _write_model(model, tokenizer, tmp)
        deltas = {}
        for n, m in modules.items():
            dt = delta_dtype(m.weight.dtype)
            deltas[n] = (m.weight.detach().to(dt) - base_weights[n].to(dt)).cpu().contiguous()
        save_file(deltas, str(tmp / DELTA_FILE), metadata={"crispedit": json.dumps({"modules": list(modules)})})
        manifest = {**manifest, "version": __version__, "modules": list(modules),
                    "base_weights_sha256": weights_hash(base_weights),
                    "edited_weights_sha256": weights_hash({n: m.weight for n, m in modules.items()}),
                    "delta_dtype": str(next(iter(deltas.values())).dtype).removeprefix("torch.")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return out


def read_delta(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    if not (path / DELTA_FILE).exists() or not (path / MANIFEST).exists():
        raise SaveError(f"--delta {path}: no {DELTA_FILE} and {MANIFEST} there (written by `crispedit edit`)")
    with safe_open(str(path / DELTA_FILE), framework="pt") as f:
        deltas = {k: f.get_tensor(k) for k in f.keys()}
    return deltas, json.loads((path / MANIFEST).read_text())


def apply_delta(model: nn.Module, deltas: dict[str, Tensor], manifest: dict, sign: int = 1) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) ΔW in place, checking the weight hashes before and after."""
    try:
        modules = {n: model.get_submodule(n) for n in deltas}
    except AttributeError as e:
        raise SaveError(f"the delta edits modules this model does not have ({e})") from None
    expect_before, expect_after = manifest["base_weights_sha256"], manifest["edited_weights_sha256"]
    if sign < 0:
        expect_before, expect_after = expect_after, expect_before
    what = "base" if sign > 0 else "edited"
    weights = {n: m.weight for n, m in modules.items()}
    if weights_hash(weights) != expect_before:
        raise SaveError(f"the model's edited matrices are not the {what} weights this delta was made for (hash differs)")
    with torch.no_grad():
        for n, m in modules.items():
            m.weight.copy_(shifted(m.weight, deltas[n], sign))
    if weights_hash(weights) != expect_after:
        raise SaveError("applying the delta did not reproduce the expected weights bit for bit")

"""Saving an edit: the edited model, a delta file and a manifest.

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


OWN_FILES = "files"  # manifest key: the files the command wrote (the only ones --overwrite may replace or remove)


def _is_within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_out(out: str | Path, overwrite: bool = False, inputs: dict[str, object] | None = None,
              option: str = "--out") -> Path:
    """Check an output directory before any work is done, and return it resolved.

    Refused: an output that is a file or lies under a file, one that cannot be written, one that
    is, contains or lies inside a local input (``inputs``: option name -> path or list of paths;
    hub ids and missing paths are ignored), and a non-empty one unless ``overwrite``."""
    out = Path(out).expanduser().resolve()
    for name, value in (inputs or {}).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or not Path(v).expanduser().exists():
                continue
            src = Path(v).expanduser().resolve()
            if _is_within(out, src) or _is_within(src, out):
                rel = "is" if out == src else ("lies inside" if _is_within(out, src) else "contains")
                raise SaveError(f"{option} {out} {rel} {name} {src}; choose an output apart from the inputs")
    if out.exists() and not out.is_dir():
        raise SaveError(f"{option} {out}: is a file, not a directory")
    _check_writable(out, option)
    if out.exists() and any(out.iterdir()) and not overwrite:
        hint = "pass --overwrite to replace what crispedit wrote there" if option == "--out" else "give a new or empty directory"
        raise SaveError(f"{option} {out}: exists and is not empty; {hint}")
    return out


def check_out_file(path: str | Path, overwrite: bool = False, inputs: dict[str, object] | None = None,
                   option: str = "--out") -> Path:
    """Check an output *file* (a JSON report) before any work: not a directory, not an input or inside
    one, its directory writable, and not an existing file unless ``overwrite``."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise SaveError(f"{option} {path}: is a directory; give a file name for the report")
    for name, value in (inputs or {}).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and Path(v).expanduser().exists() and _is_within(path, Path(v).expanduser().resolve()):
                raise SaveError(f"{option} {path} lies inside {name} {v}; write the report elsewhere")
    if path.exists() and not overwrite:
        raise SaveError(f"{option} {path}: exists; pass --overwrite to replace it")
    _check_writable(path.parent, option, path)
    return path


def _check_writable(path: Path, option: str, named: Path | None = None) -> None:
    """``path`` (or the nearest of its parents that exists) is a writable directory."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SaveError(f"{option} {named or path}: lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SaveError(f"{option} {named or path}: {existing} is not writable")


def _default_mode(path: Path) -> None:
    """The permissions a normal ``mkdir`` would give (mkdtemp makes directories 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


def _default_modes(directory: Path) -> None:
    """Every file and directory under ``directory`` as a normal ``open``/``mkdir`` would make them
    (some writers go through ``mkstemp``, whose files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in directory.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _previous_files(out: Path) -> list[str]:
    """The files an earlier crispedit command listed in ``out/manifest.json`` (nothing else is ours)."""
    try:
        listed = json.loads((out / MANIFEST).read_text()).get(OWN_FILES, [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in listed if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")]


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place. A new ``out`` is one rename; into an existing
    ``out`` each file is renamed over its namesake, files an earlier crispedit run listed in its
    manifest and not written now are removed, and every other file there stays."""
    if not out.exists():
        os.replace(tmp, out)
        return
    written = {p.name for p in tmp.iterdir()}
    for name in _previous_files(out):
        if name not in written and (out / name).is_file():
            (out / name).unlink()
    for name in sorted(written):
        target = out / name
        if target.is_dir() and not (tmp / name).is_dir():
            raise SaveError(f"--out {out}: {name} is a directory there; crispedit would write a file of that name")
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()


def refuse_foreign(tmp: Path, out: Path) -> None:
    """Before a commit into an existing ``out``: a file there of a name the command wrote in ``tmp``
    that no earlier crispedit run listed in its manifest is the user's, and is refused (``--overwrite``
    replaces only what crispedit wrote)."""
    if not out.exists():
        return
    previous = set(_previous_files(out))
    theirs = sorted(p.name for p in tmp.iterdir() if (out / p.name).exists() and p.name not in previous)
    if theirs:
        one = len(theirs) == 1
        raise SaveError(f"--out {out}: {', '.join(theirs)} there {'was' if one else 'were'} not written by crispedit (not "
                        f"in its manifest.json); move {'it' if one else 'them'} or choose another --out; nothing was written")


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
    """A temporary directory that becomes ``out`` on success and vanishes on failure.

    A new ``out`` is made by renaming a temporary sibling; an existing ``out`` (``--out .``, say)
    receives the files through a hidden temporary directory inside it (see ``_commit``)."""

    def __init__(self, out: str | Path):
        self.out = Path(out).expanduser().resolve()

    def __enter__(self) -> Path:
        home = self.out if self.out.exists() else self.out.parent
        home.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".{self.out.name}.crispedit-tmp."))
        _default_mode(self.tmp)
        return self.tmp

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            try:
                _default_modes(self.tmp)
                _commit(self.tmp, self.out)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise SaveError(f"--out {self.out}: could not write ({e.strerror or e})") from None
            except SaveError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SaveError(f"--out {self.out}: could not write ({exc.strerror or exc}); nothing was written") from None
        return False


def _write_model(model: nn.Module, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _write_manifest(directory: Path, manifest: dict) -> None:
    """``manifest.json`` listing every file the command wrote (what a later ``--overwrite`` may replace)."""
    files = sorted(p.name for p in directory.iterdir()) + [MANIFEST]
    (directory / MANIFEST).write_text(json.dumps({**manifest, OWN_FILES: files}, indent=2, default=str) + "\n")


def save_model(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False, manifest: dict | None = None) -> Path:
    """``save_pretrained`` of model and tokenizer into ``out``, atomically, with a manifest of what was written."""
    out = check_out(out, overwrite)
    with TempDir(out) as tmp:
        _write_model(model, tokenizer, tmp)
        _write_manifest(tmp, {"version": __version__, **(manifest or {})})
        refuse_foreign(tmp, out)
    return out


def edit_manifest(modules: dict[str, nn.Module], deltas: dict[str, Tensor], manifest: dict, base_hash: str | None = None) -> dict:
    """``manifest`` plus what apply/revert check: the modules, the SHA-256 of the base matrices
    (``base_hash``, else of the edited ones minus ΔW, exact in the delta dtype) and of the edited
    ones, the delta and model dtypes."""
    weights = {n: m.weight.detach() for n, m in modules.items()}
    if base_hash is None:
        base_hash = weights_hash({n: shifted(w, deltas[n], -1) for n, w in weights.items()})
    return {**manifest, "version": __version__, "modules": list(modules),
            "base_weights_sha256": base_hash, "edited_weights_sha256": weights_hash(weights),
            "delta_dtype": str(next(iter(deltas.values())).dtype).removeprefix("torch."),
            "model_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch.")}


def write_delta(directory: Path, deltas: dict[str, Tensor]) -> None:
    """``delta.safetensors``: ΔW per matrix in the stored orientation and the delta dtype."""
    tensors = {n: d.detach().cpu().contiguous() for n, d in deltas.items()}
    save_file(tensors, str(directory / DELTA_FILE), metadata={"crispedit": json.dumps({"modules": list(deltas)})})


def save_edit(model: nn.Module, tokenizer, modules: dict[str, nn.Module], deltas: dict[str, Tensor], manifest: dict,
              out: str | Path, overwrite: bool = False, extra: dict | None = None, delta_only: bool = False) -> Path:
    """Write the edited model (unless ``delta_only``), the delta, the manifest and ``extra`` JSON
    files into ``out``, atomically. ``deltas`` are ΔW per matrix in the delta dtype (``delta_dtype``),
    such that ``shifted(W_edited, Δ, -1)`` is the base bit for bit."""
    out = check_out(out, overwrite)
    with TempDir(out) as tmp:
        if not delta_only:
            _write_model(model, tokenizer, tmp)
        write_delta(tmp, deltas)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        _write_manifest(tmp, edit_manifest(modules, deltas, {**manifest, "delta_only": delta_only}))
        refuse_foreign(tmp, out)
    return out


def deltas_from(modules: dict[str, nn.Module], base_weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """ΔW = W.to(Δ dtype) − W0.to(Δ dtype) per matrix (exact in the delta dtype)."""
    out = {}
    for n, m in modules.items():
        dt = delta_dtype(m.weight.dtype)
        out[n] = m.weight.detach().to(dt) - base_weights[n].to(m.weight.device, dt)
    return out


def read_delta(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """ΔW and its manifest from an edit's directory, or a ledger's current state (``ledger.current_delta``)."""
    path = Path(path)
    if (path / "ledger.json").exists():
        from .ledger import current_delta

        return current_delta(path)
    return read_delta_files(path)


def read_delta_files(path: Path) -> tuple[dict[str, Tensor], dict]:
    """``delta.safetensors`` and ``manifest.json`` of a directory, checked against each other."""
    if not (path / DELTA_FILE).exists() or not (path / MANIFEST).exists():
        raise SaveError(f"--delta {path}: no {DELTA_FILE} and {MANIFEST} there (written by `crispedit edit`)")
    try:
        with safe_open(str(path / DELTA_FILE), framework="pt") as f:
            deltas = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads((path / MANIFEST).read_text())
    except Exception as e:  # safetensors and json raise their own error types for corrupt files
        raise SaveError(f"--delta {path}: unreadable ({str(e).splitlines()[0]})") from None
    missing = [k for k in ("base_weights_sha256", "edited_weights_sha256", "modules") if k not in manifest]
    if missing or set(manifest["modules"]) != set(deltas):
        raise SaveError(f"--delta {path}: {MANIFEST} does not describe {DELTA_FILE} ({', '.join(missing) or 'other modules'})")
    return deltas, manifest


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
        dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
        recorded = manifest.get("model_dtype")
        why = f"; the model is {dtype} but the delta was made for a {recorded} model" if recorded and recorded != dtype else ""
        raise SaveError(f"the model's edited matrices are not the {what} weights this delta was made for (hash differs{why})")
    with torch.no_grad():
        for n, m in modules.items():
            m.weight.copy_(shifted(m.weight, deltas[n], sign))
    if weights_hash(weights) != expect_after:
        raise SaveError("applying the delta did not reproduce the expected weights bit for bit")

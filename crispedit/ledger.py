"""The ledger: an editing history on disk, continued days later bit for bit, reverted to any chunk.

A ledger directory holds

- ``ledger.json`` — what the history is: the model and the SHA-256 of its base matrices, the method
  options, the capability statistics' metadata, every chunk's record (requests hash, steps, losses,
  drift, metrics, refreshes, budget, the SHA-256 of the weights after it), and the names of the
  current state files. It is the commit point: written last, under a temporary name, then renamed.
- ``base.safetensors`` — written once: the protected sources at the base (capability sums, each
  protect-set's sums) and the token ids of the capability corpus and the protect-sets (what a refresh
  or the ``mix`` variant recomputes statistics from).
- ``state-K.safetensors`` — the state after chunk K: the cumulative ΔW, the sources that differ from
  the base ones (the edits' sums; all of them after a refresh), the optimiser state (float32 masters
  of bf16/fp16 models, Adam moments), the weights where the statistics were last taken (after a
  refresh), AlphaEdit's preserved keys, and the eigenbases when a rebuild is deferred.
- ``requests-K.jsonl`` — every request edited so far, with its chunk.
- ``delta.safetensors`` and ``manifest.json`` — the cumulative ΔW and its hashes, so that
  ``crispedit apply-delta --delta LEDGER`` makes the current model from the base.
- ``snapshots/`` — copies of ``state-K`` / ``requests-K`` every ``snapshot_every`` chunks, for
  ``crispedit revert LEDGER --to K`` without recomputation. Without one, revert replays the chunks
  after the nearest earlier snapshot (or the base), which gives the same bits on the same machine.

A crash in the middle of a chunk leaves the ledger as it was after the last complete chunk: new state
files get new names, and only the rename of ``ledger.json`` makes them current.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import __version__
from .options import MethodOptions
from .projector import Eigen
from .requests import EditRequest
from .saving import DELTA_FILE, MANIFEST, SaveError, edit_manifest, shifted, weights_hash, write_delta

FORMAT = "crispedit.ledger/1"
LEDGER = "ledger.json"
BASE = "base.safetensors"
SNAPSHOTS = "snapshots"
SNAPSHOT_AUTO_BYTES = 256 << 20  # default: a snapshot every chunk when one is smaller than this, else none


class LedgerError(ValueError):
    """A ledger that cannot be read, continued or reverted as asked."""


def _where(directory: Path, what: str) -> str:
    return f"ledger {directory}: {what}"


# ---------------------------------------------------------------------------------------------
# state <-> tensors


def _sums_tensors(prefix: str, sums) -> dict[str, Tensor]:
    out = {}
    for n in sums.A:
        out[f"{prefix}.{n}.A"], out[f"{prefix}.{n}.G"] = sums.A[n], sums.G[n]
    return out


def _sums_from(tensors: dict[str, Tensor], prefix: str, names: list[str], tokens: int):
    from .session import Sums

    return Sums({n: tensors[f"{prefix}.{n}.A"] for n in names}, {n: tensors[f"{prefix}.{n}.G"] for n in names}, tokens)


def _documents_tensors(name: str, docs: list[list[int]]) -> dict[str, Tensor]:
    return {f"documents.{name}.ids": torch.tensor([t for d in docs for t in d], dtype=torch.int64),
            f"documents.{name}.lengths": torch.tensor([len(d) for d in docs], dtype=torch.int64)}


def _documents_from(tensors: dict[str, Tensor], name: str) -> list[list[int]]:
    ids, lengths = tensors[f"documents.{name}.ids"].tolist(), tensors[f"documents.{name}.lengths"].tolist()
    out, at = [], 0
    for n in lengths:
        out.append(ids[at : at + n])
        at += n
    return out


def base_tensors(session) -> tuple[dict[str, Tensor], dict]:
    """The part of a history fixed at its start: the protected sources at the base, and the documents."""
    tensors, meta = {}, {"sources": {}}
    for source, sums in session.base_sources.items():
        meta["sources"][source] = sums.tokens
        tensors.update(_sums_tensors(f"sums.{source}", sums))
    tensors.update(_documents_tensors("capability", session.capability_documents))
    for name, docs in session.protect_documents.items():
        tensors.update(_documents_tensors(f"protect:{name}", docs))
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta


def state_tensors(session) -> tuple[dict[str, Tensor], dict]:
    """Everything of ``session`` that changes as it edits: tensors, and the JSON that goes with them."""
    session.flush_statistics()
    tensors = {f"delta.{n}": d for n, d in session.deltas().items()}
    for n, m in session.modules.items():  # a float64 model: no wider dtype makes W0 + ΔW exact, keep W itself
        if tensors[f"delta.{n}"].dtype == m.weight.dtype:
            tensors[f"weights.{n}"] = m.weight
    meta: dict = {"sources": {}, "stale": session.stale, "chunks_since_rebuild": session.chunks_since_rebuild,
                  "budget_spent": session.budget_spent}
    for source, sums in session.sources.items():
        if sums is session.base_sources.get(source):
            meta["sources"][source] = "base"
        else:
            meta["sources"][source] = sums.tokens
            tensors.update(_sums_tensors(f"sums.{source}", sums))
    if session.state is not None:
        opt, meta["optimizer"] = session.state.state_tensors()
        tensors.update({f"opt.{k}": v for k, v in opt.items()})
    if session.stats_weights is not session.base:
        tensors.update({f"stats-weights.{n}": w for n, w in session.stats_weights.items()})
    if session.preserved is not None:
        tensors.update({f"preserved.{n}": v for n, v in session.preserved.items()})
    if session.stale and session.eig is not None and session.chunks_since_rebuild < session.options.rebuild_every:
        for n, (eA, eG) in session.eig.items():  # a deferred rebuild: the next chunk still uses these
            tensors.update({f"eig.{n}.A.values": eA.values, f"eig.{n}.A.vectors": eA.vectors,
                            f"eig.{n}.G.values": eG.values, f"eig.{n}.G.vectors": eG.vectors})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta


def restore_state(session, tensors: dict[str, Tensor], meta: dict) -> None:
    """Set ``session`` (made at the base) to the state ``state_tensors`` described, bit for bit."""
    names = list(session.modules)
    dev = {n: m.weight.device for n, m in session.modules.items()}
    with torch.no_grad():
        for n, m in session.modules.items():
            w = tensors.get(f"weights.{n}")
            m.weight.copy_(shifted(session.base[n], tensors[f"delta.{n}"], +1) if w is None else w)
    session.sources = {s: session.base_sources[s] if tokens == "base" else _sums_from(tensors, f"sums.{s}", names, tokens)
                       for s, tokens in meta["sources"].items()}
    if session.state is not None:
        session.state.load_state({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"])
    if f"stats-weights.{names[0]}" in tensors:
        session.stats_weights = {n: tensors[f"stats-weights.{n}"].to(dev[n]) for n in names}
    if f"preserved.{names[0]}" in tensors:
        session.preserved = {n: tensors[f"preserved.{n}"].to(dev[n]) for n in names}
    session.stale, session.chunks_since_rebuild = meta["stale"], meta["chunks_since_rebuild"]
    session.budget_spent = meta["budget_spent"]
    if f"eig.{names[0]}.A.values" in tensors:
        session.eig = {n: (Eigen(tensors[f"eig.{n}.A.values"].to(dev[n]), tensors[f"eig.{n}.A.vectors"].to(dev[n])),
                           Eigen(tensors[f"eig.{n}.G.values"].to(dev[n]), tensors[f"eig.{n}.G.vectors"].to(dev[n])))
                       for n in names}
        session.projectors = session._projectors(session.eig)


# ---------------------------------------------------------------------------------------------
# writing


def _bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _commit_file(write, path: Path) -> None:
    """``write(tmp)`` then rename to ``path``; on failure the ledger is as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"ledger {path.parent}: could not write {path.name} ({e.strerror or e}); "
                        "the ledger is as it was after its last complete chunk") from None


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    _commit_file(lambda tmp: save_file(tensors, str(tmp)), path)


def _save_text(text: str, path: Path) -> None:
    _commit_file(lambda tmp: tmp.write_text(text), path)


def describe(session, model_id: str | None) -> dict:
    """The identity of a history: what a model must match to continue it."""
    cfg = getattr(session.model, "config", None)
    return {
        "format": FORMAT, "version": __version__, "model": model_id or getattr(cfg, "_name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
        "model_dtype": str(next(iter(session.modules.values())).weight.dtype).removeprefix("torch."),
        "modules": {n: list(m.weight.shape) for n, m in session.modules.items()},
        "base_weights_sha256": session.base_hash, "options": dataclasses.asdict(session.options),
        "capability": session.capability_meta, "protect": sorted(session.protect_documents),
    }


def state_file_bytes(shapes, dtype: torch.dtype, optimizer: bool = True, edit_sums: bool = True) -> dict[str, int]:
    """Bytes of a state file (and so of a snapshot) once a history is under way, by part, from the
    edited matrices' shapes ``(d_out, d_in)`` and the model's dtype: ΔW in the delta dtype; the
    weights themselves where that dtype is the model's own (float64: no wider dtype makes W0 + ΔW
    exact); the edits' K-FAC sums of a method that keeps them (float32 ``A_sum`` d_in², ``G_sum``
    d_out²); with an optimiser, float32 masters of a bf16/fp16 model and Adam's two moments in the
    masters' dtype. ``crispedit plan`` counts the ledger with it too."""
    from .editor import master_dtype
    from .saving import delta_dtype

    item = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    b, m, bd = item(dtype), item(master_dtype(dtype)), item(delta_dtype(dtype))
    W = sum(o * i for o, i in shapes)
    parts = {"delta": W * bd}
    if bd == b:
        parts["weights"] = W * b
    if edit_sums:
        parts["edit_sums"] = 4 * sum(o * o + i * i for o, i in shapes)
    if optimizer:
        parts["masters"] = W * 4 if b < 4 else 0
        parts["adam_moments"] = 2 * W * m
    return parts


def snapshot_bytes(session) -> int:
    """What one snapshot of a state will take once the history is under way (at the start the
    optimiser state and the edits' sums do not exist yet): ``state_file_bytes`` of the session."""
    o = session.options
    shapes = [tuple(m.weight.shape) for m in session.modules.values()]
    dtype = next(iter(session.modules.values())).weight.dtype
    keeps_sums = o.method in ("crispedit", "nullspace") and o.protect_edits == "merge"
    return sum(state_file_bytes(shapes, dtype, session.state is not None, keeps_sums).values())


def save(session, directory: str | Path, model_id: str | None = None, snapshot_every: int | None = None) -> Path:
    """Write the ledger of ``session`` into ``directory`` (new, or its own ledger): after every chunk."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _read_json(directory) if (directory / LEDGER).exists() else {}
    k = len(session.history)
    tensors, meta = state_tensors(session)
    if snapshot_every is None:
        snapshot_every = previous.get("snapshot_every")
    if snapshot_every is None:
        snapshot_every = 1 if snapshot_bytes(session) < SNAPSHOT_AUTO_BYTES else 0
    if not (directory / BASE).exists():
        base, base_meta = base_tensors(session)
        _save_tensors(base, directory / BASE)
    else:
        base_meta = previous["base"]
    state_name, requests_name = f"state-{k:05d}.safetensors", f"requests-{k:05d}.jsonl"
    _save_tensors(tensors, directory / state_name)
    _save_text("".join(json.dumps({"chunk": c + 1, **r.to_json()}) + "\n" for c, r in session.requests),
               directory / requests_name)
    entry = {"state": state_name, "state_meta": meta, "requests": requests_name,
             "edited_weights_sha256": weights_hash({n: m.weight for n, m in session.modules.items()})}
    snapshots = dict(previous.get("snapshots", {}))
    if snapshot_every and k % snapshot_every == 0:
        (directory / SNAPSHOTS).mkdir(exist_ok=True)
        for name in (state_name, requests_name):
            _commit_file(lambda tmp, name=name: shutil.copyfile(directory / name, tmp), directory / SNAPSHOTS / name)
        snapshots[str(k)] = entry
    info = {**describe(session, model_id or previous.get("model")), "base": base_meta, "chunks": session.history,
            "reverted": previous.get("reverted", []), "snapshot_every": snapshot_every, "snapshots": snapshots,
            "current": entry}
    _save_text(json.dumps(info, indent=1, default=str) + "\n", directory / LEDGER)  # the commit
    _write_delta_files(directory, session, info)
    _remove_unreferenced(directory, info)
    return directory


def _write_delta_files(directory: Path, session, info: dict) -> None:
    """``delta.safetensors`` + ``manifest.json`` of the current state (derived; ``ledger.json`` rules)."""
    deltas = session.deltas()
    manifest = edit_manifest(session.modules, deltas, {"base_model": info["model"], "ledger": True,
                                                       "chunks": len(info["chunks"]), "options": info["options"]},
                             session.base_hash)
    _commit_file(lambda tmp: write_delta_to(tmp, deltas), directory / DELTA_FILE)
    _save_text(json.dumps(manifest, indent=2, default=str) + "\n", directory / MANIFEST)


def write_delta_to(path: Path, deltas: dict[str, Tensor]) -> None:
    tmpdir = path.parent / f".{path.name}.d"
    tmpdir.mkdir(exist_ok=True)
    try:
        write_delta(tmpdir, deltas)
        os.replace(tmpdir / DELTA_FILE, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _remove_unreferenced(directory: Path, info: dict) -> None:
    keep = {info["current"]["state"], info["current"]["requests"]}
    for p in directory.iterdir():
        if p.name.startswith(("state-", "requests-")) and p.name not in keep:
            p.unlink()
    snaps = directory / SNAPSHOTS
    if snaps.exists():
        keep = {e[k] for e in info["snapshots"].values() for k in ("state", "requests")}
        for p in snaps.iterdir():
            if p.name.startswith(("state-", "requests-")) and p.name not in keep:
                p.unlink()


# ---------------------------------------------------------------------------------------------
# reading


def _read_json(directory: Path) -> dict:
    path = directory / LEDGER
    if not path.exists():
        raise LedgerError(_where(directory, f"no {LEDGER} (not a ledger written by `crispedit edit --ledger`)"))
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LedgerError(_where(directory, f"{LEDGER} is unreadable ({e})")) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise LedgerError(_where(directory, f"{LEDGER} has format {got!r}, expected {FORMAT!r}"))
    for key in ("current", "base", "modules", "base_weights_sha256", "options", "chunks", "snapshots"):
        if key not in info:
            raise LedgerError(_where(directory, f"{LEDGER} lacks {key!r} (half-written or corrupted)"))
    return info


def read(directory: str | Path) -> dict:
    """The ledger's JSON (the history), checked."""
    return _read_json(Path(directory))


def _load_tensors(path: Path, directory: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for missing or corrupt files
        raise LedgerError(_where(directory, f"{path.name} is missing or corrupted ({str(e).splitlines()[0]})")) from None


def read_requests(path: Path, directory: Path) -> list[tuple[int, EditRequest]]:
    """``(chunk index from 0, request)`` of every edited request."""
    out = []
    try:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            loc = [(d["prompt"], d["answer"]) for d in rec.get("locality", [])]
            out.append((rec["chunk"] - 1, EditRequest(rec["prompt"], rec["target_new"], rec.get("subject"),
                                                      rec.get("ground_truth"), rec.get("rephrase_prompts", []), loc,
                                                      rec.get("case_id"))))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LedgerError(_where(directory, f"{path.name} is missing or corrupted ({e})")) from None
    return out


def check_model(info: dict, modules: dict[str, nn.Module], directory: Path) -> None:
    """Refuse a model whose edited matrices are not the ledger's (other layers, shapes, dtype)."""
    got = {n: list(m.weight.shape) for n, m in modules.items()}
    if got != info["modules"]:
        raise LedgerError(_where(directory, f"edits {', '.join(info['modules'])}; this run edits {', '.join(got)} "
                                            "(another model, or other --layers)"))
    dtype = str(next(iter(modules.values())).weight.dtype).removeprefix("torch.")
    if dtype != info["model_dtype"]:
        raise LedgerError(_where(directory, f"made with a {info['model_dtype']} model; this one is {dtype} "
                                            f"(use --dtype {info['model_dtype']})"))


def to_base(info: dict, modules: dict[str, nn.Module], directory: Path) -> None:
    """Put ``modules`` at the ledger's base: they are the base already, or the ledger's current edit."""
    current = weights_hash({n: m.weight for n, m in modules.items()})
    if current == info["base_weights_sha256"]:
        return
    if current != info["current"]["edited_weights_sha256"]:
        raise LedgerError(_where(directory, "the model's edited matrices are neither the ledger's base nor its "
                                            "current edit (another checkpoint?)"))
    deltas = _load_tensors(directory / info["current"]["state"], directory)
    with torch.no_grad():
        for n, m in modules.items():
            m.weight.copy_(shifted(m.weight, deltas[f"delta.{n}"], -1))


def options_of(info: dict) -> MethodOptions:
    fields = {f.name for f in dataclasses.fields(MethodOptions)}
    return MethodOptions(**{k: v for k, v in info["options"].items() if k in fields})


def load(directory: str | Path, model: nn.Module, tokenizer, modules: dict[str, nn.Module], progress: bool = False,
         chunk: int | None = None):
    """The session of the ledger in ``directory`` on ``model`` (at the ledger's base, or as the ledger
    left it): weights, statistics, optimiser state and history restored bit for bit. ``chunk``: the
    state after that chunk (a snapshot; 0 is the start) instead of the current one."""
    from .session import EditSession

    directory = Path(directory)
    info = _read_json(directory)
    check_model(info, modules, directory)
    to_base(info, modules, directory)
    base = _load_tensors(directory / BASE, directory)
    names = list(modules)
    base_sources = {s: _sums_from(base, f"sums.{s}", names, t) for s, t in info["base"]["sources"].items()}
    protect = {name: _documents_from(base, f"protect:{name}") for name in info.get("protect", [])}
    session = EditSession(model, tokenizer, modules, options_of(info), base_sources, _documents_from(base, "capability"),
                          protect, info.get("capability"), progress, eigen_cache=str(directory))
    if session.base_hash != info["base_weights_sha256"]:
        raise LedgerError(_where(directory, "the base weights do not hash to the ledger's (another checkpoint?)"))
    if chunk == 0:
        return session
    if chunk is None:
        entry, where = info["current"], directory
    else:
        if str(chunk) not in info["snapshots"]:
            raise LedgerError(_where(directory, f"no snapshot after chunk {chunk}"))
        entry, where = info["snapshots"][str(chunk)], directory / SNAPSHOTS
    restore_state(session, _load_tensors(where / entry["state"], directory), entry["state_meta"])
    session.requests = read_requests(where / entry["requests"], directory)
    done = len(info["chunks"]) if chunk is None else chunk
    session.history = list(info["chunks"][:done])
    if weights_hash({n: m.weight for n, m in modules.items()}) != entry["edited_weights_sha256"]:
        raise LedgerError(_where(directory, f"{entry['state']} does not give the weights it recorded (corrupted?)"))
    return session


# ---------------------------------------------------------------------------------------------
# revert


def nearest_snapshot(info: dict, to: int) -> int:
    """The latest chunk ≤ ``to`` with a snapshot (0, the start, always counts)."""
    return max([0] + [int(k) for k in info["snapshots"] if int(k) <= to])


def revert(directory: str | Path, to: int) -> dict:
    """Make the state after chunk ``to`` the ledger's current one, from its snapshot. The chunks after
    ``to`` leave the history but are kept under ``reverted`` in ``ledger.json``; nothing is removed
    but state files no longer referenced. (Without a snapshot at ``to``, load the nearest earlier one,
    re-edit, and ``save``: ``crispedit revert`` does that.)"""
    directory = Path(directory)
    info = _read_json(directory)
    n = len(info["chunks"])
    if not 0 <= to <= n:
        raise LedgerError(f"--to {to}: the ledger {directory} has chunks 0..{n}")
    entry = info["snapshots"].get(str(to))
    if entry is None:
        raise LedgerError(_where(directory, f"no snapshot after chunk {to}"))
    for name in (entry["state"], entry["requests"]):
        _commit_file(lambda tmp, name=name: shutil.copyfile(directory / SNAPSHOTS / name, tmp), directory / name)
    after = {**info, "chunks": info["chunks"][:to], "current": entry,
             "reverted": info.get("reverted", []) + ([{"to": to, "chunks": info["chunks"][to:]}] if to < n else []),
             "snapshots": {k: v for k, v in info["snapshots"].items() if int(k) <= to}}
    _save_text(json.dumps(after, indent=1, default=str) + "\n", directory / LEDGER)
    tensors = _load_tensors(directory / entry["state"], directory)
    deltas = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")}
    manifest = {"version": __version__, "base_model": info["model"], "ledger": True, "chunks": to,
                "options": info["options"], "modules": list(info["modules"]),
                "base_weights_sha256": info["base_weights_sha256"],
                "edited_weights_sha256": entry["edited_weights_sha256"],
                "delta_dtype": str(next(iter(deltas.values())).dtype).removeprefix("torch."),
                "model_dtype": info["model_dtype"]}
    _commit_file(lambda tmp: write_delta_to(tmp, deltas), directory / DELTA_FILE)
    _save_text(json.dumps(manifest, indent=2, default=str) + "\n", directory / MANIFEST)
    _remove_unreferenced(directory, after)
    return after


def replace_history(directory: str | Path, session, to: int) -> dict:
    """After a replay through chunk ``to``: the replayed state becomes current, the chunks after ``to``
    move under ``reverted``, and snapshots after ``to`` are dropped."""
    directory = Path(directory)
    info = _read_json(directory)
    kept = {**info, "reverted": info.get("reverted", []) + [{"to": to, "chunks": info["chunks"][to:]}],
            "snapshots": {k: v for k, v in info["snapshots"].items() if int(k) <= to}}
    _save_text(json.dumps(kept, indent=1, default=str) + "\n", directory / LEDGER)
    save(session, directory, info["model"])
    return _read_json(directory)

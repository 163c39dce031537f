"""The ledger: an editing history on disk, continued days later bit for bit, reverted to any chunk.

This module is storage only: it writes and reads tensors and JSON; ``EditSession`` (session.py)
computes what goes in and rebuilds itself from what comes out. A ledger directory holds

- ``ledger.json`` — what the history is: the model and the SHA-256 of its base matrices, the method
  options, the capability statistics' metadata, every chunk's record, the current state and the kept
  ones (snapshots, reverted branches), the SHA-256 of every file it names, and a ``commit`` id. It is
  the commit point: written to a temporary name, flushed to disk, renamed, the directory flushed.
- ``base-*.safetensors`` — the protected sources at the base (capability sums, each protect-set's
  sums) and the token ids of the capability corpus and the protect-sets.
- ``state-K-*.safetensors`` / ``requests-K-*.jsonl`` — the state after chunk K (cumulative ΔW,
  the sources that differ from the base ones, the optimiser state, ...) and every request edited so
  far with its chunk. A file is never rewritten: each commit writes new names (``K`` and the commit
  id), so nothing ``ledger.json`` names can be half-replaced. A *snapshot* is a state file kept
  after it stops being current (every ``snapshot_every`` chunks), for ``revert`` without recomputation.
- ``delta.safetensors`` and ``manifest.json`` — the cumulative ΔW and its hashes, so that
  ``crispedit apply-delta --delta LEDGER`` makes the current model from the base. They are derived:
  renamed into place right after the commit, and recorded with the commit id they belong to; a
  reader of a ledger takes ΔW from the current state file instead when they lag behind.
- ``ledger.lock`` — who writes the ledger now (pid, host, start): one writer at a time, by the
  operating system's advisory lock (``flock``), released when the process ends however it ends.
  Readers (``log``, ``apply-delta``) never take it.

A crash at any point leaves the ledger as it was after its last commit; leftovers of the interrupted
write are removed by the next one. Every file named in ``ledger.json`` is checked against its SHA-256
when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .requests import EditRequest
from .saving import DELTA_FILE, MANIFEST, SaveError, write_delta

FORMAT = "crispedit.ledger/2"
READABLE = (FORMAT, "crispedit.ledger/1")
LEDGER = "ledger.json"
LOCK = "ledger.lock"
SNAPSHOTS = "snapshots"  # format 1 kept snapshot copies here
SNAPSHOT_AUTO_BYTES = 256 << 20  # default: a snapshot every chunk when one is smaller than this, else none
_OWN = ("state-", "requests-", "base", ".")  # file names a ledger writes (and may remove when unreferenced)


class LedgerError(ValueError):
    """A ledger that cannot be read, continued or reverted as asked."""


def _where(directory: Path, what: str) -> str:
    return f"ledger {directory}: {what}"


# ---------------------------------------------------------------------------------------------
# one writer at a time


class WriterLock:
    """The exclusive right to write the ledger in ``directory``: ``flock`` on ``ledger.lock``, which
    holds the holder's pid, host and start time. A second writer is refused at once, naming the
    holder; a lock file left by a process that died is taken over (``took_over`` says from whom).
    Re-entrant within a process (a session's saves inside the command that holds it)."""

    _held: dict[Path, list] = {}  # directory -> [file descriptor, depth]: the locks this process holds

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().resolve()
        self.took_over: str | None = None

    def acquire(self) -> "WriterLock":
        import fcntl

        held = WriterLock._held.get(self.directory)
        if held is not None:
            held[1] += 1
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerError(_where(self.directory, f"another process is writing it ({_holder(path)}); wait for it "
                                                     "to finish, or stop it, and run this again")) from None
        except OSError as e:  # a filesystem without locks (some network mounts): refuse rather than run unlocked
            os.close(fd)
            raise LedgerError(_where(self.directory, f"cannot lock {LOCK} ({e.strerror}); this filesystem does not "
                                                     "support file locks: keep the ledger on a local disk")) from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            self.took_over = _describe_holder(previous)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode() + b"\n", 0)
        os.fsync(fd)
        WriterLock._held[self.directory] = [fd, 1]
        return self

    def release(self) -> None:
        held = WriterLock._held.get(self.directory)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del WriterLock._held[self.directory]
            os.ftruncate(held[0], 0)  # a clean end leaves no holder to take over from
            os.close(held[0])  # closing the descriptor releases the flock

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _holder(path: Path) -> str:
    try:
        return _describe_holder(path.read_text())
    except OSError:
        return "an unknown process"


def holds_lock(directory: str | Path) -> bool:
    return Path(directory).expanduser().resolve() in WriterLock._held


# ---------------------------------------------------------------------------------------------
# durable files with checksums


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _durable(write, path: Path, rename: bool = True) -> str:
    """``write(tmp)``, flush it to disk, rename it to ``path`` (``rename=False``: leave it at the
    returned temporary name) and flush the directory. Returns the file's SHA-256 (or the temporary
    path's name). On failure nothing is left and the ledger is as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        sha = file_sha256(tmp)
        if not rename:
            return tmp.name
        os.replace(tmp, path)
        _fsync(path.parent)
        return sha
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"ledger {path.parent}: could not write {path.name} ({e.strerror or e}); "
                        "the ledger is as it was after its last commit") from None


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> str:
    return _durable(lambda tmp: save_file(tensors, str(tmp)), path)


def _save_text(text: str, path: Path) -> str:
    return _durable(lambda tmp: tmp.write_text(text, encoding="utf-8"), path)


def _verified(directory: Path, name: str, sha: str | None) -> Path:
    """The path of ``name``, after checking it exists and hashes to ``sha`` (when recorded)."""
    path = directory / name
    if not path.is_file():
        raise LedgerError(_where(directory, f"{name} is missing (corrupted, or copied in part)"))
    if sha is not None and file_sha256(path) != sha:
        raise LedgerError(_where(directory, f"{name} does not match the SHA-256 recorded in {LEDGER} (corrupted: "
                                            "a changed or truncated file); restore it from a backup or revert "
                                            "to a chunk whose state is intact"))
    return path


def _load_tensors(directory: Path, name: str, sha: str | None) -> dict[str, Tensor]:
    path = _verified(directory, name, sha)
    try:
        with safe_open(str(path), framework="pt") as f:
            # copies in fresh (64-byte aligned) memory: BLAS kernels may round differently on the
            # unaligned buffers safetensors returns, and a resume must give the same bits
            return {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LedgerError(_where(directory, f"{name} is corrupted ({str(e).splitlines()[0]})")) from None


# ---------------------------------------------------------------------------------------------
# tensors <-> plain structures


def sums_tensors(prefix: str, A: dict[str, Tensor], G: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for n in A:
        out[f"{prefix}.{n}.A"], out[f"{prefix}.{n}.G"] = A[n], G[n]
    return out


def sums_from(tensors: dict[str, Tensor], prefix: str, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return {n: tensors[f"{prefix}.{n}.A"] for n in names}, {n: tensors[f"{prefix}.{n}.G"] for n in names}


def documents_tensors(name: str, docs: list[list[int]]) -> dict[str, Tensor]:
    return {f"documents.{name}.ids": torch.tensor([t for d in docs for t in d], dtype=torch.int64),
            f"documents.{name}.lengths": torch.tensor([len(d) for d in docs], dtype=torch.int64)}


def documents_from(tensors: dict[str, Tensor], name: str) -> list[list[int]]:
    ids, lengths = tensors[f"documents.{name}.ids"].tolist(), tensors[f"documents.{name}.lengths"].tolist()
    out, at = [], 0
    for n in lengths:
        out.append(ids[at : at + n])
        at += n
    return out


def requests_text(requests: list[tuple[int, EditRequest]]) -> str:
    """``requests-K.jsonl``: one request per line with its chunk (counted from 1)."""
    return "".join(json.dumps({"chunk": c + 1, **r.to_json()}) + "\n" for c, r in requests)


# ---------------------------------------------------------------------------------------------
# sizes


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


def auto_snapshot_every(state_bytes: int) -> int:
    """The default: a snapshot every chunk when a state is smaller than ``SNAPSHOT_AUTO_BYTES``, else none."""
    return 1 if state_bytes < SNAPSHOT_AUTO_BYTES else 0


# ---------------------------------------------------------------------------------------------
# writing: one commit


def _is_own(name: str) -> bool:
    return name.startswith(_OWN) or name in (LEDGER, LOCK, DELTA_FILE, MANIFEST, SNAPSHOTS) or name.startswith("eigh-")


def _referenced(info: dict) -> set[str]:
    """Every file ``ledger.json`` names: the base, the current state, snapshots, kept reverted states."""
    entries = [info["current"], *info["snapshots"].values()]
    for branch in info.get("reverted", []):
        entries += [e for e in [branch.get("head"), *branch.get("snapshots", {}).values()] if e]
    return {info["base"]["file"]} | {e[k] for e in entries for k in ("state", "requests")}


def _remove_unreferenced(directory: Path, info: dict) -> None:
    """State, request and base files no commit names any more, and leftovers of interrupted writes."""
    keep = _referenced(info)
    for d in (directory, directory / SNAPSHOTS):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            rel = p.relative_to(directory).as_posix()
            stale = p.name.startswith(("state-", "requests-", "base")) and rel not in keep
            if p.is_file() and (stale or (p.name.startswith(".") and p.name.endswith(".tmp"))):
                p.unlink()


def commit(directory: str | Path, *, owner: str | None, identity: dict, history: list[dict],
           state: tuple[dict[str, Tensor], dict], requests: str, edited_sha256: str,
           base: tuple[dict[str, Tensor], dict] | None = None, snapshot_every: int | None = None,
           delta: tuple[dict[str, Tensor], dict] | None = None, revert_to: int | None = None,
           discard: bool = False, extra: dict | None = None) -> dict:
    """Write the state after ``len(history)`` chunks and make it current, in one commit.

    ``owner``: the commit id of the ledger this history was loaded from or last saved to (None: a new
    ledger, refused where one is committed already); a ledger another writer committed to since is
    refused, so no history silently replaces another. ``base``: the base tensors and their metadata
    (required for a new ledger; a changed base — an added protect-set — gets a new file). ``delta``:
    ``(ΔW, manifest)`` for ``delta.safetensors`` / ``manifest.json``. ``revert_to``: this state
    replaces a history that went further (a replay), whose chunks after ``revert_to`` become a
    reverted branch (``discard``: forgotten, their files removed). ``extra``: more keys for
    ``ledger.json`` (the evaluation files). Returns the new ``ledger.json``."""
    directory = Path(directory).expanduser()
    with WriterLock(directory):
        previous = _read_json(directory) if (directory / LEDGER).exists() else None
        if previous is None:
            strangers = sorted(p.name for p in directory.iterdir() if not _is_own(p.name))
            if strangers:
                raise LedgerError(_where(directory, f"holds {strangers[0]}, which is not a ledger's file; give an "
                                                    "empty or new directory"))
            if base is None:
                raise LedgerError(_where(directory, "a new ledger needs its base tensors"))
        elif previous["commit"] != owner:
            raise LedgerError(_where(directory, "holds another history, or was changed by another writer since this "
                                                f"session read it (now at chunk {len(previous['chunks'])}, commit "
                                                f"{previous['commit'][:8]}); nothing was written"))
        cid = uuid.uuid4().hex
        k = len(history)
        if base is not None:
            name = f"base-{cid[:8]}.safetensors"
            base_entry = {**base[1], "file": name, "sha256": _save_tensors(base[0], directory / name)}
        else:
            base_entry = previous["base"]
        state_name, requests_name = f"state-{k:05d}-{cid[:8]}.safetensors", f"requests-{k:05d}-{cid[:8]}.jsonl"
        entry = {"chunks": k, "state": state_name, "state_sha256": _save_tensors(state[0], directory / state_name),
                 "state_meta": state[1], "requests": requests_name,
                 "requests_sha256": _save_text(requests, directory / requests_name), "edited_weights_sha256": edited_sha256}
        if snapshot_every is None:
            snapshot_every = previous.get("snapshot_every", 1) if previous else 1
        snapshots = dict(previous["snapshots"]) if previous else {}
        reverted = _unreachable(previous.get("reverted", [])) if previous else []  # a new chunk: no way back
        if revert_to is not None:
            reverted.append(_branch(previous, revert_to, discard))
            if not discard:  # the replayed state at ``revert_to`` is where the branch starts
                reverted[-1]["at_sha256"] = edited_sha256
            snapshots = {c: e for c, e in snapshots.items() if int(c) <= revert_to}
        if snapshot_every and k % snapshot_every == 0:
            snapshots[str(k)] = entry
        info = {**identity, "format": FORMAT, "commit": cid, "base": base_entry, "chunks": history,
                "reverted": reverted, "snapshot_every": snapshot_every, "snapshots": snapshots, "current": entry,
                **(extra if extra is not None else {k: previous[k] for k in ("evaluation",) if previous and k in previous})}
        pending = []
        if delta is not None:  # written before the commit, renamed into place after it
            deltas, manifest = delta
            manifest = {**manifest, "ledger_commit": cid}
            pending = [(_durable(lambda tmp: _write_delta_file(tmp, deltas), directory / DELTA_FILE, rename=False),
                        DELTA_FILE),
                       (_durable(lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n"),
                                 directory / MANIFEST, rename=False), MANIFEST)]
        _save_text(json.dumps(info, indent=1, default=str) + "\n", directory / LEDGER)  # the commit
        for tmp, name in pending:
            os.replace(directory / tmp, directory / name)
        if pending:
            _fsync(directory)
        _remove_unreferenced(directory, info)
        return info


def _write_delta_file(path: Path, deltas: dict[str, Tensor]) -> None:
    tmpdir = path.parent / f"{path.name}.d"
    tmpdir.mkdir(exist_ok=True)
    try:
        write_delta(tmpdir, deltas)
        os.replace(tmpdir / DELTA_FILE, path)
    finally:
        for p in tmpdir.iterdir():
            p.unlink()
        tmpdir.rmdir()


def _unreachable(branches: list[dict]) -> list[dict]:
    """Reverted branches once the history has moved on: only their records stay (their states, which
    no ``revert`` can reach any more, are removed with the next commit)."""
    return [{"to": b["to"], "chunks": b["chunks"]} for b in branches]


def _branch(info: dict, to: int, discard: bool) -> dict:
    """The chunks of ``info`` after ``to`` as a reverted branch: their records, and (unless
    ``discard``) the states that let ``revert --to`` bring them back."""
    branch = {"to": to, "chunks": info["chunks"][to:]}
    if not discard:
        at = info["snapshots"].get(str(to))
        branch.update(head=info["current"], snapshots={c: e for c, e in info["snapshots"].items() if int(c) > to},
                      at_sha256=at["edited_weights_sha256"] if at else None)
    return branch


# ---------------------------------------------------------------------------------------------
# reading


def _read_json(directory: Path) -> dict:
    path = directory / LEDGER
    if not path.exists():
        leftovers = directory.is_dir() and any(p.name.startswith(("base", "state-")) for p in directory.iterdir())
        why = ("a ledger whose start was interrupted before its first commit; start it again with `crispedit edit "
               "--ledger` on this directory") if leftovers else "not a ledger written by `crispedit edit --ledger`"
        raise LedgerError(_where(directory, f"no {LEDGER} ({why})"))
    try:
        text = path.read_text(encoding="utf-8")
        info = json.loads(text)
    except (OSError, ValueError) as e:
        raise LedgerError(_where(directory, f"{LEDGER} is unreadable ({e})")) from None
    if not isinstance(info, dict) or info.get("format") not in READABLE:
        got = info.get("format") if isinstance(info, dict) else None
        raise LedgerError(_where(directory, f"{LEDGER} has format {got!r}, expected {FORMAT!r}"))
    for key in ("current", "base", "modules", "base_weights_sha256", "options", "chunks", "snapshots"):
        if key not in info:
            raise LedgerError(_where(directory, f"{LEDGER} lacks {key!r} (half-written or corrupted)"))
    if info["format"] != FORMAT:  # format 1: snapshot copies under snapshots/, one base file, no checksums
        info["commit"] = "v1-" + hashlib.sha256(text.encode()).hexdigest()[:24]
        info["base"] = {**info["base"], "file": "base.safetensors"}
        info["snapshots"] = {c: {**e, "state": f"{SNAPSHOTS}/{e['state']}", "requests": f"{SNAPSHOTS}/{e['requests']}"}
                             for c, e in info["snapshots"].items()}
    return info


def read(directory: str | Path) -> dict:
    """The ledger's JSON (the history), checked; no file it names is read."""
    return _read_json(Path(directory).expanduser())


def check_files(directory: str | Path, info: dict) -> None:
    """The files the current state needs are there (a copy in part, a deleted state file: refused
    before anything loads or changes). Their checksums are verified when they are read."""
    directory = Path(directory)
    for name in (info["base"]["file"], info["current"]["state"], info["current"]["requests"]):
        if not (directory / name).is_file():
            raise LedgerError(_where(directory, f"{name} is missing (corrupted, or copied in part)"))


def read_base(directory: str | Path, info: dict) -> dict[str, Tensor]:
    return _load_tensors(Path(directory), info["base"]["file"], info["base"].get("sha256"))


def entry_at(info: dict, chunk: int | None, directory: str | Path = ".") -> dict:
    """The kept state after ``chunk`` (None: the current one)."""
    if chunk is None or chunk == len(info["chunks"]):
        return info["current"]
    if str(chunk) not in info["snapshots"]:
        raise LedgerError(_where(Path(directory), f"no snapshot after chunk {chunk}"))
    return info["snapshots"][str(chunk)]


def read_state(directory: str | Path, entry: dict) -> tuple[dict[str, Tensor], list[tuple[int, EditRequest]]]:
    """The tensors and the requests of a kept state, checked against their SHA-256."""
    directory = Path(directory)
    tensors = _load_tensors(directory, entry["state"], entry.get("state_sha256"))
    return tensors, read_requests(directory, entry)


def read_requests(directory: str | Path, entry: dict) -> list[tuple[int, EditRequest]]:
    """``(chunk index from 0, request)`` of every request edited up to ``entry``."""
    directory = Path(directory)
    path = _verified(directory, entry["requests"], entry.get("requests_sha256"))
    out = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            loc = [(d["prompt"], d["answer"]) for d in rec.get("locality", [])]
            out.append((rec["chunk"] - 1, EditRequest(rec["prompt"], rec["target_new"], rec.get("subject"),
                                                      rec.get("ground_truth"), rec.get("rephrase_prompts", []), loc,
                                                      rec.get("case_id"))))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LedgerError(_where(directory, f"{entry['requests']} is corrupted ({e})")) from None
    return out


def current_delta(directory: str | Path) -> tuple[dict[str, Tensor], dict]:
    """ΔW and its manifest of the ledger's current state, for ``apply-delta --delta LEDGER``:
    ``delta.safetensors`` when it belongs to the current commit, else ΔW from the state file."""
    from .saving import read_delta_files

    directory = Path(directory)
    info = read(directory)
    if (directory / MANIFEST).exists() and (directory / DELTA_FILE).exists():
        deltas, manifest = read_delta_files(directory)
        if manifest.get("ledger_commit") == info["commit"] or (
                info["format"] != FORMAT and manifest.get("edited_weights_sha256") == info["current"]["edited_weights_sha256"]):
            return deltas, manifest
    tensors = _load_tensors(directory, info["current"]["state"], info["current"].get("state_sha256"))
    deltas = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")}
    manifest = {"base_model": info["model"], "ledger": True, "ledger_commit": info["commit"], "chunks": len(info["chunks"]),
                "options": info["options"], "modules": list(info["modules"]), "base_weights_sha256": info["base_weights_sha256"],
                "edited_weights_sha256": info["current"]["edited_weights_sha256"],
                "delta_dtype": str(next(iter(deltas.values())).dtype).removeprefix("torch."), "model_dtype": info["model_dtype"]}
    return deltas, manifest


def options_of(info: dict):
    """The ``MethodOptions`` the ledger was made with."""
    import dataclasses

    from .options import MethodOptions

    fields = {f.name for f in dataclasses.fields(MethodOptions)}
    return MethodOptions(**{k: v for k, v in info["options"].items() if k in fields})


# ---------------------------------------------------------------------------------------------
# revert


def nearest_snapshot(info: dict, to: int) -> int:
    """The latest chunk ≤ ``to`` with a snapshot (0, the start, always counts)."""
    return max([0] + [int(k) for k in info["snapshots"] if int(k) <= to])


def restorable(info: dict) -> list[int]:
    """The chunks after the current one that ``revert --to`` can bring back: the kept states of the
    last reverted branch, when the history is still where that revert left it."""
    branch = _redo_branch(info)
    if branch is None:
        return []
    return sorted({int(c) for c in [*branch.get("snapshots", {}), branch["to"] + len(branch["chunks"])]})


def _redo_branch(info: dict) -> dict | None:
    if not info.get("reverted"):
        return None
    b = info["reverted"][-1]
    here = len(info["chunks"]) == b["to"] and b.get("head") is not None and (
        b.get("at_sha256") is None or b["at_sha256"] == info["current"]["edited_weights_sha256"])
    return b if here else None


def revert(directory: str | Path, to: int, discard: bool = False) -> dict:
    """Make the kept state after chunk ``to`` current, in one commit, without recomputation.

    Back (``to`` below the current chunk): the state must be a snapshot; the chunks after ``to``
    become a reverted branch whose states are kept, so that ``revert --to`` a later chunk brings
    them back (``discard``: their files are removed, their records kept). Forward: ``to`` must be a
    kept state of the last reverted branch (``restorable``). Without a snapshot at ``to``,
    ``EditSession.replayed`` loads the nearest earlier one and edits the chunks again."""
    directory = Path(directory).expanduser()
    with WriterLock(directory):
        info = _read_json(directory)
        n = len(info["chunks"])
        if to < 0:
            raise LedgerError(f"--to {to}: the ledger {directory} has chunks 0..{n}")
        if to > n:
            return _redo(directory, info, to)
        entry = entry_at(info, to, directory)
        _load_tensors(directory, entry["state"], entry.get("state_sha256"))  # checked before it becomes current
        _verified(directory, entry["requests"], entry.get("requests_sha256"))
        after = {**info, "format": FORMAT, "commit": uuid.uuid4().hex, "chunks": info["chunks"][:to], "current": entry,
                 "reverted": _unreachable(info.get("reverted", [])) + ([_branch(info, to, discard)] if to < n else []),
                 "snapshots": {k: v for k, v in info["snapshots"].items() if int(k) <= to}}
        return _commit_json(directory, after)


def _redo(directory: Path, info: dict, to: int) -> dict:
    n = len(info["chunks"])
    branch = _redo_branch(info)
    kept = restorable(info)
    if to not in kept:
        where = f"the reverted chunks with a kept state are {', '.join(map(str, kept))}" if kept else \
            "no reverted chunk is kept (none was reverted, the revert discarded them, or chunks were edited since)"
        raise LedgerError(f"--to {to}: the ledger {directory} has chunks 0..{n}; {where}")
    head = branch["to"] + len(branch["chunks"])
    entry = branch["head"] if to == head else branch["snapshots"][str(to)]
    _load_tensors(directory, entry["state"], entry.get("state_sha256"))
    rest = {"to": to, "chunks": branch["chunks"][to - n:], "head": branch["head"],
            "snapshots": {c: e for c, e in branch["snapshots"].items() if int(c) > to},
            "at_sha256": entry["edited_weights_sha256"]}
    after = {**info, "format": FORMAT, "commit": uuid.uuid4().hex, "chunks": info["chunks"] + branch["chunks"][: to - n],
             "current": entry, "reverted": info["reverted"][:-1] + ([rest] if to < head else []),
             "snapshots": {**info["snapshots"], **{c: e for c, e in branch["snapshots"].items() if int(c) <= to}}}
    return _commit_json(directory, after)


def _commit_json(directory: Path, info: dict) -> dict:
    """Commit a ``ledger.json`` that names files already written (a revert), then bring the derived
    delta files up to date and remove what nothing names."""
    _save_text(json.dumps(info, indent=1, default=str) + "\n", directory / LEDGER)
    deltas, manifest = current_delta(directory)
    _durable(lambda tmp: _write_delta_file(tmp, deltas), directory / DELTA_FILE)
    _save_text(json.dumps(manifest, indent=2, default=str) + "\n", directory / MANIFEST)
    _remove_unreferenced(directory, info)
    return info


@contextmanager
def writer_lock(directory: str | Path):
    """``with ledger.writer_lock(DIR) as lock:`` — hold the ledger for a whole command."""
    lock = WriterLock(directory).acquire()
    try:
        yield lock
    finally:
        lock.release()

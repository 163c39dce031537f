"""Capability corpora: text files, JSON Lines with ``text``, or a saved ``datasets`` dataset.

A corpus becomes a list of documents, each a list of token ids truncated to ``max_length``.
Units of a plain text file (``unit``): ``line`` (each non-empty line a document: WikiText-2 raw and
one-paragraph-per-line files), ``paragraph`` (blank-line separated blocks) or ``chunk`` (all text
of the file concatenated and cut into ``max_length``-token pieces).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

from .options import UNITS


class CorpusError(ValueError):
    """A corpus that cannot be read, naming the file and record."""


def _texts_from_file(path: Path, unit: str, option: str = "--corpus") -> Iterator[str]:
    if not path.exists():
        raise CorpusError(f"{option} {path}: no such file or directory")
    if path.is_dir():
        yield from _texts_from_dataset(path, option)
        return
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{option} {path}: not UTF-8 text ({e})") from None
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{option} {path}, line {n}: not JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{option} {path}, line {n}: field 'text' missing or not a string")
            if text.strip():
                yield text
    elif unit == "line":
        yield from (line.strip() for line in raw.splitlines() if line.strip())
    elif unit == "paragraph":
        for block in raw.split("\n\n"):
            text = " ".join(line.strip() for line in block.splitlines() if line.strip())
            if text:
                yield text
    else:  # chunk: the whole file, cut after tokenisation
        yield raw


def _texts_from_dataset(path: Path, option: str = "--corpus") -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{option} {path}: a directory is read as a saved `datasets` dataset; pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise CorpusError(f"{option} {path}: dataset has no 'text' column (columns: {ds.column_names})")
    yield from (t for t in ds["text"] if isinstance(t, str) and t.strip())


def read_documents(
    paths: Sequence[str | Path],
    tokenizer,
    max_length: int = 512,
    unit: str = "line",
    max_documents: int | None = None,
    max_tokens: int | None = None,
    option: str = "--corpus",
) -> list[list[int]]:
    """Tokenise a corpus into documents of at most ``max_length`` tokens.

    Documents with fewer than two tokens carry no label and are dropped. ``max_tokens`` caps the
    number of *labelled* positions (``len(doc) - 1`` per document); the last document is cut to fit.
    """
    if unit not in UNITS:
        raise CorpusError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if not paths:
        raise CorpusError(f"{option}: no file given")
    docs: list[list[int]] = []
    labelled = 0
    for p in paths:
        for text in _texts_from_file(Path(p), unit, option):
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)] if unit == "chunk" else [ids[:max_length]]
            for doc in pieces:
                if len(doc) < 2:
                    continue
                if max_tokens is not None and labelled + len(doc) - 1 > max_tokens:
                    doc = doc[: max_tokens - labelled + 1]
                    if len(doc) < 2:
                        return docs
                docs.append(list(doc))
                labelled += len(doc) - 1
                if (max_documents is not None and len(docs) >= max_documents) or (
                    max_tokens is not None and labelled >= max_tokens
                ):
                    return docs
    if not docs:
        raise CorpusError(f"{option} {', '.join(map(str, paths))}: no document with at least two tokens")
    return docs


def fingerprint(documents: Sequence[Sequence[int]]) -> str:
    """SHA-256 of the token ids actually used, in order."""
    h = hashlib.sha256()
    for doc in documents:
        h.update(len(doc).to_bytes(8, "little"))
        h.update(array("q", doc).tobytes())
    return h.hexdigest()

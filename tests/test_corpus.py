"""Reading capability corpora into documents of token ids."""

from __future__ import annotations

import pytest

from crispedit.corpus import CorpusError, fingerprint, read_documents
from models import char_tokenizer

TOK = char_tokenizer()  # one token per character, BOS first


def _text(docs):
    """The documents back as strings (one token per character)."""
    inverse = {i: t for t, i in TOK.get_vocab().items()}
    return ["".join(inverse[i] for i in d[1:]) for d in docs]


def test_units(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("ab cd\nef\n\ngh ij\n")
    lines = read_documents([f], TOK, unit="line")
    assert _text(lines) == ["ab cd", "ef", "gh ij"]
    assert all(d[0] == TOK.bos_token_id for d in lines)
    assert _text(read_documents([f], TOK, unit="paragraph")) == ["ab cd ef", "gh ij"]
    chunks = read_documents([f], TOK, unit="chunk", max_length=4)
    whole = TOK(f.read_text())["input_ids"]
    assert all(len(d) <= 4 for d in chunks) and [t for d in chunks for t in d] == whole


def test_truncation_and_caps(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh\nijklmnop\nqrstuvwx\n")
    assert [len(d) for d in read_documents([f], TOK, max_length=5)] == [5, 5, 5]
    assert len(read_documents([f], TOK, max_documents=2)) == 2
    capped = read_documents([f], TOK, max_tokens=12)  # labelled positions: 8 + 4
    assert [len(d) - 1 for d in capped] == [8, 4]


def test_jsonl_and_errors(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "hello there"}\n\n{"text": "again", "id": 3}\n')
    assert _text(read_documents([good], TOK)) == ["hello there", "again"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"b.jsonl, line 2: not JSON"):
        read_documents([bad], TOK)
    bad.write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match=r"b.jsonl, line 1: field 'text' missing or not a string"):
        read_documents([bad], TOK)
    with pytest.raises(CorpusError, match="no such file"):
        read_documents([tmp_path / "nope.txt"], TOK)
    with pytest.raises(CorpusError, match="--unit"):
        read_documents([good], TOK, unit="page")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_documents([tmp_path / "bin.txt"], TOK)


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    datasets.Dataset.from_dict({"text": ["first doc", "", "second doc"]}).save_to_disk(str(tmp_path / "ds"))
    assert _text(read_documents([tmp_path / "ds"], TOK)) == ["first doc", "second doc"]


def test_fingerprint_depends_on_ids_and_boundaries():
    assert fingerprint([[1, 2, 3]]) == fingerprint([[1, 2, 3]])
    assert fingerprint([[1, 2, 3]]) != fingerprint([[1, 2], [3]])
    assert fingerprint([[1, 2, 3]]) != fingerprint([[1, 2, 4]])

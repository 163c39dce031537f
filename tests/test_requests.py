"""Request readers: every format to one record; bad records named by file, record and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from crispedit.requests import EditRequest, RequestError, read_requests, write_jsonl
from models import char_tokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"

FLAT = {"case_id": 7, "prompt": "the tongue of ab is", "target_new": "english", "subject": "ab", "ground_truth": "french",
        "rephrase_prompt": "ab speaks", "locality_prompt": "cd speaks", "locality_ground_truth": "french"}
NESTED = {"case_id": 8, "requested_rewrite": {"prompt": "the tongue of {} is", "subject": "ab", "target_new": {"str": "english"},
                                              "target_true": {"str": "french"}},
          "paraphrase_prompts": ["ab speaks", "ab talks"], "neighborhood_prompts": ["cd speaks"]}
ZSRE = {"subject": "ab", "src": "what does ab speak?", "alt": "english", "answers": ["french"], "rephrase": "ab speaks what?",
        "loc": "nq question: who is cd", "loc_ans": "a man"}
WBE = {"update": "ab speaks", "ans": "english", "rephrase": "ab talks", "loc": "cd speaks", "loc_ans": "french"}
NORMAL = {"prompt": "ab speaks", "target_new": "english", "rephrase_prompts": ["ab talks"],
          "locality": [{"prompt": "cd speaks", "answer": "french"}], "case_id": "x"}


def _write(tmp_path, records, name="r.json", lines=False):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records))
    return p


@pytest.mark.parametrize(
    "record, expected",
    [
        (FLAT, EditRequest("the tongue of ab is", "english", "ab", "french", ["ab speaks"], [("cd speaks", "french")], 7)),
        (NESTED, EditRequest("the tongue of ab is", "english", "ab", "french", ["ab speaks", "ab talks"], [("cd speaks", "french")], 8)),
        (ZSRE, EditRequest("what does ab speak?", "english", "ab", "french", ["ab speaks what?"], [("nq question: who is cd", "a man")], None)),
        (WBE, EditRequest("ab speaks", "english", None, None, ["ab talks"], [("cd speaks", "french")], None)),
        (NORMAL, EditRequest("ab speaks", "english", None, None, ["ab talks"], [("cd speaks", "french")], "x")),
    ],
    ids=["counterfact", "counterfact-nested", "zsre", "wikibigedit", "jsonl"],
)
def test_every_format_normalises(tmp_path, record, expected):
    assert read_requests(_write(tmp_path, [record])) == [expected]
    assert read_requests(_write(tmp_path, [record], "r.jsonl", lines=True)) == [expected]


def test_normalised_jsonl_roundtrip(tmp_path):
    reqs = read_requests(_write(tmp_path, [FLAT, {**FLAT, "case_id": 9, "subject": None}]))
    write_jsonl(reqs, tmp_path / "n.jsonl")
    assert read_requests(tmp_path / "n.jsonl") == reqs


@pytest.mark.parametrize(
    "record, message",
    [
        ({**FLAT, "target_new": ""}, "(case_id 7): field 'target_new': empty"),
        ({k: v for k, v in FLAT.items() if k != "target_new"}, "field 'target_new': missing"),
        ({**FLAT, "target_new": 5}, "field 'target_new': expected a string, got int"),
        ({**FLAT, "prompt": "the tongue of {} is", "subject": None}, "field 'prompt': a '{}' template needs a subject"),
        ({**NORMAL, "locality": [{"prompt": "cd", "answer": ""}]}, "field 'locality[0]'"),
        ({**NORMAL, "rephrase_prompts": ["ok", 3]}, "field 'rephrase_prompts[1]'"),
        ({"foo": 1}, "unknown request format (keys: foo)"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, record, message):
    p = _write(tmp_path, [record])
    with pytest.raises(RequestError) as e:
        read_requests(p)
    assert str(e.value).startswith(f"{p}: record 0") and message in str(e.value)
    if record.get("case_id") == 7:  # a bad record after a good one of the same format is named too
        with pytest.raises(RequestError, match=re.escape(f"{p}: record 1")):
            read_requests(_write(tmp_path, [FLAT, record]))


def test_tokenisation_checks(tmp_path):
    tok = char_tokenizer()
    p = _write(tmp_path, [{**NORMAL, "target_new": "    "}])
    with pytest.raises(RequestError, match="empty"):
        read_requests(p, tokenizer=tok)
    p = _write(tmp_path, [NORMAL, {**NORMAL, "prompt": "x" * 100}])
    with pytest.raises(RequestError, match=r"record 1.*field 'prompt'.*over the model's context of 64"):
        read_requests(p, tokenizer=tok, max_length=64)


def test_tokenises_to_nothing(tmp_path):
    class Deaf:
        def __call__(self, text):
            return {"input_ids": [1] + [3] * len(text.split(" ")[0])}

    with pytest.raises(RequestError, match="tokenises to nothing"):
        read_requests(_write(tmp_path, [NORMAL]), tokenizer=Deaf())


def test_bad_files(tmp_path):
    with pytest.raises(RequestError, match="no such file"):
        read_requests(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(RequestError, match="bad.json: not valid JSON"):
        read_requests(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "target_new": "b"}\n{oops\n')
    with pytest.raises(RequestError, match="bad.jsonl, line 2: not valid JSON"):
        read_requests(tmp_path / "bad.jsonl")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(RequestError, match="record 0: expected an object"):
        read_requests(tmp_path / "list.json")
    with pytest.raises(RequestError, match="--format"):
        read_requests(tmp_path / "list.json", fmt="csv")


@pytest.mark.skipif(not (SHARED / "data" / "counterfact").exists(), reason="../shared/data/counterfact not present")
def test_real_counterfact_file():
    reqs = read_requests(SHARED / "data" / "counterfact" / "counterfact-edit-8k.json")
    assert len(reqs) == 8000
    assert reqs[0].prompt == "The mother tongue of Danielle Darrieux is" and reqs[0].target_new == "English"
    assert all(r.rephrase_prompts and r.locality for r in reqs)

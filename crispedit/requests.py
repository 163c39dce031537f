"""Edit requests: one normalised record, readers for the common formats.

Formats (detected from the first record's keys, or named with ``fmt``):

- ``counterfact`` (flattened, EasyEdit): ``case_id, prompt, target_new, subject, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``
- ``counterfact-nested`` (ROME/MEMIT): ``requested_rewrite{prompt with "{}", subject, target_new{str},
  target_true{str}}, paraphrase_prompts[], neighborhood_prompts[]`` (neighbours answer ``target_true``)
- ``zsre`` (MEND): ``src, alt, rephrase, loc, loc_ans, answers[], subject``
- ``wikibigedit``: ``update|prompt, ans|target_new, rephrase|rephrase_prompt, loc|locality_prompt, loc_ans``
- ``jsonl``: the normalised record itself, one per line

Files are a JSON array or JSON Lines. Any bad record is an error naming the file, the record and
the field, before anything is edited.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .options import FORMATS

# the fields each format reads, and fields of the public files that it knowingly ignores
FIELDS = {
    "counterfact": ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality_prompt",
                    "locality_ground_truth"),
    "counterfact-nested": ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"),
    "zsre": ("case_id", "src", "alt", "rephrase", "loc", "loc_ans", "answers", "subject"),
    "wikibigedit": ("case_id", "update", "prompt", "ans", "target_new", "subject", "ground_truth", "rephrase",
                    "rephrase_prompt", "loc", "locality_prompt", "loc_ans"),
    "jsonl": ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompts", "locality"),
}
IGNORED = {
    "counterfact": (),
    "counterfact-nested": ("pararel_idx", "attribute_prompts", "generation_prompts"),
    "zsre": ("pred", "cond"),
    "wikibigedit": ("tag", "date", "personas", "mhop", "mhop_ans"),
    "jsonl": (),
}


class RequestError(ValueError):
    """A request file or record that cannot be used."""


@dataclass
class EditRequest:
    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer)
    case_id: str | int | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["locality"] = [{"prompt": p, "answer": a} for p, a in self.locality]
        return d

    def identity(self) -> str:
        """What makes two requests the same edit: SHA-256 (16 hex digits) of the prompt, the target
        and the subject with their whitespace normalised. Scoring fields (rephrases, locality, the
        true answer, the case id) are not part of it."""
        key = json.dumps([normalised(self.prompt), normalised(self.target_new), normalised(self.subject or "")])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def normalised(text: str) -> str:
    """``text`` with runs of whitespace made one space and the ends stripped."""
    return " ".join(text.split())


def edit_text(prompt: str, target: str) -> str:
    """``prompt + " " + target`` (a leading space is added to the target if it has none)."""
    return prompt + (target if target.startswith(" ") else " " + target)


def _load_records(path: Path, option: str = "--requests") -> list:
    if not path.exists():
        raise RequestError(f"{option} {path}: no such file")
    if path.is_dir():
        raise RequestError(f"{option} {path}: is a directory; give a request file (JSON or JSON Lines)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{option} {path}: not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{option} {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RequestError(f"{option} {path}, line {n}: not valid JSON ({e.msg})") from None
    if not records:
        raise RequestError(f"{option} {path}: no records")
    return records


def detect_format(record: dict) -> str:
    if "requested_rewrite" in record:
        return "counterfact-nested"
    if "src" in record and "alt" in record:
        return "zsre"
    if "update" in record or "ans" in record:
        return "wikibigedit"
    if "rephrase_prompts" in record or isinstance(record.get("locality"), list):
        return "jsonl"
    if "prompt" in record and {"target_new", "rephrase_prompt", "locality_prompt", "ground_truth"} & set(record):
        return "counterfact"
    raise RequestError(f"unknown request format (keys: {', '.join(sorted(record))})")


def _listify(value) -> list:
    if value is None or value == "":
        return []
    return value if isinstance(value, list) else [value]


def _normalise(rec: dict, fmt: str) -> dict:
    """A format's record as the keyword arguments of ``EditRequest`` (values not yet checked)."""
    if fmt == "counterfact":
        loc = list(zip(_listify(rec.get("locality_prompt")), _listify(rec.get("locality_ground_truth"))))
        return dict(prompt=rec.get("prompt"), target_new=rec.get("target_new"), subject=rec.get("subject"),
                    ground_truth=rec.get("ground_truth"), rephrase_prompts=_listify(rec.get("rephrase_prompt")),
                    locality=loc, case_id=rec.get("case_id"))
    if fmt == "counterfact-nested":
        rw = rec.get("requested_rewrite") or {}
        true = (rw.get("target_true") or {}).get("str")
        return dict(prompt=rw.get("prompt"), target_new=(rw.get("target_new") or {}).get("str"),
                    subject=rw.get("subject"), ground_truth=true,
                    rephrase_prompts=_listify(rec.get("paraphrase_prompts")),
                    locality=[(p, true) for p in _listify(rec.get("neighborhood_prompts"))], case_id=rec.get("case_id"))
    if fmt == "zsre":
        answers = _listify(rec.get("answers"))
        return dict(prompt=rec.get("src"), target_new=rec.get("alt"), subject=rec.get("subject"),
                    ground_truth=answers[0] if answers else None, rephrase_prompts=_listify(rec.get("rephrase")),
                    locality=list(zip(_listify(rec.get("loc")), _listify(rec.get("loc_ans")))), case_id=rec.get("case_id"))
    if fmt == "wikibigedit":
        return dict(prompt=rec.get("update", rec.get("prompt")), target_new=rec.get("ans", rec.get("target_new")),
                    subject=rec.get("subject"), ground_truth=rec.get("ground_truth"),
                    rephrase_prompts=_listify(rec.get("rephrase", rec.get("rephrase_prompt"))),
                    locality=list(zip(_listify(rec.get("loc", rec.get("locality_prompt"))), _listify(rec.get("loc_ans")))),
                    case_id=rec.get("case_id"))
    loc = [(d.get("prompt"), d.get("answer")) if isinstance(d, dict) else tuple(d) for d in _listify(rec.get("locality"))]
    return dict(prompt=rec.get("prompt"), target_new=rec.get("target_new"), subject=rec.get("subject"),
                ground_truth=rec.get("ground_truth"), rephrase_prompts=_listify(rec.get("rephrase_prompts")),
                locality=loc, case_id=rec.get("case_id"))


def _check(kw: dict, where: str) -> EditRequest:
    def bad(field_: str, why: str):
        raise RequestError(f"{where}: field '{field_}': {why}")

    for f in ("prompt", "target_new"):
        if kw[f] is None:
            bad(f, "missing")
        if not isinstance(kw[f], str):
            bad(f, f"expected a string, got {type(kw[f]).__name__}")
        if not kw[f].strip():
            bad(f, "empty")
    for f in ("subject", "ground_truth"):
        if kw[f] is not None and not isinstance(kw[f], str):
            bad(f, f"expected a string, got {type(kw[f]).__name__}")
    if "{}" in kw["prompt"]:
        if not kw["subject"]:
            bad("prompt", "a '{}' template needs a subject")
        kw["prompt"] = kw["prompt"].replace("{}", kw["subject"])
    for i, p in enumerate(kw["rephrase_prompts"]):
        if not isinstance(p, str) or not p.strip():
            bad(f"rephrase_prompts[{i}]", "expected a non-empty string")
    loc = []
    for i, pair in enumerate(kw["locality"]):
        if len(pair) != 2 or not all(isinstance(x, str) and x.strip() for x in pair):
            bad(f"locality[{i}]", "expected a prompt and an answer, both non-empty strings")
        loc.append((pair[0], pair[1]))
    kw["locality"] = loc
    return EditRequest(**kw)


def read_requests(path: str | Path, fmt: str = "auto", tokenizer=None, max_length: int | None = None,
                  option: str = "--requests") -> list[EditRequest]:
    """Read and check every record of ``path``; with ``tokenizer``, also check the tokenisation."""
    path = Path(path)
    if fmt not in FORMATS:
        raise RequestError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    records = _load_records(path, option)
    if not isinstance(records, list) or not records:
        raise RequestError(f"{option} {path}: expected a non-empty list of records")
    out = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}" + (f" (case_id {rec['case_id']})" if isinstance(rec, dict) and "case_id" in rec else "")
        if not isinstance(rec, dict):
            raise RequestError(f"{where}: expected an object, got {type(rec).__name__}")
        if fmt == "auto":  # one format per file, from its first record
            try:
                fmt = detect_format(rec)
            except RequestError as e:
                raise RequestError(f"{where}: {e}") from None
        _check_fields(rec, fmt, where)
        req = _check(_normalise(rec, fmt), where)
        if tokenizer is not None:
            check_tokens(req, tokenizer, max_length, where)
        out.append(req)
    return out


def _check_fields(rec: dict, fmt: str, where: str) -> None:
    """A field the format does not read is a mistake when it looks like one it reads (a misspelling,
    or a field of another format): refuse it, naming the fields the format knows."""
    known = FIELDS[fmt]
    for key in rec:
        if key in known or key in IGNORED[fmt]:
            continue
        own = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        other = [f for f, names in FIELDS.items() if key in names]
        near = difflib.get_close_matches(key, [k for f in FIELDS.values() for k in f], n=1, cutoff=0.75)
        if own or other or near or fmt == "jsonl":
            hint = f" (did you mean {own[0]!r}?)" if own else f" (a field of the {other[0]} format)" if other else ""
            raise RequestError(f"{where}: field {key!r} is not read by the {fmt} format{hint}; "
                               f"it reads {', '.join(known)}")


def check_unique(requests: list[EditRequest], where: str) -> None:
    """Two requests with one case_id, or one prompt with two different targets, are contradictions."""
    ids: dict = {}
    targets: dict[str, tuple[str, object]] = {}
    for i, r in enumerate(requests):
        if r.case_id is not None:
            if r.case_id in ids:
                raise RequestError(f"{where}: records {ids[r.case_id]} and {i} share case_id {r.case_id!r}")
            ids[r.case_id] = i
        seen = targets.get(r.prompt)
        if seen is not None and seen[0] != r.target_new:
            raise RequestError(f"{where}: the prompt {r.prompt!r} asks for {seen[0]!r} (record {seen[1]}) and "
                               f"{r.target_new!r} (record {i})")
        targets.setdefault(r.prompt, (r.target_new, i))


def select(requests: list[EditRequest], case_ids=None, max_requests: int | None = None, where: str = "--requests") -> list[EditRequest]:
    """The requests with the given case ids (all of them must exist), then the first ``max_requests``."""
    if case_ids:
        wanted = [str(c) for c in case_ids]
        by_id = {str(r.case_id): r for r in requests}
        missing = [c for c in wanted if c not in by_id]
        if missing:
            raise RequestError(f"--case-ids: {', '.join(missing[:5])} not in {where}")
        requests = [by_id[c] for c in wanted]
    return requests[:max_requests] if max_requests else requests


def read_request_files(paths, fmt: str = "auto", tokenizer=None, max_length: int | None = None) -> list[list[EditRequest]]:
    """``read_requests`` of every file; case ids and prompts must not contradict across the files."""
    files = [read_requests(p, fmt, tokenizer, max_length) for p in paths]
    check_unique([r for f in files for r in f], ", ".join(map(str, paths)))
    return files


def check_subjects(paths, files: list[list[EditRequest]], method: str, keep: set[int] | None = None) -> None:
    """Closed-form editors read each request's key at the last token of its subject: every request
    (of those whose ``id`` is in ``keep``) needs a subject that occurs in its prompt."""
    for path, requests in zip(paths, files):
        for i, r in enumerate(requests):
            if keep is not None and id(r) not in keep:
                continue
            where = f"{path}: record {i}" + (f" (case_id {r.case_id})" if r.case_id is not None else "")
            if not r.subject or not r.subject.strip():
                raise RequestError(f"{where}: field 'subject': missing; --method {method} reads the key at the subject's last token")
            if r.subject not in r.prompt:
                raise RequestError(f"{where}: field 'subject': {r.subject!r} is not in the prompt {r.prompt!r} (--method {method})")


def check_tokens(req: EditRequest, tokenizer, max_length: int | None, where: str) -> None:
    """The target must add tokens after the prompt; the whole text must fit the model's context."""
    n_prompt = len(tokenizer(req.prompt)["input_ids"])
    n_full = len(tokenizer(edit_text(req.prompt, req.target_new))["input_ids"])
    if n_full <= n_prompt:
        raise RequestError(f"{where}: field 'target_new': {req.target_new!r} tokenises to nothing after the prompt")
    if max_length is not None and n_full > max_length:
        raise RequestError(f"{where}: field 'prompt': prompt and target take {n_full} tokens, over the model's context of {max_length}")


def write_jsonl(requests: list[EditRequest], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(r.to_json()) + "\n" for r in requests), encoding="utf-8")

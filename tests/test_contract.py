"""The bad-input contract of the command line, as one table (issue 10 §7, issue 8 §7, issue 12).

Each row is a command line run in-process on one tiny saved model, its exit status, a fragment of
the expected message and, for exit status 2, the promise that nothing was written or changed: every
file under the shared test world, the row's own directory and its working directory hashes the same
before and after. Every error is ONE line of stderr naming the option, file or record, never a
traceback. Rows whose check can be made without the weights run with ``load_model`` replaced by a
function that fails the test: they prove the check happens before the model loads. A new option
that breaks the contract breaks a row here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import crispedit.model
from crispedit.cli import main
from models import char_tokenizer, save_tiny_model, tiny_hf

TEXT = "the cat sat on the mat.\nit was a sunny day, and the dog ran.\n\nsome words here.\nmore words there, again.\n"
REQUESTS = [
    {"prompt": "the cat sat on the", "target_new": "rug", "subject": "cat", "ground_truth": "mat",
     "rephrase_prompts": ["a cat sat on the"], "locality": [{"prompt": "the dog ran to the", "answer": "park"}], "case_id": 0},
    {"prompt": "we ate some", "target_new": "bread", "subject": "we", "ground_truth": "soup",
     "rephrase_prompts": ["they ate some"], "locality": [{"prompt": "it was a sunny", "answer": "day"}], "case_id": 1},
]
MORE = [{"prompt": "the sky is", "target_new": "green", "subject": "sky", "case_id": 10}]


def _jsonl(path: Path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse rejects unknown options and choices itself, with status 2
        return e.code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny LLaMA (3 blocks, context 64) and everything the rows read: a second checkpoint of
    the same shapes, a tiny GPT-2, statistics, an edit (float32 and bfloat16), a ledger of two
    chunks, and one small file per kind of bad input."""
    W = tmp_path_factory.mktemp("world")
    save_tiny_model(W / "model")
    other = tiny_hf("llama", layers=3, dtype=torch.float32, seed=1, std=0.1)  # same shapes, other weights
    other.save_pretrained(W / "other")
    char_tokenizer().save_pretrained(W / "other")
    save_tiny_model(W / "gpt2", "gpt2")
    bloom = AutoConfig.for_model("bloom", hidden_size=16, n_layer=3, n_head=2, vocab_size=32)  # no default module
    AutoModelForCausalLM.from_config(bloom).save_pretrained(W / "bloom")
    char_tokenizer().save_pretrained(W / "bloom")
    (W / "corpus.txt").write_text(TEXT)
    _jsonl(W / "heldout.jsonl", [{"text": "a second corpus line."}, {"text": "and one more line of text."}])
    _jsonl(W / "requests.jsonl", REQUESTS)
    _jsonl(W / "more.jsonl", MORE)
    # bad request files, one fault each
    _jsonl(W / "dup.jsonl", [REQUESTS[0], {**REQUESTS[1], "case_id": 0}])
    _jsonl(W / "conflict.jsonl", [REQUESTS[0], {**REQUESTS[1], "prompt": REQUESTS[0]["prompt"]}])
    _jsonl(W / "rephrases.jsonl", [{**{k: v for k, v in REQUESTS[0].items() if k != "rephrase_prompts"}, "rephrases": ["x"]}])
    _jsonl(W / "locprompts.jsonl", [{**{k: v for k, v in REQUESTS[0].items() if k != "locality"}, "locality_prompts": ["x"]}])
    _jsonl(W / "locality-only.jsonl", [{"prompt": "the sky is", "target_new": "green", "ground_truth": "blue",
                                        "locality": [{"prompt": "the dog ran to the", "answer": "park"}]}])
    _jsonl(W / "nosubject.jsonl", [{k: v for k, v in r.items() if k != "subject"} for r in REQUESTS])
    _jsonl(W / "elsewhere.jsonl", [REQUESTS[0], {**REQUESTS[1], "subject": "dog"}])
    _jsonl(W / "badjson.jsonl", [REQUESTS[0], "{oops"])
    _jsonl(W / "emptytarget.jsonl", [REQUESTS[0], {**REQUESTS[1], "target_new": ""}])
    _jsonl(W / "long.jsonl", [REQUESTS[0], {**REQUESTS[1], "prompt": "x" * 100}])
    _jsonl(W / "template.jsonl", [{"prompt": "the {} sat on the", "target_new": "rug", "case_id": 3}])
    _jsonl(W / "unknown.jsonl", [{"foo": 1}])
    (W / "notobject.json").write_text("[1, 2]")
    _jsonl(W / "badcorpus.jsonl", [{"text": "fine"}, {"txt": "oops"}])
    (W / "emptycorpus.txt").write_text("\n\n")
    (W / "reqdir").mkdir()
    (W / "afile").write_text("a file")
    (W / "nonempty").mkdir()
    (W / "nonempty" / "user.txt").write_text("the user's")
    # config files
    (W / "gamma-high.toml").write_text('gamma = "high"\n')
    (W / "gamma-list.toml").write_text("gamma = [0.5]\n")
    (W / "gama.toml").write_text("gama = 0.5\n")
    (W / "broken.toml").write_text("gamma = = 1\n")
    (W / "single.toml").write_text(f'model = "{W / "model"}"\ncorpus = "{W / "corpus.txt"}"\nlayers = "1"\n')
    # statistics, an edit in float32 and in bfloat16, a ledger of two chunks
    curvature = ["curvature", "--no-progress", "--threads", "1", "--layers", "1", "--labels", "empirical"]
    for name, model, corpus in (("curv", "model", "corpus.txt"), ("curv-heldout", "model", "heldout.jsonl"),
                                ("curv-other", "other", "corpus.txt")):
        assert main([*curvature, "--model", str(W / model), "--corpus", str(W / corpus), "--out", str(W / name)]) == 0
    assert main([*curvature[:5], "0,1", *curvature[6:], "--model", str(W / "model"), "--corpus", str(W / "corpus.txt"),
                 "--out", str(W / "curv-two")]) == 0  # layers 0 and 1
    shutil.copytree(W / "curv", W / "curv-copy")
    edit = ["edit", "--no-progress", "--threads", "1", "--model", str(W / "model"), "--requests", str(W / "requests.jsonl"),
            "--curvature", str(W / "curv"), "--epochs", "1", "--lr", "1e-2", "--no-evaluate"]
    assert main([*edit, "--out", str(W / "edit")]) == 0
    assert main([*edit, "--dtype", "bfloat16", "--allow-other-checkpoint", "--out", str(W / "edit16")]) == 0  # see the fp16 row
    assert main([*edit, "--gamma", "0.8", "--chunk-size", "1", "--ledger", str(W / "ledger")]) == 0
    # issue 18 §5: an apply-delta output; configurations of another width and of a negative one; no tokenizer
    assert main(["apply-delta", "--no-progress", "--model", str(W / "model"), "--delta", str(W / "edit"),
                 "--out", str(W / "applied")]) == 0
    tiny_hf("llama", layers=3, dtype=torch.float32, hidden_size=32).config.save_pretrained(W / "wide")
    tiny_hf("llama", layers=3, dtype=torch.float32, std=0.1).save_pretrained(W / "notok")
    (W / "negative").mkdir()
    config = json.loads((W / "model" / "config.json").read_text())
    (W / "negative" / "config.json").write_text(json.dumps({**config, "hidden_size": -16}))
    (W / "budget-inf.toml").write_text("budget = inf\n")
    return W


# ---------------------------------------------------------------------------------------------
# checks after a successful row


def _modes_are_normal(out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for p in [out, *out.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _finite_edit(W: Path, T: Path) -> None:
    out = T / "out"
    for name, t in [*_weights(out).items(), *load_file(str(out / "delta.safetensors")).items()]:
        assert torch.isfinite(t).all(), name
    assert _weights(out)["model.layers.1.mlp.down_proj.weight"].dtype == torch.float16
    _modes_are_normal(out)


def _reverted_to_base(W: Path, T: Path) -> None:
    got, base = _weights(T / "out"), _weights(W / "model")
    assert all(torch.equal(got[k], base[k].to(torch.bfloat16)) for k in base)  # the bf16 base, bit for bit
    _modes_are_normal(T / "out")


def _applied_edit16(W: Path, T: Path) -> None:
    got, edited = _weights(T / "out"), _weights(W / "edit16")
    assert all(torch.equal(got[k], edited[k]) for k in edited)


def _user_files_kept(W: Path, T: Path) -> None:
    assert (T / "notes.txt").read_text() == "my notes" and (T / "data" / "keep.json").read_text() == "{}"
    assert torch.equal(_weights(T)["model.layers.1.mlp.down_proj.weight"], _weights(W / "edit")["model.layers.1.mlp.down_proj.weight"])
    listed = json.loads((T / "manifest.json").read_text())["files"]
    assert "notes.txt" not in listed and "data" not in listed


def _has(*names: str):
    def check(W: Path, T: Path) -> None:
        for name in names:
            assert (T / name).exists(), name
    return check


# ---------------------------------------------------------------------------------------------
# setups: files a row needs in its own directory T


def _cwd_with_user_files(W: Path, T: Path) -> None:
    (T / "notes.txt").write_text("my notes")
    (T / "data").mkdir()
    (T / "data" / "keep.json").write_text("{}")


def _cwd_with_user_config(W: Path, T: Path) -> None:
    _cwd_with_user_files(W, T)
    (T / "config.json").write_text('{"my": "own project settings"}')


def _locked(W: Path, T: Path) -> None:
    (T / "locked").mkdir(mode=0o500)


def _ledger_copy(W: Path, T: Path) -> Path:
    shutil.copytree(W / "ledger", T / "L")
    return T / "L"


def _truncated_ledger(W: Path, T: Path) -> None:
    path = _ledger_copy(W, T) / "ledger.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _ledger_without_state(W: Path, T: Path) -> None:
    L = _ledger_copy(W, T)
    (L / json.loads((L / "ledger.json").read_text())["current"]["state"]).unlink()


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class Row:
    argv: str  # {W}: the shared world, {T}: this row's own directory
    code: int
    message: str | tuple[str, ...]  # fragments of the error line (exit 2) or of the output (exit 0)
    loads: bool = False  # the check needs the weights (all other exit-2 rows run with load_model failing)
    absent: tuple[str, ...] = ()  # fragments that must not appear in the output
    setup: object = None  # (W, T) -> None
    check: object = None  # (W, T) -> None, after exit status 0
    cwd: bool = False  # run in T
    skip: str | None = None


EDIT = "edit --no-progress --model {W}/model --requests {W}/requests.jsonl --curvature {W}/curv --out {T}/out"
RUN = "--epochs 1 --lr 1e-2 --threads 1"
EVAL = "evaluate --no-progress --model {W}/edit --base {W}/model --requests {W}/requests.jsonl"
CURV = "curvature --no-progress --model {W}/model --corpus {W}/corpus.txt --layers 1"
APPLY = "apply-delta --no-progress --model {W}/model --delta {W}/edit"
REVERT = "revert --no-progress --model {W}/edit --delta {W}/edit"
RESUME = "edit --no-progress --resume {W}/ledger --requests {W}/more.jsonl"
NO_CUDA = "CUDA is available here" if torch.cuda.is_available() else None
ROOT = "root writes into a 0500 directory: os.access and the kernel both allow it" if os.geteuid() == 0 else None

ROWS = {
    # §1 outputs: the user's files, the inputs, precision, permissions
    "apply-delta --out . keeps the user's files": Row(
        APPLY + " --out . --overwrite", 0, "reproduced bit for bit", setup=_cwd_with_user_files, cwd=True, check=_user_files_kept),
    "apply-delta --out . never replaces a user's file of a name it writes": Row(
        APPLY + " --out . --overwrite", 2, ("config.json", "not written by crispedit"), loads=True, setup=_cwd_with_user_config, cwd=True),
    "edit --out is --model": Row(EDIT.replace("{T}/out", "{W}/model"), 2, "is --model"),
    "edit --out inside --model": Row(EDIT.replace("{T}/out", "{W}/model/sub"), 2, "lies inside --model"),
    "edit --out contains --model": Row(EDIT.replace("{T}/out", "{W}"), 2, "contains --model"),
    "apply-delta --out is --model": Row(APPLY + " --out {W}/model", 2, "is --model"),
    "apply-delta --out inside --model": Row(APPLY + " --out {W}/model/sub", 2, "lies inside --model"),
    "apply-delta --out contains --model": Row(APPLY + " --out {W}", 2, "contains --model"),
    "revert --out is --model": Row(REVERT + " --out {W}/edit", 2, "is --model"),
    "revert --out inside --model": Row(REVERT + " --out {W}/edit/sub", 2, "lies inside --model"),
    "revert --out contains --model": Row(REVERT + " --out {W}", 2, "contains --model"),
    # statistics taken at float32 weights: their fingerprint is of float32 matrices, so a float16 or bfloat16
    # load of the same checkpoint needs --allow-other-checkpoint (curvature.check_fingerprint hashes the dtype too)
    "fp16 edit: finite weights, normal permissions": Row(
        EDIT + " --dtype float16 --allow-other-checkpoint --no-evaluate " + RUN, 0, "edited 2 requests", check=_finite_edit),
    "bf16 edit reverted without --dtype": Row(
        "revert --no-progress --model {W}/edit16 --delta {W}/edit16 --out {T}/out", 0, "reproduced bit for bit", check=_reverted_to_base),
    "bf16 edit applied without --dtype": Row(APPLY.replace("/edit", "/edit16") + " --out {T}/out", 0, "reproduced bit for bit",
                                             check=_applied_edit16),
    # §2 paths, devices, ranges, config types, architectures
    "--requests is a directory": Row(EDIT.replace("requests.jsonl", "reqdir"), 2, "--requests {W}/reqdir: is a directory"),
    "edit --out is a file": Row(EDIT.replace("{T}/out", "{W}/afile"), 2, "afile: is a file, not a directory"),
    "edit --out under a file": Row(EDIT.replace("{T}/out", "{W}/afile/out"), 2, "which is a file"),
    "edit --out not writable": Row(EDIT.replace("{T}/out", "{T}/locked/out"), 2, "is not writable", setup=_locked, skip=ROOT),
    "curvature --out is a file": Row(CURV + " --out {W}/afile", 2, "--out {W}/afile: is a file"),
    "apply-delta --out under a file": Row(APPLY + " --out {W}/afile/out", 2, "which is a file"),
    "evaluate --out is a directory": Row(EVAL + " --out {W}/reqdir", 2, "--out {W}/reqdir: is a directory"),
    "evaluate --out under a file": Row(EVAL + " --out {W}/afile/r.json", 2, "which is a file"),
    "--device cuda without CUDA": Row(EDIT + " --device cuda", 2, "--device cuda: this torch build has no CUDA", skip=NO_CUDA),
    "--device of no kind": Row(EDIT + " --device tpu", 2, "--device"),
    "--epochs 0": Row(EDIT + " --epochs 0", 2, "--epochs must be at least 1, got 0"),
    "--lr -1": Row(EDIT + " --lr -1", 2, "--lr must be positive, got -1.0"),
    "--prefix-count -1": Row(EDIT + " --method memit --prefix-count -1", 2, "--prefix-count must not be negative, got -1"),
    "--batch-size 0": Row(EDIT + " --batch-size 0", 2, "--batch-size must be at least 1, got 0"),
    "--threads 0": Row(EDIT + " --threads 0", 2, "--threads must be at least 1, got 0"),
    "config: gamma = \"high\"": Row(EDIT + " --config {W}/gamma-high.toml", 2, "gamma must be a number, got 'high'"),
    "config: a list for a single value": Row(EDIT + " --config {W}/gamma-list.toml", 2, "gamma takes one value"),
    "evaluate --base of another architecture": Row(EVAL.replace("{W}/model", "{W}/gpt2"), 2,
                                                   "--base {W}/gpt2: another architecture than --model {W}/edit (model_type gpt2 vs llama)"),
    # §3 requests, methods, statistics, context
    "duplicate case_ids": Row(EDIT.replace("requests.jsonl", "dup.jsonl"), 2, ("dup.jsonl", "share case_id 0")),
    "one prompt, two targets": Row(EDIT.replace("requests.jsonl", "conflict.jsonl"), 2, ("conflict.jsonl", "asks for 'rug' (record 0) and 'bread'")),
    "misspelt 'rephrases'": Row(EDIT.replace("requests.jsonl", "rephrases.jsonl"), 2,
                                ("record 0", "'rephrases' is not read by the jsonl format", "it reads case_id, prompt")),
    "misspelt 'locality_prompts'": Row(EDIT.replace("requests.jsonl", "locprompts.jsonl"), 2,
                                       ("'locality_prompts' is not read by the jsonl format", "it reads")),
    "--format that drops rephrases": Row(EDIT + " --format counterfact", 2,
                                         ("'rephrase_prompts' is not read by the counterfact format", "it reads case_id, prompt")),
    "--format that drops locality": Row(EDIT.replace("requests.jsonl", "locality-only.jsonl") + " --format counterfact", 2,
                                        ("'locality' is not read by the counterfact format", "it reads")),
    "--method ft --gamma 0.9": Row(EDIT + " --method ft --gamma 0.9", 2, "--gamma does not apply to --method ft"),
    "merge a file with itself": Row("merge-curvature --inputs {W}/curv {W}/curv --out {T}/out", 2, "--inputs {W}/curv: the same file is given twice"),
    "merge a file with a copy": Row("merge-curvature --inputs {W}/curv {W}/curv-copy --out {T}/out", 2,
                                    ("--inputs {W}/curv-copy", "the same corpus twice")),
    "merge two models": Row("merge-curvature --inputs {W}/curv-heldout {W}/curv-other --out {T}/out", 2,
                            ("--inputs {W}/curv-other", "two models")),
    "edit --max-length above the context": Row(EDIT + " --max-length 100", 2, "--max-length 100 is above the model's context of 64"),
    "curvature --max-length above the context": Row(CURV + " --max-length 100 --out {T}/out", 2, "--max-length 100 is above"),
    "curvature of another checkpoint": Row(EDIT.replace("/curv ", "/curv-other ") + " --no-evaluate", 2,
                                           ("--curvature {W}/curv-other: computed on other weights", "--allow-other-checkpoint"), loads=True),
    "... accepted with --allow-other-checkpoint": Row(EDIT.replace("/curv ", "/curv-other ") + " --allow-other-checkpoint --no-evaluate " + RUN,
                                                      0, "edited 2 requests", check=_has("out/delta.safetensors")),
    "config: a single string for a list option": Row("curvature --no-progress --config {W}/single.toml --out {T}/out", 0,
                                                     "labelled tokens", check=_has("out/curvature.safetensors")),
    # §5 what edit and evaluate say
    "edit prints documents, tokens and the known facts' answer": Row(
        EDIT.replace("--curvature {W}/curv", "--corpus {W}/corpus.txt --layers 1") + " --heldout {W}/heldout.jsonl --known-facts {W}/requests.jsonl " + RUN,
        0, ("(2 documents,", "tokens)", "held-out perplexity", "corpus KL", "known unedited facts", "record's ground_truth"), check=_has("out/report.json")),
    "evaluate prints documents, tokens and the known facts' answer": Row(
        EVAL + " --heldout {W}/heldout.jsonl --known-facts {W}/requests.jsonl", 0, ("(2 documents,", "tokens)", "record's ground_truth")),
    "a bad --base is named --base": Row(EVAL.replace("--base {W}/model", "--base ./no-such-base"), 2, "--base ./no-such-base: no such directory"),
    "a --base without config.json is named --base": Row(EVAL.replace("--base {W}/model", "--base {W}/reqdir"), 2, "--base {W}/reqdir: no config.json"),
    "--no-evaluate measures nothing": Row(EDIT + " --no-evaluate " + RUN, 0, "edited 2 requests",
                                          absent=("metric", "perplexity", "KL(base", "reliability", "known unedited")),
    # ledgers (issue 8 §7)
    "--resume with another checkpoint": Row(RESUME + " --model {W}/other", 2, ("ledger {W}/ledger", "another checkpoint"), loads=True),
    "--resume with another architecture": Row(RESUME + " --model {W}/gpt2", 2, ("ledger {W}/ledger", "gpt2")),
    "--resume with other layers": Row(RESUME + " --layers 2", 2, ("--layers", "the ledger {W}/ledger already holds")),
    "--resume a truncated ledger.json": Row(RESUME.replace("{W}/ledger", "{T}/L"), 2, ("ledger {T}/L", "ledger.json is unreadable"),
                                           setup=_truncated_ledger),
    "log a truncated ledger.json": Row("log {T}/L", 2, "ledger.json is unreadable", setup=_truncated_ledger),
    "revert a truncated ledger.json": Row("revert {T}/L --to 1", 2, "ledger.json is unreadable", setup=_truncated_ledger),
    "--resume a ledger without its state file": Row(RESUME.replace("{W}/ledger", "{T}/L"), 2, ("ledger {T}/L", "state-00002-", "is missing"),
                                                    setup=_ledger_without_state),
    "revert a ledger without its state file": Row("revert {T}/L --to 1", 2, ("ledger {T}/L", "state-00002-", "is missing"),
                                                  setup=_ledger_without_state),
    "--resume --gamma contradicting the ledger": Row(RESUME + " --gamma 0.5", 2, "--gamma 0.5 contradicts the ledger's 0.8"),
    "--resume --method contradicting the ledger": Row(RESUME + " --method ft", 2, "--method ft contradicts the ledger's crispedit"),
    "--resume --dtype contradicting the ledger": Row(RESUME + " --dtype bfloat16", 2, "--dtype bfloat16 contradicts the ledger's float32"),
    "--chunk-size 0": Row(EDIT + " --chunk-size 0", 2, "--chunk-size must be at least 1, got 0"),
    "--budget 0": Row(EDIT + " --budget 0", 2, "--budget must be positive, got 0.0"),
    "--budget -1": Row(EDIT + " --budget -1", 2, "--budget must be positive, got -1.0"),
    "revert --to past the history": Row("revert {W}/ledger --to 5", 2, "--to 5: the ledger {W}/ledger has chunks 0..2"),
    "revert --to -1": Row("revert {W}/ledger --to -1", 2, "--to must be at least 0, got -1"),
    "--ledger an existing non-empty directory": Row(EDIT + " --ledger {W}/nonempty", 2, "--ledger {W}/nonempty: exists and is not empty; give a new"),
    "--ledger and --resume": Row(EDIT + " --ledger {T}/L2 --resume {W}/ledger", 2, "--ledger and --resume: give one"),
    # closed-form editors (issue 12)
    "memit: a request without a subject": Row(EDIT.replace("requests.jsonl", "nosubject.jsonl") + " --method memit", 2,
                                              ("nosubject.jsonl: record 0 (case_id 0)", "'subject'")),
    "memit: the subject is not in the prompt": Row(EDIT.replace("requests.jsonl", "elsewhere.jsonl") + " --method alphaedit", 2,
                                                   ("elsewhere.jsonl: record 1 (case_id 1)", "'dog' is not in the prompt")),
    "memit: --lr does not apply": Row(EDIT + " --method memit --lr 0.1", 2, "--lr does not apply to --method memit"),
    # what worked before: models, layers, corpora, gamma, outputs, configs, requests
    "unknown model path": Row(EDIT.replace("{W}/model", "./no-such-model"), 2, "--model ./no-such-model: no such directory"),
    "a model directory without config.json": Row(EDIT.replace("{W}/model", "{W}/reqdir"), 2, "--model {W}/reqdir: no config.json"),
    "unknown architecture": Row(CURV.replace("{W}/model", "{W}/bloom") + " --out {T}/out", 2,
                                ("unknown architecture 'bloom'", "--module", "mlp.dense_4h_to_h")),
    "unknown module": Row(EDIT + " --layers 1 --module mlp.gate", 2, ("--module mlp.gate", "candidates:", "mlp.gate_proj")),
    "layer out of range": Row(EDIT + " --layers 9", 2, "--layers: block 9 does not exist; the model has blocks 0..2"),
    "unreadable --layers": Row(EDIT + " --layers one", 2, "--layers: cannot read 'one'"),
    "statistics of other layers": Row(EDIT + " --layers 0", 2, "--curvature {W}/curv: no statistics for model.layers.0.mlp.down_proj"),
    "malformed corpus": Row(CURV.replace("corpus.txt", "badcorpus.jsonl") + " --out {T}/out", 2, "badcorpus.jsonl, line 2: field 'text' missing"),
    "empty corpus": Row(CURV.replace("corpus.txt", "emptycorpus.txt") + " --out {T}/out", 2, ("emptycorpus.txt", "no document with at least two tokens")),
    "exact labels over the limit": Row(CURV + " --labels exact --exact-limit 10 --out {T}/out", 2, "over the --exact-limit of 10"),
    "missing corpus": Row(CURV.replace("corpus.txt", "nowhere.txt") + " --out {T}/out", 2, "--corpus {W}/nowhere.txt: no such file"),
    "gamma 1.0": Row(EDIT + " --gamma 1.0", 2, "--gamma must lie in [0, 1), got 1.0"),
    "gamma -0.5": Row(EDIT + " --gamma -0.5", 2, "--gamma must lie in [0, 1), got -0.5"),
    "inspect gamma 1.5": Row("inspect --curvature {W}/curv --gamma 0.5 1.5", 2, "--gamma must lie in [0, 1), got 1.5"),
    "inspect a file that is not statistics": Row("inspect --curvature {W}/afile", 2, "--curvature {W}/afile"),
    "edit into a non-empty --out": Row(EDIT.replace("{T}/out", "{W}/nonempty"), 2, "--out {W}/nonempty: exists and is not empty; pass --overwrite"),
    "curvature over existing statistics": Row(CURV + " --out {W}/curv", 2, "exists; pass --overwrite"),
    "evaluate over an existing report": Row(EVAL + " --out {W}/afile", 2, "--out {W}/afile: exists; pass --overwrite"),
    "unknown config option": Row(EDIT + " --config {W}/gama.toml", 2, "unknown option 'gama'"),
    "missing config file": Row(EDIT + " --config {W}/nope.toml", 2, "--config {W}/nope.toml: no such file"),
    "unparsable config file": Row(EDIT + " --config {W}/broken.toml", 2, "--config {W}/broken.toml: cannot parse"),
    "malformed request JSON": Row(EDIT.replace("requests.jsonl", "badjson.jsonl"), 2, "badjson.jsonl, line 2: not valid JSON"),
    "empty target": Row(EDIT.replace("requests.jsonl", "emptytarget.jsonl"), 2, "emptytarget.jsonl: record 1 (case_id 1): field 'target_new': empty"),
    "a record that is not an object": Row(EDIT.replace("requests.jsonl", "notobject.json"), 2, "notobject.json: record 0: expected an object"),
    "an unknown request format": Row(EDIT.replace("requests.jsonl", "unknown.jsonl"), 2, "unknown.jsonl: record 0: unknown request format"),
    "a template without a subject": Row(EDIT.replace("requests.jsonl", "template.jsonl"), 2, "a '{{}}' template needs a subject"),
    "a request longer than the context": Row(EDIT.replace("requests.jsonl", "long.jsonl"), 2, ("long.jsonl: record 1", "over the model's context of 64")),
    "missing request file": Row(EDIT.replace("requests.jsonl", "nowhere.jsonl"), 2, "--requests {W}/nowhere.jsonl: no such file"),
    "--case-ids not in the file": Row(EDIT + " --case-ids 99", 2, "--case-ids: 99 not in"),
    "--known-facts malformed": Row(EDIT + " --known-facts {W}/badjson.jsonl", 2, "--known-facts {W}/badjson.jsonl, line 2"),
    "--heldout missing": Row(EDIT + " --heldout {W}/nowhere.txt", 2, "--heldout {W}/nowhere.txt: no such file"),
    "--requests not given": Row("edit --model {W}/model --curvature {W}/curv --out {T}/out", 2, "--requests is required"),
    "--out not given": Row(EDIT.replace(" --out {T}/out", ""), 2, "--out is required"),
    "no statistics and no corpus": Row(EDIT.replace(" --curvature {W}/curv", ""), 2, "give --curvature"),
    "--curvature missing": Row(EDIT.replace("{W}/curv", "{W}/nowhere"), 2, "--curvature {W}/nowhere: no such file"),
    "--curvature not statistics": Row(EDIT.replace("{W}/curv", "{W}/afile"), 2, "--curvature {W}/afile"),
    "unknown method": Row(EDIT + " --method rome", 2, "argument --method: invalid choice: 'rome'"),
    "unknown dtype": Row(EDIT + " --dtype int8", 2, "argument --dtype: invalid choice: 'int8'"),
    "unknown option": Row(EDIT + " --frobnicate 1", 2, "unrecognized arguments: --frobnicate"),
    "--edit-weight with ft": Row(EDIT + " --method ft --edit-weight 2", 2, "--edit-weight does not apply to --method ft"),
    "--mix-sample without mix": Row(EDIT + " --mix-sample 5", 2, "--mix-sample applies to --protect-edits mix only"),
    # sequential editing (issue 17)
    "--rehearse -1": Row(EDIT + " --rehearse -1", 2, "--rehearse must be 'all', 'none' or a whole number >= 0, got -1"),
    "--rehearse some": Row(EDIT + " --rehearse some", 2, "--rehearse must be 'all', 'none' or a whole number >= 0"),
    "--rehearse with memit": Row(EDIT + " --method memit --rehearse all", 2, "--rehearse does not apply to --method memit"),
    "--rehearse-order without --rehearse": Row(EDIT + " --rehearse-order oldest", 2, "--rehearse-order applies with --rehearse"),
    "--capability-share 1": Row(EDIT + " --capability-share 1", 2, "--capability-share must lie in [0, 1)"),
    "--capability-share -0.1": Row(EDIT + " --capability-share -0.1", 2, "--capability-share must lie in [0, 1)"),
    "--capability-share with ft": Row(EDIT + " --method ft --capability-share 0.5", 2, "--capability-share does not apply to --method ft"),
    "--warn-change 0": Row(EDIT + " --warn-change 0", 2, "--warn-change must be positive"),
    "--refresh-drift without a corpus": Row(EDIT + " --refresh-drift 0.25", 2, "--refresh-drift recomputes the statistics: give --corpus"),
    "apply a delta twice": Row(APPLY.replace("{W}/model", "{W}/edit") + " --out {T}/out", 2,
                               ("--model {W}/edit (with --delta {W}/edit)", "not the base weights"), loads=True),
    "--delta without a delta": Row(APPLY.replace("--delta {W}/edit", "--delta {W}/nonempty") + " --out {T}/out", 2,
                                   "--delta {W}/nonempty: no delta.safetensors"),
    "revert --to without a ledger": Row(REVERT + " --out {T}/out --to 1", 2, "--to takes a ledger"),
    "revert a ledger without --to": Row("revert {W}/ledger", 2, "--to is required with a ledger"),
    "revert a ledger with --out": Row("revert {W}/ledger --to 1 --out {T}/out", 2, "--out does not apply to a ledger"),
    "revert --delta without --out": Row(REVERT, 2, "--out is required"),
    "log a directory that is no ledger": Row("log {W}/nonempty", 2, "ledger {W}/nonempty: no ledger.json"),
    "merge a file that is not statistics": Row("merge-curvature --inputs {W}/curv {W}/afile --out {T}/out", 2,
                                               "--inputs {W}/afile: not a readable safetensors file"),
    "merge a missing file": Row("merge-curvature --inputs {W}/curv {W}/nowhere --out {T}/out", 2, "--inputs {W}/nowhere: no such file"),
    "evaluate without --base": Row(EVAL.replace("--base {W}/model", ""), 2, "--base is required"),
    # issue 18 §5: every output kind checked against --base; tracebacks and messages
    "evaluate --base of another width": Row(EVAL.replace("{W}/model", "{W}/wide"), 2,
                                            "--base {W}/wide: another architecture than --model {W}/edit (hidden_size 32 vs 16)"),
    "evaluate an apply-delta output against another base": Row(
        EVAL.replace("{W}/edit", "{W}/applied").replace("--base {W}/model", "--base {W}/other"), 2,
        ("--base {W}/other: its matrices are not the base this model was made from", "{W}/applied/manifest.json"), loads=True),
    "evaluate a ledger against another base": Row(
        EVAL.replace("{W}/edit", "{W}/ledger").replace("--base {W}/model", "--base {W}/other"), 2,
        ("--base {W}/other: its matrices are not the base this ledger was made from", "{W}/ledger/ledger.json"), loads=True),
    "evaluate a ledger's current model against its base": Row(EVAL.replace("{W}/edit", "{W}/ledger"), 0, ("reliability", "locality")),
    "plan of a negative hidden size": Row("plan --model {W}/negative", 2, "--model {W}/negative/config.json: hidden_size is -16"),
    "plan of a config.json with a negative hidden size": Row("plan --model {W}/negative/config.json", 2,
                                                             "--model {W}/negative/config.json: hidden_size is -16"),
    "edit of a negative hidden size": Row(EDIT.replace("{W}/model", "{W}/negative"), 2,
                                          "--model {W}/negative/config.json: hidden_size is -16; it must be a positive"),
    "plan --chunk-size 0": Row("plan --model {W}/model --chunk-size 0", 2, "--chunk-size must be at least 1, got 0"),
    "log without a ledger": Row("log", 2, "LEDGER is required: crispedit log LEDGER"),
    "log --ledger": Row("log --ledger {W}/ledger", 2, ("unrecognized arguments: --ledger", "positional: crispedit log LEDGER")),
    "revert --ledger": Row("revert --ledger {W}/ledger --to 1", 2, ("--ledger", "positional: crispedit revert LEDGER")),
    "--protect JSON of neither kind": Row(EDIT + " --protect {W}/unknown.jsonl", 2,
                                          ("--protect {W}/unknown.jsonl: neither a request file", "prompt with ground_truth")),
    "a model directory without tokenizer files": Row(EDIT.replace("{W}/model", "{W}/notok"), 2,
                                                     ("--model {W}/notok: no tokenizer there", "tokenizer.json")),
    "--budget inf": Row(EDIT + " --budget inf", 2, "--budget must be a finite number, got inf"),
    "--lr nan": Row(EDIT + " --lr nan", 2, "--lr must be a finite number, got nan"),
    "config: budget = inf": Row(EDIT + " --config {W}/budget-inf.toml", 2, "--budget must be a finite number, got inf"),
    "an argparse error is a short usage line and one error line": Row(
        EDIT + " --method rome", 2, ("--method: invalid choice: 'rome'", "`crispedit edit --help` lists the options")),
    # issue 9: found in review
    "evaluate --base of another checkpoint of the same shapes": Row(
        EVAL.replace("--base {W}/model", "--base {W}/other"), 2, "--base {W}/other: its matrices are not the base this edit",
        loads=True),
    "--curvature holding more layers than --layers edits": Row(
        EDIT.replace("{W}/curv ", "{W}/curv-two ") + " --layers 1 --no-evaluate " + RUN, 0, "editing model.layers.1.mlp.down_proj"),
}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under ``roots``: path -> SHA-256 of its bytes (or 'dir')."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _loaded(*args, **kwargs):
    raise AssertionError("loaded: this check must happen before the model loads")


@pytest.mark.parametrize("name", ROWS)
def test_contract(world, tmp_path, capsys, monkeypatch, name):
    row = ROWS[name]
    if row.skip:
        pytest.skip(row.skip)
    W, T = world, tmp_path
    if row.setup:
        row.setup(W, T)
    if row.cwd:
        monkeypatch.chdir(T)
    if row.code == 2 and not row.loads:
        monkeypatch.setattr(crispedit.model, "load_model", _loaded)
    capsys.readouterr()
    before = _snapshot(W, T)
    code = _run(row.argv.format(W=W, T=T).split())
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == row.code, err or out
    fragments = (row.message,) if isinstance(row.message, str) else row.message
    if code == 2:
        lines = err.strip().splitlines()
        errors = [line for line in lines if "error:" in line]
        assert len(errors) == 1 and lines[-1] == errors[0], err  # one line, the last one
        usage = [line for line in lines if line.startswith("usage:")]  # argparse's: one short line, not its whole usage
        assert len(usage) <= 1 and all(line.endswith(" [options]") for line in usage), err
        for f in fragments:
            assert f.format(W=W, T=T) in errors[0], errors[0]
        assert _snapshot(W, T) == before  # nothing written, nothing changed
        assert out == ""
    else:
        for f in fragments:
            assert f.format(W=W, T=T) in out + err
        for f in row.absent:
            assert f not in out + err, f
        row.check(W, T) if row.check else None

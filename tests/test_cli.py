"""The command line: curvature, inspect, merge-curvature, edit, apply-delta, revert, evaluate; config files (bad input: test_contract.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from crispedit.cli import main
from crispedit.curvature import load, merge
from dense import rel_err
from models import save_tiny_model

FLOAT32_MODEL_TOL = 1e-5
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
TEXT = "the cat sat on the mat.\nit was a sunny day, and the dog ran.\n\nsome words here.\nmore words there, again.\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(root / "model")
    (root / "a.txt").write_text(TEXT)
    (root / "b.jsonl").write_text('{"text": "a second corpus line."}\n{"text": "and one more line of text."}\n')
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_curvature_writes_a_loadable_file_with_metadata(tiny, tmp_path, capsys):
    code, out, _ = _run(capsys, "curvature", "--model", tiny / "model", "--corpus", tiny / "a.txt", tiny / "b.jsonl",
                        "--layers", "1,2", "--out", tmp_path / "c", "--no-progress", "--threads", "1")
    assert code == 0
    assert "model.layers.1.mlp.down_proj" in out and "labelled tokens" in out
    stats = load(tmp_path / "c")
    assert stats.names == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert stats.meta["options"]["layers"] == "1,2" and stats.meta["labels"] == "sampled"
    assert stats.meta["tokens"] == sum(len(line) for line in TEXT.splitlines() if line) + len("a second corpus line.") + len("and one more line of text.")
    assert stats.meta["version"] and len(stats.meta["corpus_fingerprint"]) == 64


def test_config_file_with_command_line_override(tiny, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{tiny / "model"}"\ncorpus = ["{tiny / "a.txt"}"]\nlayers = "0"\nlabels = "empirical"\nmax-documents = 2\n')
    code, _, _ = _run(capsys, "curvature", "--config", cfg, "--labels", "exact", "--out", tmp_path / "o", "--no-progress")
    assert code == 0
    meta = load(tmp_path / "o").meta
    assert meta["labels"] == "exact" and meta["documents"] == 2 and meta["options"]["layers"] == "0"
    yml = tmp_path / "c.yaml"
    yml.write_text(f"model: {tiny / 'model'}\ncorpus: [{tiny / 'a.txt'}]\nlayers: '0'\n")
    assert _run(capsys, "curvature", "--config", yml, "--out", tmp_path / "y", "--no-progress")[0] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("gama = 0.5\n")
    code, _, err = _run(capsys, "curvature", "--config", bad, "--out", tmp_path / "z")
    assert code == 2 and "unknown option 'gama'" in err


def test_merge_curvature_equals_one_run(tiny, tmp_path, capsys):
    common = ["--model", tiny / "model", "--layers", "2", "--labels", "empirical", "--accumulate", "float64", "--no-progress"]
    assert _run(capsys, "curvature", *common, "--corpus", tiny / "a.txt", "--out", tmp_path / "a")[0] == 0
    assert _run(capsys, "curvature", *common, "--corpus", tiny / "b.jsonl", "--out", tmp_path / "b")[0] == 0
    assert _run(capsys, "curvature", *common, "--corpus", tiny / "a.txt", tiny / "b.jsonl", "--out", tmp_path / "ab")[0] == 0
    assert _run(capsys, "merge-curvature", "--inputs", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m")[0] == 0
    whole, merged = load(tmp_path / "ab"), load(tmp_path / "m")
    n = whole.names[0]
    # a float32 model: other batch compositions change activations at float32 rounding
    assert rel_err(merged.A[n], whole.A[n]) < FLOAT32_MODEL_TOL
    assert rel_err(merged.G[n], whole.G[n]) < FLOAT32_MODEL_TOL
    assert merged.tokens == whole.tokens
    assert merge(load(tmp_path / "a"), load(tmp_path / "b")).meta["corpus_parts"] == merged.meta["corpus_parts"]


def test_inspect_reports_each_gamma(tiny, tmp_path, capsys):
    _run(capsys, "curvature", "--model", tiny / "model", "--corpus", tiny / "a.txt", "--layers", "0", "--out", tmp_path, "--no-progress")
    code, out, _ = _run(capsys, "inspect", "--curvature", tmp_path, "--gamma", "0", "0.9")
    rows = [line for line in out.splitlines() if line.startswith("model.layers.0")]
    assert code == 0 and len(rows) == 2
    assert rows[0].split()[2].startswith("0/")  # gamma 0 removes nothing
    assert float(rows[1].split()[3]) >= 0.9
    code, _, err = _run(capsys, "inspect", "--curvature", tmp_path, "--gamma", "1.5")
    assert code == 2 and "gamma must lie in [0, 1)" in err


def test_existing_output_is_not_overwritten(tiny, tmp_path, capsys):
    argv = ["curvature", "--model", tiny / "model", "--corpus", tiny / "a.txt", "--layers", "0", "--out", tmp_path, "--no-progress"]
    assert _run(capsys, *argv)[0] == 0
    before = (tmp_path / "curvature.safetensors").read_bytes()
    code, _, err = _run(capsys, *argv, "--labels", "empirical")
    assert code == 2 and "exists; pass --overwrite" in err
    assert (tmp_path / "curvature.safetensors").read_bytes() == before
    assert _run(capsys, *argv, "--labels", "empirical", "--overwrite")[0] == 0
    assert load(tmp_path).meta["labels"] == "empirical"


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").exists(), reason="../shared/models/stories260K not present")
def test_curvature_on_the_real_pretrained_model_and_wikitext(tmp_path, capsys):
    code, out, _ = _run(capsys, "curvature", "--model", SHARED / "models" / "stories260K", "--corpus",
                        SHARED / "data" / "wikitext-2" / "valid.txt", "--max-documents", "8", "--out", tmp_path, "--no-progress")
    assert code == 0
    stats = load(tmp_path)
    assert stats.names == [f"model.layers.{i}.mlp.down_proj" for i in range(5)]  # auto: all 5 blocks
    assert stats.shapes()[stats.names[0]] == (64, 172)
    assert json.dumps(stats.meta)


REQUESTS = [
    {"prompt": "the cat sat on the", "target_new": "mat", "rephrase_prompts": ["a cat sat on the"],
     "locality": [{"prompt": "the dog ran to the", "answer": "park"}], "case_id": 0},
    {"prompt": "we ate some", "target_new": "bread", "rephrase_prompts": ["they ate some"],
     "locality": [{"prompt": "it was a sunny", "answer": "day"}], "case_id": 1},
]


@pytest.fixture()
def requests_file(tmp_path):
    p = tmp_path / "requests.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return p


def test_edit_then_apply_delta_and_revert(tiny, tmp_path, requests_file, capsys):
    out = tmp_path / "edited"
    code, stdout, _ = _run(capsys, "edit", "--model", tiny / "model", "--requests", requests_file, "--corpus", tiny / "a.txt",
                           "--heldout", tiny / "b.jsonl", "--known-facts", requests_file, "--layers", "1,2", "--epochs", "3",
                           "--lr", "1e-2", "--out", out, "--no-progress")
    assert code == 0, stdout
    assert {"config.json", "model.safetensors", "delta.safetensors", "manifest.json", "report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["method"] == "crispedit" and manifest["steps"] == 3
    assert manifest["edited_requests"] == 2 and len(manifest["requests"][0]["sha256"]) == 64
    assert manifest["chunks"][0]["steps"] == 3 and manifest["chunks"][0]["requests"] == 2
    assert set(manifest["drift"]) == {"model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj", "total"}
    report = json.loads((out / "report.json").read_text())
    tags = {(m["metric"], m["protocol"], m["template"]) for m in report["after"]["metrics"]}
    assert ("reliability", "generation", "raw") in tags and ("locality_agreement", "teacher_forced", "raw") in tags
    assert "heldout_kl" in report["after"]["capability"] and "corpus_kl" in report["after"]["capability"]
    for when in ("before", "after"):  # each request's generated answers are kept, before and after
        row = report[when]["per_request"][0]
        assert isinstance(row["reliability/generated"][0], str) and len(row["locality/generated"]) == 1
    assert "reliability" in stdout and "K-FAC predicted" in stdout
    edited = AutoModelForCausalLM.from_pretrained(out)
    # apply the delta to the base: the edited weights, bit for bit; revert: the base again
    assert _run(capsys, "apply-delta", "--model", tiny / "model", "--delta", out, "--out", tmp_path / "applied")[0] == 0
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
    base = AutoModelForCausalLM.from_pretrained(tiny / "model")
    assert _run(capsys, "revert", "--model", out, "--delta", out, "--out", tmp_path / "reverted")[0] == 0
    reverted = AutoModelForCausalLM.from_pretrained(tmp_path / "reverted")
    for k, v in edited.state_dict().items():
        assert torch.equal(applied.state_dict()[k], v)
        assert torch.equal(reverted.state_dict()[k], base.state_dict()[k])
    code, _, err = _run(capsys, "apply-delta", "--model", out, "--delta", out, "--out", tmp_path / "twice")
    assert code == 2 and "not the base weights" in err and not (tmp_path / "twice").exists()
    # evaluate the saved edit against its base
    code, stdout, _ = _run(capsys, "evaluate", "--model", out, "--base", tiny / "model", "--requests", requests_file,
                           "--heldout", tiny / "b.jsonl", "--out", tmp_path / "eval.json")
    assert code == 0 and json.loads((tmp_path / "eval.json").read_text())["after"]["metrics"]


def test_chunked_edit_and_log_print_their_legends_once(tiny, tmp_path, requests_file, capsys):
    from crispedit.cli import CHUNK_LEGEND, DRIFT_LEGEND, LOG_LEGEND

    code, out, err = _run(capsys, "edit", "--model", tiny / "model", "--requests", requests_file, "--corpus", tiny / "a.txt",
                          "--layers", "1", "--epochs", "1", "--lr", "1e-2", "--chunk-size", "1", "--heldout", tiny / "b.jsonl",
                          "--ledger", tmp_path / "L", "--no-progress")
    assert code == 0, err
    assert err.count(CHUNK_LEGEND) == 1 and err.index(CHUNK_LEGEND) < err.index("chunk 1/2") < err.index("chunk 2/2")
    assert out.count(DRIFT_LEGEND) == 1 and out.index("outside") < out.index(DRIFT_LEGEND)
    code, out, _ = _run(capsys, "log", tmp_path / "L")
    assert code == 0 and out.count(LOG_LEGEND) == 1
    assert "->0.50 " in out  # the chunked default's capability-share floor, raising the corpus's share to 0.5
    for column in ("first", "rephr.", "known", "refr.", "budget"):  # every column the table heads, explained
        assert f"{column}: " in LOG_LEGEND, column
    for column in ("reliability", "first chunk", "known facts", "KL held-out", "refresh(es)", "budget"):
        assert f"{column}: " in CHUNK_LEGEND, column


def test_an_argparse_error_is_a_short_usage_and_one_line(capsys):
    for argv, prog in ((["edit", "--method", "rome"], "crispedit edit"), (["frobnicate"], "crispedit")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        lines = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(lines) == 2, lines
        assert lines[0] == f"usage: {prog} {'' if ' ' in prog else 'SUBCOMMAND '}[options]"
        assert lines[1].startswith(f"{prog}: error: ") and lines[1].endswith(f"(`{prog} --help` lists the options)")


def test_budget_help_gives_a_typical_value():
    from crispedit.cli import build_parser

    edit = next(a for a in build_parser()._actions if a.dest == "command").choices["edit"]
    assert "typical: 0.02" in edit.format_help().replace("\n", " ").replace("  ", " ")


def test_help_imports_nothing_heavy():
    """``crispedit --help`` is instant: the CLI module imports neither torch nor transformers."""
    import subprocess
    import sys

    code = ("import sys, crispedit.cli, crispedit; crispedit.cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

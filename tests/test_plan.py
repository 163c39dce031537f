"""``crispedit plan``: the tensors it counts are the tensors a session holds; auto layers; the CLI; and the
slicing that bounds the vocabulary-sized arrays changes no result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crispedit.cli import main
from crispedit.curvature import KFACHooks, _sampled_batch, collect
from crispedit.evaluate import text_drift
from crispedit.layers import find_modules
from crispedit.options import MethodOptions
from crispedit.plan import REMOVED_FRACTIONS, plan
from crispedit.projector import projection_flops
from crispedit.requests import EditRequest
from models import char_tokenizer, tiny_hf

TOK = char_tokenizer()
REQUESTS = [EditRequest(p, t, case_id=i) for i, (p, t) in enumerate(
    [("the cat sat on the", "sea"), ("a dog ran to the", "cake"), ("birds fly over the", "road")])]
CORPUS = [TOK(t)["input_ids"] for t in ["the cat sat on the mat.", "a quick brown fox jumps.", "it was a lovely day."]]
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_plan_counts_the_tensors_a_session_holds(tmp_path, dtype):
    model = tiny_hf("llama", layers=3, dtype=DTYPES[dtype], std=0.1)
    model.config.save_pretrained(tmp_path)
    modules = find_modules(model, [1, 2])
    p = plan(str(tmp_path), layers="1,2", dtype=dtype, requests=len(REQUESTS))
    assert p["modules"] == {n: list(m.weight.shape) for n, m in modules.items()}
    assert p["memory"]["model_weights"] == nbytes(model.parameters()) + nbytes(model.buffers())

    stats = collect(model, modules, CORPUS, labels="sampled")
    from crispedit.session import EditSession

    session = EditSession.start(model, TOK, modules, MethodOptions(lr=1e-2, epochs=1, batch_size=2), stats)
    session.edit(REQUESTS)
    state = p["memory"]["state"]
    eig = [e for pair in session.cap_eig.values() for e in pair]
    assert state["eigenvectors"] == nbytes(e.vectors for e in eig)
    assert state["eigenvalues"] == nbytes(e.values for e in eig)
    # a batch edit: the projectors hold the capability eigenvectors themselves, not copies
    for n, P in session.projectors.items():
        assert P.A.vectors.data_ptr() == session.cap_eig[n][0].vectors.data_ptr()
        assert P.G.vectors.data_ptr() == session.cap_eig[n][1].vectors.data_ptr()
    assert state["projector_staircases"] == nbytes(P.counts for P in session.projectors.values())
    own = [w for n, w in session.state.masters.items() if w is not modules[n].weight]
    assert state["masters"] == nbytes(own) and (state["masters"] > 0) == (dtype == "bfloat16")
    moments = [s[k] for s in session.state.opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert state["adam_moments"] == nbytes(moments)
    assert state["base_copy"] == nbytes(session.base.values())
    hooks = KFACHooks(modules, torch.float32)
    assert p["memory"]["phases"]["statistics"]["moments"]["batch"]["parts"]["sums"] == nbytes(hooks.buffers.values())

    # the ledger: base.safetensors' sums, and the state file's parts
    base, _ = session.base_tensors()
    assert p["ledger"]["base"]["capability_sums"] == nbytes(v for k, v in base.items() if k.startswith("sums."))
    tensors, _ = session.state_tensors()
    part = lambda pick: nbytes(v for k, v in tensors.items() if pick(k))  # noqa: E731
    want = p["ledger"]["per_chunk_state"]
    assert want["delta"] == part(lambda k: k.startswith("delta."))
    assert want["edit_sums"] == part(lambda k: k.startswith("sums.edits."))
    assert want["masters"] == part(lambda k: k.endswith(".master"))
    assert want["adam_moments"] == part(lambda k: k.endswith((".exp_avg", ".exp_avg_sq")))
    assert sum(want.values()) == nbytes(tensors.values())  # nothing else in the state file


def test_auto_layers_of_a_llama3_8b_configuration_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    for where in (tmp_path, tmp_path / "config.json"):
        p = plan(str(where), dtype="bfloat16")
        assert list(p["modules"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(19, 24)]
        assert all(s == [4096, 14336] for s in p["modules"].values())
    assert p["parameters"] == 8_030_261_248  # LLaMA-3-8B
    state = p["memory"]["state"]
    W = 5 * 4096 * 14336
    assert state["masters"] == 4 * W and state["adam_moments"] == 8 * W and state["base_copy"] == 2 * W
    assert state["eigenvectors"] == 5 * 4 * (14336**2 + 4096**2)
    # the projection estimate: the measured fractions at gamma 0.8, the larger model's
    r_A = round(max(t[0.8][0] for t in REMOVED_FRACTIONS.values()) * 14336)
    f = projection_flops(4096, 14336, 4096, r_A)
    assert p["flops"]["projection"] == 5 * min(f["dense"], f["corner"])
    assert p["flops"]["forward_backward"] == 6 * 8_030_261_248 * 32 * 20
    assert p["flops"]["per_step"] == p["flops"]["forward_backward"] + p["flops"]["projection"]
    chunked = plan(str(tmp_path), dtype="bfloat16", chunk_size=100)["flops"]  # Adam's step projected too
    assert chunked["per_step"] == chunked["forward_backward"] + 2 * chunked["projection"]


# a ledger's JSON text is estimated (plan.LEDGER_JSON, ASSUMED["request_line_bytes"]): within this share or this many
# bytes of what was written, whichever is larger; tensor files are counted exactly; files the plan does not count
# (the writer's lock) must be under OTHER_BYTES each
JSON_TOLERANCE = (0.05, 1024)
OTHER_BYTES = 1024
LEDGER_REQUESTS = [{"prompt": p, "target_new": t, "subject": s, "ground_truth": g, "rephrase_prompts": [f"so {p}"],
                    "locality": [{"prompt": "the dog ran to the", "answer": "park"}], "case_id": i}
                   for i, (p, t, s, g) in enumerate([("the cat sat on the", "rug", "cat", "mat"),
                                                     ("we ate some", "bread", "we", "soup"),
                                                     ("the sky is", "green", "sky", "blue"),
                                                     ("a bird sat in the", "car", "bird", "tree")])]


def _ledger_kind(name: str) -> str:
    """What a ledger's file is, by its name (``plan.ledger_files``' kinds)."""
    for prefix, kind in (("base", "base"), ("eigh-", "eigendecompositions"), ("state-", "states"),
                         ("requests-", "requests"), ("delta.safetensors", "delta"), ("manifest.json", "manifest"),
                         ("ledger.json", "ledger_json")):
        if name.startswith(prefix):
            return kind
    return "other"


@pytest.mark.parametrize("dtype,layers,chunk", [("float32", "1", 2), ("bfloat16", "1,2", 1)])
def test_plan_counts_every_file_of_a_written_ledger(tmp_path, capsys, dtype, layers, chunk):
    """`edit --ledger` of 4 requests in chunks, then every file on disk against `plan`: exact for tensors."""
    from models import save_tiny_model

    save_tiny_model(tmp_path / "model", dtype=DTYPES[dtype])
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat.\nit was a sunny day, and the dog ran.\nsome words here.\n")
    (tmp_path / "heldout.txt").write_text("a second corpus line.\nand one more line of text.\n")
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LEDGER_REQUESTS))
    common = ["--no-progress", "--threads", "1", "--model", str(tmp_path / "model"), "--layers", layers]
    assert main(["curvature", *common, "--corpus", str(tmp_path / "corpus.txt"), "--labels", "empirical",
                 "--out", str(tmp_path / "curv")]) == 0
    assert main(["edit", *common, "--dtype", dtype, "--allow-other-checkpoint", "--requests", str(tmp_path / "requests.jsonl"),
                 "--curvature", str(tmp_path / "curv"), "--epochs", "1", "--lr", "1e-2", "--chunk-size", str(chunk),
                 "--heldout", str(tmp_path / "heldout.txt"), "--ledger", str(tmp_path / "L")]) == 0
    on_disk: dict[str, int] = {}
    for f in (tmp_path / "L").rglob("*"):
        if f.is_file():
            kind = _ledger_kind(f.name)
            assert kind != "other" or f.stat().st_size < OTHER_BYTES, f
            on_disk[kind] = on_disk.get(kind, 0) + f.stat().st_size
    on_disk.pop("other", None)
    line = sum(len(json.dumps({"chunk": 1, **r})) + 1 for r in LEDGER_REQUESTS) / len(LEDGER_REQUESTS)
    p = plan(str(tmp_path / "model"), layers=layers, dtype=dtype, requests=len(LEDGER_REQUESTS), chunk_size=chunk,
             assumed={"request_line_bytes": line})
    files = p["ledger"]["files_all_chunks"]
    assert p["ledger"]["chunks"] == len(LEDGER_REQUESTS) // chunk
    assert set(files) == set(on_disk)
    for kind in ("base", "eigendecompositions", "states", "delta"):
        assert files[kind] == on_disk[kind], kind
    share, floor = JSON_TOLERANCE
    for kind in ("requests", "manifest", "ledger_json"):
        assert abs(files[kind] - on_disk[kind]) <= max(share * on_disk[kind], floor), (kind, files[kind], on_disk[kind])
    assert abs(p["ledger"]["total_all_chunks"] - sum(on_disk.values())) <= max(share * sum(on_disk.values()), 3 * floor)


def test_plan_defaults_to_edit_dtype_and_counts_chunks(tmp_path, capsys):
    model = tiny_hf("llama", layers=3, dtype=torch.float32)
    model.config.save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--json", "--requests", "70", "--chunk-size", "30"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["dtype"] == "float32"  # as `edit --dtype`
    f = p["flops"]
    assert (f["chunks"], f["chunk_size"], f["steps_per_epoch"]) == (3, 30, 1)
    assert f["max_steps"] == 3 * 25 and f["statistics_per_chunk"] > 0
    # the check: chunk k runs every earlier edit (0, 30, 60 of them) from the first edited block on
    assert f["rehearsal_check_total"] == f["rehearsal_check_per_edit"] * (0 + 30 + 60)
    whole = 2 * 20 * (sum(q.numel() for q in model.parameters()) - model.get_input_embeddings().weight.numel())
    upper = plan(str(tmp_path), layers="2", requests=70, chunk_size=30)
    blocks_0_1 = 2 * 20 * sum(q.numel() for n, q in model.named_parameters() if ".layers.0." in n or ".layers.1." in n)
    assert upper["flops"]["rehearsal_check_per_edit"] == whole - blocks_0_1  # block 2, the norm and the head
    assert upper["memory"]["host"]["rehearsal_states"] == 70 * 20 * model.config.hidden_size * 4  # h_2 per edit, float32
    assert p["ledger"]["chunks"] == 3 and p["ledger"]["total_all_chunks"] > p["ledger"]["total_one_chunk"]
    one = plan(str(tmp_path), requests=70)
    assert one["flops"]["chunks"] == 1 and one["flops"]["steps_per_epoch"] == 3 and one["flops"]["statistics_per_chunk"] == 0


@pytest.mark.parametrize("command", ["plan", "inspect"])
def test_output_into_a_closed_pipe_is_no_traceback(tmp_path, command):
    """`crispedit plan ... | head -1`: the reader is gone before anything is written."""
    import subprocess
    import sys

    model = tiny_hf("llama", layers=3, dtype=torch.float32, std=0.1)
    model.config.save_pretrained(tmp_path)
    if command == "inspect":
        modules = find_modules(model, [1])
        from crispedit.curvature import save

        save(collect(model, modules, CORPUS, labels="sampled"), tmp_path / "curv")
    argv = ["plan", "--model", str(tmp_path)] if command == "plan" else ["inspect", "--json", "--curvature", str(tmp_path / "curv")]
    proc = subprocess.Popen([sys.executable, "-m", "crispedit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `head` does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_removed_fractions_are_the_measured_ones():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "projection.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    measured = json.loads(path.read_text())["fractions"]
    for name, table in REMOVED_FRACTIONS.items():
        for gamma, (fa, fg) in table.items():
            row = measured[name][str(gamma)]
            assert (fa, fg) == (row["r_A/d_in"], row["r_G/d_out"])


def test_cli_plan_prints_every_part(tmp_path, capsys):
    model = tiny_hf("llama", layers=3, dtype=torch.float32)
    model.config.save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("model weights", "eigenvectors", "masters", "adam moments", "base copy", "statistics", "edit step",
                 "evaluation", "flops per optimiser step", "projection (estimate", "base tensors",
                 "eigendecompositions", "state per chunk", "snapshot per chunk", "after one chunk"):
        assert word in out, word
    assert main(["plan", "--model", str(tmp_path), "--json", "--requests", "10", "--gamma", "0.5"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["requests"] == 10 and p["gamma"] == 0.5 and p["flops"]["steps_per_epoch"] == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["plan", "--model", str(tmp_path / "bad.json")]) == 2


def test_text_drift_in_slices_is_the_whole_batch():
    """Slicing the positions only reorders float64 sums of the same float32 numbers."""
    model = tiny_hf("llama", layers=2, dtype=torch.float32, std=0.1)
    modules = find_modules(model, [1])
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    with torch.no_grad():
        modules["model.layers.1.mlp.down_proj"].weight.add_(0.05)
    whole = text_drift(model, CORPUS, base_weights=base, batch_size=3, max_positions=10_000)
    for k in (1, 7):
        part = text_drift(model, CORPUS, base_weights=base, batch_size=3, max_positions=k)
        assert part["tokens"] == whole["tokens"]
        for key in ("perplexity", "perplexity_base", "kl"):
            assert part[key] == pytest.approx(whole[key], rel=1e-12)  # float64 sums in another order


@pytest.mark.parametrize("labels,k", [("sampled", 1), ("sampled", 3), ("empirical", 1)])
def test_statistics_in_slices_are_the_whole_batch_bit_for_bit(labels, k, monkeypatch):
    """Softmax, cumulative sum and the inverse-CDF draw are per position: the labels, the backward
    vectors and so the statistics do not depend on the slice."""
    import crispedit.curvature as curvature

    model = tiny_hf("llama", layers=3, dtype=torch.bfloat16, std=0.2)
    modules = find_modules(model, [0, 2])
    runs = []
    for positions in (10_000, 5, 1):
        monkeypatch.setattr(curvature, "_sampled_batch",
                            lambda *a, positions=positions: _sampled_batch(*a, slice_positions=positions))
        runs.append(collect(model, modules, CORPUS, labels=labels, mc_samples=k, seed=3, batch_size=2))
    for stats in runs[1:]:
        for n in modules:
            assert torch.equal(stats.A[n], runs[0].A[n]) and torch.equal(stats.G[n], runs[0].G[n])
    assert math.isfinite(float(runs[0].G["model.layers.0.mlp.down_proj"].sum()))

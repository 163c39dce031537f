"""The ledger a team can trust (issue 18): one writer at a time, a rerun that continues, one commit
point, checksummed state, restorable reverts, a ledger that works from anywhere, exit statuses."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crispedit import ledger
from crispedit.cli import EXIT_NOT_ALL_EDITED, main
from crispedit.curvature import collect
from crispedit.options import CHUNKED_GAMMA, MethodOptions
from crispedit.requests import EditRequest
from crispedit.saving import apply_delta, read_delta
from crispedit.session import EditSession, SessionError
from models import save_tiny_model
from test_session import CORPUS, REQUESTS, TOK, _model, _run

ROOT = Path(__file__).resolve().parents[1]
O = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=2, gamma=0.8)


def _weights(session):
    return {n: m.weight.detach().clone() for n, m in session.modules.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------------------------
# §1 one writer at a time


HOLDER = """
import sys, time
from crispedit.ledger import writer_lock
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold(directory: Path) -> subprocess.Popen:
    """A second real process that takes the ledger's lock and keeps it until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny saved model, its corpus and requests, and a ledger of two chunks made by the CLI."""
    W = tmp_path_factory.mktemp("ledger-world")
    save_tiny_model(W / "model")
    (W / "corpus.txt").write_text("the cat sat on the mat.\nit was a sunny day, and the dog ran.\nsome words here.\n")
    reqs = [{"prompt": r.prompt, "target_new": r.target_new, "case_id": r.case_id} for r in REQUESTS[:6]]
    (W / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    (W / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs[:4]))
    assert main(["curvature", "--no-progress", "--threads", "1", "--model", str(W / "model"), "--corpus",
                 str(W / "corpus.txt"), "--layers", "1", "--out", str(W / "curv")]) == 0
    return W


def _edit(W: Path, *args: str) -> list[str]:
    return ["edit", "--no-progress", "--threads", "1", "--model", str(W / "model"), "--curvature", str(W / "curv"),
            "--epochs", "2", "--lr", "1e-2", "--no-evaluate", "--chunk-size", "2", *args]


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(world, tmp_path, capsys):
    L = tmp_path / "L"
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(L))) == 0
    before = {p.name: p.read_bytes() for p in L.iterdir() if p.name != ledger.LOCK}
    holder = _hold(L)
    try:
        # a real second process: `crispedit edit --resume` while the first one writes
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        second = subprocess.run([sys.executable, "-m", "crispedit", "edit", "--no-progress", "--threads", "1", "--resume",
                                 str(L), "--requests", str(world / "requests.jsonl"), "--no-evaluate"],
                                capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"another process is writing it (pid {holder.pid}" in second.stderr.strip().splitlines()[-1]
        assert main(["revert", str(L), "--to", "1"]) == 2  # revert writes too
        assert "another process is writing it" in capsys.readouterr().err
        # readers never block
        assert main(["log", str(L)]) == 0
        read_delta(L)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert {p.name: p.read_bytes() for p in L.iterdir() if p.name != ledger.LOCK} == before  # nothing was written
    with ledger.writer_lock(L) as lock:  # the dead holder's lock is taken over, saying from whom
        assert lock.took_over and f"pid {holder.pid}" in lock.took_over
    with ledger.writer_lock(L) as lock:  # a clean release leaves nothing to take over
        assert lock.took_over is None


def test_a_filesystem_without_locks_is_refused_not_written_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ledger.LedgerError, match="does not support file locks"):
        with ledger.writer_lock(tmp_path / "L"):
            pass
    assert ledger.WriterLock._held == {}


def test_two_sessions_of_one_ledger_cannot_both_commit(tmp_path):
    _run(tmp_path, [REQUESTS[:2]], O, ledger_dir=tmp_path / "L")
    a_model, a_modules = _model()
    b_model, b_modules = _model()
    a = EditSession.load(tmp_path / "L", a_model, TOK, a_modules)
    b = EditSession.load(tmp_path / "L", b_model, TOK, b_modules)
    a.edit(REQUESTS[2:4])
    a.save(tmp_path / "L")
    b.edit(REQUESTS[4:6])
    with pytest.raises(ledger.LedgerError, match="changed by another writer"):
        b.save(tmp_path / "L")  # week 2 and week 3: the second is refused, not silently kept
    assert len(ledger.read(tmp_path / "L")["chunks"]) == 2
    fresh, fm = _model()
    other = EditSession.start(fresh, TOK, fm, O, collect(fresh, fm, CORPUS), CORPUS)
    with pytest.raises(ledger.LedgerError, match="holds another history"):
        other.save(tmp_path / "L")  # a new history into an existing ledger (it reused the other's base before)


def test_the_ledger_module_is_storage_only():
    tree = ast.parse((ROOT / "crispedit" / "ledger.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "session" not in imported and not any("session" in (m or "") for m in imported)


# ---------------------------------------------------------------------------------------------
# §2 a rerun continues where it stopped


def test_rerunning_the_command_that_crashed_finishes_the_job(world, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(_edit(world, "--requests", str(world / "requests.jsonl"), "--ledger", str(whole))) == 0
    L = tmp_path / "L"
    edit = EditSession.edit
    calls = []

    def crash_in_chunk_3(self, requests, *a, **k):
        calls.append(len(requests))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in chunk 3: chunks 1 and 2 are committed
        return edit(self, requests, *a, **k)

    monkeypatch.setattr(EditSession, "edit", crash_in_chunk_3)
    assert main(_edit(world, "--requests", str(world / "requests.jsonl"), "--ledger", str(L))) == 130
    monkeypatch.setattr(EditSession, "edit", edit)
    assert len(ledger.read(L)["chunks"]) == 2
    capsys.readouterr()
    assert main(_edit(world, "--requests", str(world / "requests.jsonl"), "--ledger", str(L))) == 0  # the same command
    err = capsys.readouterr().err
    assert "continuing it" in err and "skipping 4 requests already in the ledger; 2 to edit" in err
    a, b = ledger.read(whole), ledger.read(L)
    assert [c["requests"] for c in b["chunks"]] == [2, 2, 2]  # 6 edits for 6 distinct, not 8
    assert a["current"]["edited_weights_sha256"] == b["current"]["edited_weights_sha256"]  # the uninterrupted weights
    # --resume with requests already in the ledger: nothing is edited twice
    assert main(["edit", "--no-progress", "--resume", str(L), "--requests", str(world / "requests.jsonl")]) == 0
    assert "all requests are in the ledger" in capsys.readouterr().out
    assert len(ledger.read(L)["chunks"]) == 3


def test_an_update_of_an_edited_prompt_is_said(world, tmp_path, capsys):
    L = tmp_path / "L"
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(L))) == 0
    (tmp_path / "update.jsonl").write_text(json.dumps({"prompt": REQUESTS[0].prompt, "target_new": "moon"}) + "\n")
    capsys.readouterr()
    assert main(["edit", "--no-progress", "--resume", str(L), "--requests", str(tmp_path / "update.jsonl")]) == 0
    assert "1 requests update an earlier edit" in capsys.readouterr().err
    assert ledger.read(L)["chunks"][-1]["updates"] == 1
    assert main(["log", str(L)]) == 0
    assert "update" in capsys.readouterr().out


def test_request_identity_is_the_normalised_edit():
    a = EditRequest("the cat  sat on the", "rug", "cat", case_id=1, rephrase_prompts=["x"])
    assert a.identity() == EditRequest(" the cat sat on the ", "rug ", "cat", case_id=7).identity()
    assert a.identity() != EditRequest("the cat sat on the", "mat", "cat").identity()


# ---------------------------------------------------------------------------------------------
# §3 the commit point, checksums, exact resume


def test_a_flipped_byte_is_named_and_never_copied_into_the_current_state(tmp_path, capsys):
    _run(tmp_path, [REQUESTS[:4]], O, ledger_dir=tmp_path / "L")  # two chunks, a snapshot after each
    info = ledger.read(tmp_path / "L")
    snap = tmp_path / "L" / info["snapshots"]["1"]["state"]
    data = bytearray(snap.read_bytes())
    data[-5] ^= 0x01  # one bit of a tensor near the end (an Adam moment, say)
    snap.write_bytes(bytes(data))
    before = (tmp_path / "L" / ledger.LEDGER).read_bytes()
    with pytest.raises(ledger.LedgerError, match=f"{snap.name} does not match the SHA-256"):
        ledger.revert(tmp_path / "L", 1)
    assert (tmp_path / "L" / ledger.LEDGER).read_bytes() == before  # revert refused, nothing changed
    model, modules = _model()
    with pytest.raises(ledger.LedgerError, match=f"{snap.name} does not match"):
        EditSession.load(tmp_path / "L", model, TOK, modules, chunk=1)
    current = tmp_path / "L" / info["current"]["state"]
    current.write_bytes(current.read_bytes()[:-3])  # truncated
    with pytest.raises(ledger.LedgerError, match=f"ledger .*L: {current.name} does not match"):
        EditSession.load(tmp_path / "L", _model()[0], TOK, _model()[1])


def test_the_delta_files_never_describe_another_commit(tmp_path):
    session = _run(tmp_path, [REQUESTS[:2]], O, ledger_dir=tmp_path / "L", dtype=torch.float32)
    old = {f: (tmp_path / "L" / f).read_bytes() for f in ("delta.safetensors", "manifest.json")}
    session.edit(REQUESTS[2:4])
    session.save(tmp_path / "L")
    for f, b in old.items():  # a crash between the commit of ledger.json and the rename of the delta files
        (tmp_path / "L" / f).write_bytes(b)
    deltas, manifest = read_delta(tmp_path / "L")
    model, modules = _model(torch.float32)
    apply_delta(model, deltas, manifest, +1)
    assert _same({n: m.weight for n, m in modules.items()}, _weights(session))  # chunk 2, not chunk 1


def test_a_replayed_revert_commits_once(tmp_path, monkeypatch):
    o = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=2)
    model, modules = _model()
    session = EditSession.start(model, TOK, modules, o, collect(model, modules, CORPUS), CORPUS)
    session.save(tmp_path / "L", "tiny", snapshot_every=0)
    session.run([REQUESTS[:6]], 2, ledger_dir=str(tmp_path / "L"))
    commits = []
    save_text = ledger._save_text
    monkeypatch.setattr(ledger, "_save_text", lambda text, path: (commits.append(path.name), save_text(text, path))[1])
    session.revert(2)  # no snapshot: replayed
    assert commits.count(ledger.LEDGER) == 1
    info = ledger.read(tmp_path / "L")
    assert len(info["chunks"]) == 2 and info["reverted"][-1]["to"] == 2


def test_resume_is_bit_identical_after_a_refresh(tmp_path):
    o = MethodOptions(lr=5e-2, epochs=3, batch_size=2, chunk_size=2, gamma=0.5, refresh_drift=0.02, loss_threshold=0.0)
    whole = _run(tmp_path, [REQUESTS[:2], REQUESTS[2:4]], o)
    assert whole.history[0]["refreshes"], "the test needs a refresh in the first chunk"
    _run(tmp_path, [REQUESTS[:2]], o, ledger_dir=tmp_path / "L")
    resumed = _run(tmp_path, [REQUESTS[2:4]], o, resume=tmp_path / "L")
    assert _same(_weights(whole), _weights(resumed))
    for n in whole.modules:
        w, r = whole.state.masters[n], resumed.state.masters[n]
        assert torch.equal(whole.state.opt.state[w]["exp_avg"], resumed.state.opt.state[r]["exp_avg"])


def test_the_budgets_projection_count_survives_a_resume(tmp_path):
    o = MethodOptions(lr=5e-2, epochs=3, batch_size=2, chunk_size=2, method="ft", budget=1e-4, loss_threshold=0.0)
    first = _run(tmp_path, [REQUESTS[:2]], o, ledger_dir=tmp_path / "L")
    assert first.budget.projections > 0
    model, modules = _model()
    assert EditSession.load(tmp_path / "L", model, TOK, modules).budget.projections == first.budget.projections


def test_an_interrupted_start_is_started_again_and_named_on_resume(world, tmp_path, capsys):
    L = tmp_path / "L"
    L.mkdir()
    (L / "base-0123abcd.safetensors").write_bytes(b"half")  # killed before the first ledger.json
    assert main(["edit", "--no-progress", "--resume", str(L), "--requests", str(world / "first.jsonl")]) == 2
    assert "interrupted before its first commit" in capsys.readouterr().err
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(L))) == 0
    assert "starting it again" in capsys.readouterr().err
    assert not (L / "base-0123abcd.safetensors").exists() and len(ledger.read(L)["chunks"]) == 2


# ---------------------------------------------------------------------------------------------
# §4 from anywhere; what may change; restorable reverts


def test_a_ledger_made_with_a_relative_model_resumes_from_elsewhere(world, tmp_path, monkeypatch, capsys):
    shutil.copytree(world / "model", tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a held out line of text.\nanother one here.\n")
    args = _edit(world, "--requests", str(world / "first.jsonl"), "--ledger", "L", "--heldout", "heldout.txt")
    args[args.index("--model") + 1] = "models/tiny"
    args.remove("--no-evaluate")
    assert main(args) == 0
    info = ledger.read(tmp_path / "L")
    assert info["model"] == str(tmp_path / "models" / "tiny") and info["evaluation"]["heldout"] == [str(heldout)]
    monkeypatch.chdir(world)
    capsys.readouterr()
    assert main(["edit", "--no-progress", "--resume", str(tmp_path / "L"), "--requests", str(world / "requests.jsonl")]) == 0
    chunks = ledger.read(tmp_path / "L")["chunks"]
    assert chunks[-1]["metrics"]["heldout_kl"] is not None  # the held-out file remembered: the column stays filled
    assert main(["edit", "--no-progress", "--model", "./nowhere/model", "--requests", str(world / "first.jsonl"),
                 "--corpus", str(world / "corpus.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_lr_may_change_on_resume_gamma_may_not(world, tmp_path, capsys):
    L = tmp_path / "L"
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(L))) == 0
    more = ["edit", "--no-progress", "--resume", str(L), "--requests", str(world / "requests.jsonl")]
    assert main([*more, "--gamma", "0.5"]) == 2
    assert "may change on resume: --lr" in capsys.readouterr().err
    assert main([*more, "--budget", "0.1"]) == 2
    assert main([*more, "--lr", "2e-2"]) == 0
    info = ledger.read(L)
    assert [c["settings"]["lr"] for c in info["chunks"]] == [1e-2, 1e-2, 2e-2]


def test_a_revert_can_be_taken_back_unless_discarded(tmp_path):
    session = _run(tmp_path, [REQUESTS[:6]], O, ledger_dir=tmp_path / "L")  # three chunks
    after_three = _weights(session)
    info = ledger.revert(tmp_path / "L", 1)
    assert len(info["chunks"]) == 1 and ledger.restorable(info) == [2, 3]
    info = ledger.revert(tmp_path / "L", 3)  # forward again: nothing was lost
    assert len(info["chunks"]) == 3 and not info["reverted"]
    model, modules = _model()
    assert _same(_weights(EditSession.load(tmp_path / "L", model, TOK, modules)), after_three)
    ledger.revert(tmp_path / "L", 1, discard=True)
    with pytest.raises(ledger.LedgerError, match="no reverted chunk is kept"):
        ledger.revert(tmp_path / "L", 3)
    model, modules = _model()
    back = EditSession.load(tmp_path / "L", model, TOK, modules)
    with pytest.raises(SessionError, match="--to 3"):
        back.revert(3)


# ---------------------------------------------------------------------------------------------
# §5 exit statuses


def test_a_budget_that_stops_editing_exits_with_its_own_status(world, tmp_path, capsys):
    args = _edit(world, "--requests", str(world / "requests.jsonl"), "--ledger", str(tmp_path / "L"), "--method", "ft",
                 "--budget", "1e-9", "--loss-threshold", "0", "--lr", "5e-2")
    assert main(args) == EXIT_NOT_ALL_EDITED
    err = capsys.readouterr().err
    assert "requests were not edited" in err and f"exit status {EXIT_NOT_ALL_EDITED}" in err


def test_resume_with_rehearsal_is_bit_identical(tmp_path):
    o = MethodOptions(lr=1e-1, epochs=60, batch_size=4, chunk_size=2, gamma=0.3, rehearse="all", loss_threshold=1e-3)
    whole = _run(tmp_path, [REQUESTS[:4], REQUESTS[4:8]], o)
    assert whole.history[2]["rehearsal"]["rehearsed"] > 0, "the test needs a rehearsal after the resume"
    _run(tmp_path, [REQUESTS[:4]], o, ledger_dir=tmp_path / "L")
    resumed = _run(tmp_path, [REQUESTS[4:8]], o, resume=tmp_path / "L")
    assert _same(_weights(whole), _weights(resumed))
    assert [r.get("rehearsal") for r in resumed.history] == [r.get("rehearsal") for r in whole.history]


def test_a_format_1_ledger_is_read_and_continued(tmp_path):
    """A ledger written before checksums (format 1: base.safetensors, snapshot copies in snapshots/)
    loads, continues and reverts; what it continues with is written as format 2."""
    o = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=2)
    reference = _run(tmp_path, [REQUESTS[:6]], o)
    _run(tmp_path, [REQUESTS[:4]], o, ledger_dir=tmp_path / "L")
    L = tmp_path / "L"
    info = json.loads((L / "ledger.json").read_text())
    (L / info["base"]["file"]).rename(L / "base.safetensors")
    (L / "snapshots").mkdir()
    for entry in info["snapshots"].values():
        for key in ("state", "requests"):
            shutil.copyfile(L / entry[key], L / "snapshots" / entry[key])
            entry.pop(f"{key}_sha256")
    for key in ("state", "requests"):
        info["current"].pop(f"{key}_sha256")
    info.update(format="crispedit.ledger/1", base={"sources": info["base"]["sources"]})
    info.pop("commit")
    (L / "ledger.json").write_text(json.dumps(info))
    model, modules = _model()
    session = EditSession.load(L, model, TOK, modules)
    session.edit(REQUESTS[4:6])
    session.save(L)
    assert _same(_weights(session), _weights(reference))
    after = ledger.read(L)
    assert after["format"] == ledger.FORMAT and after["base"]["file"] == "base.safetensors"
    ledger.revert(L, 1)  # from a format-1 snapshot copy
    model, modules = _model()
    back = EditSession.load(L, model, TOK, modules)
    assert len(back.history) == 1


def test_a_reverted_branch_is_kept_only_while_it_can_be_restored(tmp_path):
    session = _run(tmp_path, [REQUESTS[:6]], O, ledger_dir=tmp_path / "L")  # three chunks, a snapshot each
    L = tmp_path / "L"
    third = ledger.read(L)["current"]["state"]
    session.revert(1)
    assert (L / third).exists() and ledger.restorable(ledger.read(L)) == [2, 3]
    session.edit(REQUESTS[6:8])  # the history moves on: chunks 2 and 3 can no longer come back
    session.save(L)
    info = ledger.read(L)
    assert not (L / third).exists() and ledger.restorable(info) == []
    assert [len(b["chunks"]) for b in info["reverted"]] == [2] and "head" not in info["reverted"][0]


def test_chunked_editing_rehearses_by_default_and_a_batch_does_not(world, tmp_path):
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(tmp_path / "L"))) == 0
    info = ledger.read(tmp_path / "L")
    assert info["options"]["rehearse"] == "all" and info["chunks"][1]["rehearsal"]["checked"] == 2
    assert info["options"]["capability_share"] == 0.5 and info["options"]["gamma"] == CHUNKED_GAMMA
    assert [c["settings"]["loss_threshold"] for c in info["chunks"]] == [0.2, 0.2]  # a chunk stops early
    assert info["options"]["optimizer"] == "adam-projected-step"
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(tmp_path / "M"),
                      "--rehearse", "none", "--gamma", "0.8", "--loss-threshold", "0.01")) == 0
    info = ledger.read(tmp_path / "M")
    assert info["options"]["rehearse"] == "none" and "rehearsal" not in info["chunks"][1]  # given: kept, no check
    assert info["options"]["gamma"] == 0.8 and info["chunks"][0]["settings"]["loss_threshold"] == 0.01
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(tmp_path / "F"),
                      "--method", "ft", "--capability-share", "0")) == 2  # ft protects nothing: no share to floor
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(tmp_path / "F"),
                      "--method", "ft")) == 0
    assert ledger.read(tmp_path / "F")["options"]["capability_share"] is None
    assert ledger.read(tmp_path / "F")["options"]["gamma"] is None  # ft projects nothing
    assert ledger.read(tmp_path / "F")["options"]["optimizer"] == "adam"
    assert main(_edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(tmp_path / "O"),
                      "--rehearse-order", "oldest")) == 0  # the order of the default rehearsal
    assert ledger.read(tmp_path / "O")["options"]["rehearse_order"] == "oldest"
    one_chunk = _edit(world, "--requests", str(world / "first.jsonl"), "--ledger", str(tmp_path / "N"))
    del one_chunk[one_chunk.index("--chunk-size") : one_chunk.index("--chunk-size") + 2]
    assert main(one_chunk) == 0  # a new ledger is a history to be continued: its later chunks rehearse
    assert ledger.read(tmp_path / "N")["options"]["rehearse"] == "all"
    batch = _edit(world, "--requests", str(world / "first.jsonl"), "--out", str(tmp_path / "out"))
    del batch[batch.index("--chunk-size") : batch.index("--chunk-size") + 2]
    assert main(batch) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["rehearse"] is None and manifest["options"]["gamma"] is None  # one batch: 0.8
    assert manifest["options"]["loss_threshold"] == 0.01 and manifest["options"]["optimizer"] == "adam"

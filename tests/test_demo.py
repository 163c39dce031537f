"""The shipped demo model and ``crispedit demo`` (offline, no ../shared needed)."""

from __future__ import annotations

import json

import pytest

from crispedit.cli import main
from crispedit.demo import MODEL_DIR, demo_requests
from crispedit.evaluate import exact_match, generate
from crispedit.model import load_model
from crispedit.world import RELATIONS, TRAINED_TEMPLATES, build_world


@pytest.fixture(scope="module")
def demo_model():
    return load_model(str(MODEL_DIR), "cpu", "float32")


def test_world_is_as_specified():
    world = build_world()
    assert len(world.people) >= 300 and len(RELATIONS) >= 5
    assert all(len(templates) >= 3 for templates, _ in RELATIONS.values())
    assert not set(world.train_documents) & set(world.heldout_narrative)
    assert all(" . " in d for d in world.train_documents)
    requests, known = demo_requests(300, 0)
    assert len({r.subject for r in requests}) == 300
    assert all(r.target_new != r.ground_truth for r in requests)
    assert all(r.rephrase_prompts[0] == world.fact(r.subject, rel).prompt(TRAINED_TEMPLATES)
               for r in requests for rel in RELATIONS if world.fact(r.subject, rel).prompt(0) == r.prompt)
    assert not {k.subject for k in known} & {r.subject for r in requests}


def test_shipped_model_knows_its_facts_by_greedy_generation(demo_model):
    model, tok = demo_model
    assert sum(p.numel() for p in model.parameters()) <= 2_500_000
    world = build_world()
    answers = generate(model, tok, [f.prompt(0) for f in world.facts])
    known = sum(exact_match(a, f.object) for a, f in zip(answers, world.facts)) / len(world.facts)
    assert known >= 0.95, f"the demo model knows only {known:.1%} of its facts"


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--edits", "60", "--out", str(tmp_path), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "crispedit 0.8" in out and "nullspace 0.8" in out and "ft " in out
    report = json.loads((tmp_path / "demo-report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"crispedit", "ft", "nullspace"}
    assert (tmp_path / "demo-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the claim the demo exists to show: at the default gamma CrispEdit moves the model far less than ft
    assert rows["crispedit"]["heldout_kl"] < rows["ft"]["heldout_kl"] / 2
    # a second run may replace the demo's own files, never anything else
    (tmp_path / "mine.txt").write_text("x")
    assert main(["demo", "--edits", "10", "--out", str(tmp_path)]) == 2



def test_demo_closed_forms_edit_early_blocks_and_share_the_targets(demo_model):
    """``--all-methods``: MEMIT and AlphaEdit edit the early blocks (CrispEdit's come from ``auto``),
    AlphaEdit with MEMIT's target values (the same computation, done once)."""
    from crispedit.curvature import collect
    from crispedit.demo import CLOSED_FORM_BLOCKS, _documents, run_method
    from crispedit.evaluate import prepare_reference
    from crispedit.layers import find_modules
    from crispedit.options import DemoOptions

    model, tok = demo_model
    world = build_world()
    requests, known = demo_requests(8, 0)
    early = find_modules(model, CLOSED_FORM_BLOCKS)
    stats = collect(model, early, _documents(tok, world.train_documents[:20]), labels="sampled", seed=0)
    docs = _documents(tok, world.heldout_narrative[:4])
    ref = prepare_reference(model, tok, requests, "raw", docs, docs, known[:20])
    o = DemoOptions(edits=8)
    memit, targets = run_method(model, tok, requests, early, stats, ref, "memit", None, o)
    alpha, same = run_method(model, tok, requests, early, stats, ref, "alphaedit", None, o, targets)
    assert memit["blocks"] == alpha["blocks"] == CLOSED_FORM_BLOCKS == [1, 2]
    assert same is targets and alpha["target_probability"] == memit["target_probability"] > 0
    assert alpha["seconds_targets"] < memit["seconds_targets"] / 3
    assert memit["reliability_teacher_forced"] > 0.3  # the early blocks and these settings do edit this model


def test_plot_shows_the_tables_columns_from_zero(tmp_path):
    """The plot on a result dict (no demo run): one panel per column of the table, every axis from zero, so that
    0.990 and 1.000 reliability look alike and locality, known facts and drift show what differs."""
    from crispedit.demo import PANELS, plot

    row = lambda method, gamma, rel, loc, known, kl, pred: dict(  # noqa: E731
        method=method, gamma=gamma, blocks=[3, 4], reliability=rel, locality_agreement=loc, known_facts_accuracy=known,
        heldout_kl=kl, predicted_kl=pred)
    rows = [row("crispedit", 0.8, 0.99, 0.647, 0.69, 0.042, 0.038), row("ft", 0.0, 1.0, 0.43, 0.5, 0.115, 0.113),
            row("nullspace", 0.8, 0.99, 0.657, 0.66, 0.053, 0.058), row("memit", None, 0.22, 0.58, None, 0.34, 0.24)]
    sweep = [row("crispedit", 0.99, 0.21, 0.973, 0.99, 0.023, 0.025)]
    limits = plot(rows, sweep, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(limits) == {key for key, _, _ in PANELS} == {"reliability", "locality_agreement", "known_facts_accuracy",
                                                            "heldout_kl"}
    assert all(lo == 0 for lo, _ in limits.values())
    assert all(limits[k][1] >= 1 for k in ("reliability", "locality_agreement", "known_facts_accuracy"))
    assert limits["heldout_kl"][1] > 0.34  # the largest drift is inside the axis

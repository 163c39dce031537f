"""The editing session: batch = the editor, chunks that protect earlier edits, refresh, budget, ledger."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from crispedit import ledger
from crispedit.budget import BudgetError, project_coordinates, shrink_factor
from crispedit.curvature import collect
from crispedit.editor import build_projectors, edit, eigenbases
from crispedit.layers import find_modules
from crispedit.options import MethodOptions
from crispedit.requests import EditRequest
from crispedit.session import EDITS, EditSession, SessionError, edit_documents, ledger_state_bytes
from models import char_tokenizer, tiny_hf

TOK = char_tokenizer()
WORDS = ["mat", "park", "sea", "bread", "cake", "tree", "road", "hill", "lake", "door", "rose", "king"]
PROMPTS = ["the cat sat on the", "a dog ran to the", "birds fly over the", "we ate some", "she baked a", "he climbed a",
           "they walked down the", "we ran up the", "fish swim in the", "he opened the", "she smelled a", "long live the"]
REQUESTS = [EditRequest(p, w, case_id=i) for i, (p, w) in enumerate(zip(PROMPTS, WORDS[3:] + WORDS[:3]))]
CORPUS = [TOK(t)["input_ids"] for t in ["the cat sat on the mat.", "a quick brown fox jumps.", "some words, here and there.",
                                        "it was a lovely day at the sea.", "the dog ran to the old park."]]
# float64 model: what must hold exactly holds to float64 rounding
EXACT_TOL = 1e-10
# statistics accumulate in float32: sums and divisions in another order agree to float32 rounding
FLOAT32_TOL = 1e-6


def _model(dtype=torch.float64, seed=0):
    model = tiny_hf("llama", layers=3, std=0.1, dtype=dtype, seed=seed)
    return model, find_modules(model, [1, 2])


def _session(options=None, dtype=torch.float64, protect=None, **kw):
    model, modules = _model(dtype)
    stats = collect(model, modules, CORPUS, labels="sampled", mc_samples=1)
    o = options or MethodOptions(**kw)
    return EditSession.start(model, TOK, modules, o, stats, CORPUS, protect), stats


def _weights(session):
    return {n: m.weight.detach().clone() for n, m in session.modules.items()}


def test_one_chunk_is_the_batch_editor():
    """The session's batch edit is the library's ``edit`` bit for bit (one pipeline)."""
    session, stats = _session(lr=1e-2, epochs=3, batch_size=4, gamma=0.8)
    session.edit(REQUESTS)
    model, modules = _model()
    P = build_projectors(eigenbases(collect(model, modules, CORPUS, labels="sampled")), "crispedit", 0.8, torch.float64)
    edit(model, TOK, REQUESTS, modules, P, lr=1e-2, epochs=3, batch_size=4)
    assert all(torch.equal(modules[n].weight, w) for n, w in _weights(session).items())


def test_a_chunk_joins_the_protected_statistics_with_its_prompt_unmasked():
    session, stats = _session(lr=1e-2, epochs=2, batch_size=4, chunk_size=4, edit_weight=3.0)
    session.edit(REQUESTS[:4])
    assert EDITS not in session.sources and session.pending  # taken lazily: a batch edit never pays for them
    session.flush_statistics()
    docs = edit_documents(TOK, REQUESTS[:4])
    direct = collect(session.model, session.modules, docs, labels="sampled")  # at the weights after the chunk
    n = next(iter(session.modules))
    sums = session.sources[EDITS]
    assert sums.tokens == sum(len(d) - 1 for d in docs)  # every position but the last: the prompt is not masked
    torch.testing.assert_close(sums.A[n], direct.A[n] * sums.tokens, rtol=EXACT_TOL, atol=0)
    # the protected factors: w-weighted union of capability and edits
    N_cap = stats.tokens[n]
    expected = (stats.A[n] * N_cap + 3.0 * direct.A[n] * sums.tokens) / (N_cap + 3.0 * sums.tokens)
    torch.testing.assert_close(session.protected_factors().A[n], expected, rtol=FLOAT32_TOL, atol=0)  # float32 sums


def test_later_chunks_use_the_new_subspace_and_adam_moment_is_reprojected():
    session, _ = _session(lr=1e-2, epochs=2, batch_size=4, gamma=0.8, edit_weight=20.0)
    session.edit(REQUESTS[:4])
    before = {n: P.mask.clone() for n, P in session.projectors.items()}
    session.rebuild()
    assert any(not torch.equal(before[n], P.mask) for n, P in session.projectors.items())
    for n, w in session.state.masters.items():
        m1 = session.state.opt.state[w]["exp_avg"]
        assert float((m1 - session.projectors[n].project(m1)).norm()) <= EXACT_TOL * float(m1.norm())
    # the earlier edit's own inputs are now protected: its gradient loses more to the projection than before
    assert session.history[0]["statistics_tokens"] > 0


def test_sequential_edits_keep_earlier_edits_better_than_unprotected():
    """Protecting earlier chunks (merge) keeps the first chunk's loss lower after later chunks than not (none)."""
    from crispedit.editor import _batch, edit_loss, tokenize_requests

    def first_chunk_loss(protect_edits):
        session, _ = _session(lr=3e-2, epochs=15, batch_size=4, gamma=0.5, edit_weight=50.0, protect_edits=protect_edits,
                              loss_threshold=0.0)
        session.edit_all(REQUESTS, chunk_size=4)
        ids, attn, labels = _batch(tokenize_requests(TOK, REQUESTS[:4]), 2, "cpu")
        with torch.no_grad():
            return float(edit_loss(session.model, ids, attn, labels))

    assert first_chunk_loss("merge") < first_chunk_loss("none")


def test_the_budget_is_never_exceeded_and_a_spent_budget_stops(monkeypatch):
    from crispedit.budget import CapabilityBudget

    eps = 2e-4
    seen = []
    project = CapabilityBudget.__call__

    def watched(self, masters, weights=None):  # the predicted drift after every optimiser step
        project(self, masters, weights)
        seen.append(self.predicted(masters))

    monkeypatch.setattr(CapabilityBudget, "__call__", watched)
    session, _ = _session(lr=3e-2, epochs=10, batch_size=4, method="ft", budget=eps, loss_threshold=0.0)
    record = session.edit(REQUESTS[:4])
    assert len(seen) == record["steps"] == 10 and max(seen) <= eps * (1 + 1e-9)
    assert record["drift"]["total"]["predicted_kl"] <= eps * (1 + 1e-9)
    assert record["budget"]["binding"] and record["budget"]["projections"] > 0
    assert record["budget"]["spent"]  # bound at the end with the loss not learnt (threshold 0)
    with pytest.raises(SessionError, match="budget .* is spent"):
        session.edit(REQUESTS[4:8])
    # the same edit without a budget predicts more drift
    free, _ = _session(lr=3e-2, epochs=10, batch_size=4, method="ft", loss_threshold=0.0)
    assert free.edit(REQUESTS[:4])["drift"]["total"]["predicted_kl"] > 2 * eps


def test_budget_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    C = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)]
    d = [torch.rand(3, 4, generator=g, dtype=torch.float64), torch.rand(2, 5, generator=g, dtype=torch.float64)]
    eps = 0.1
    P, mu = project_coordinates(C, d, eps)
    q = 0.5 * sum(float((dl * c * c).sum()) for dl, c in zip(d, P))
    assert q == pytest.approx(eps, rel=1e-10) and mu > 0
    # KKT: the residual C − P is μ ∇q(P) = μ d P, so P is the closest point of the ellipsoid
    for c, p, dl in zip(C, P, d):
        torch.testing.assert_close(c - p, mu * dl * p, rtol=1e-9, atol=1e-12)
    assert shrink_factor(P, d, 2 * eps) == 0.0  # inside: unchanged
    with pytest.raises(BudgetError, match="--budget must be positive"):
        shrink_factor(C, d, 0.0)


def test_refresh_recomputes_the_statistics_where_the_weights_are():
    session, _ = _session(lr=5e-2, epochs=6, batch_size=4, gamma=0.5, refresh_drift=0.02, loss_threshold=0.0)
    record = session.edit(REQUESTS[:4])
    assert record["refreshes"], "the matrices moved more than 2%: a refresh must have happened"
    assert all(e["drift"] > 0.02 for e in record["refreshes"])
    n = next(iter(session.modules))
    # after the last refresh the weights moved on; the statistics are those of the refresh point
    with torch.no_grad():
        saved = {k: m.weight.clone() for k, m in session.modules.items()}
        for k, m in session.modules.items():
            m.weight.copy_(session.stats_weights[k])
        at_refresh = collect(session.model, session.modules, CORPUS, labels="sampled")
        for k, m in session.modules.items():
            m.weight.copy_(saved[k])
    torch.testing.assert_close(session.sources["capability"].A[n], at_refresh.A[n] * at_refresh.tokens[n], rtol=1e-9, atol=0)
    # recomputed: G (the first edited matrix's own input statistics A cannot change: nothing before it is edited)
    assert not torch.allclose(session.sources["capability"].G[n], session.base_capability.G[n])
    assert session.drift_since_statistics() <= 0.02  # the last check found the statistics close enough


def test_mix_variant_recomputes_from_a_sample_of_edits():
    session, _ = _session(lr=1e-2, epochs=2, batch_size=4, protect_edits="mix", mix_sample=3)
    session.edit_all(REQUESTS[:8], chunk_size=4)
    assert EDITS not in session.sources  # nothing accumulated: recomputed before each chunk
    sources = session._mix_sources(1)
    assert sources[EDITS].tokens == sum(len(d) - 1 for d in edit_documents(TOK, REQUESTS[:3])) or sources[EDITS].tokens > 0
    again = session._mix_sources(1)
    assert again[EDITS].tokens == sources[EDITS].tokens  # seeded sample


def test_restore_base_and_options_that_contradict():
    session, _ = _session(lr=1e-2, epochs=2)
    base = {n: w.clone() for n, w in session.base.items()}
    session.edit(REQUESTS[:4])
    session.restore_base()
    assert all(torch.equal(m.weight, base[n]) for n, m in session.modules.items())
    model, modules = _model()
    with pytest.raises(SessionError, match="needs capability statistics"):
        EditSession.start(model, TOK, modules, MethodOptions(method="crispedit"))
    with pytest.raises(SessionError, match="--refresh-drift"):
        EditSession.start(model, TOK, modules, MethodOptions(method="ft", refresh_drift=0.1))


# ---------------------------------------------------------------------------------------------
# ledger


def _run(tmp_path, files, options, ledger_dir=None, resume=None, dtype=torch.float64):
    """Edit the request lists in ``files`` in order, chunk by chunk, optionally saving a ledger."""
    if resume is not None:
        model, modules = _model(dtype)
        session = EditSession.load(resume, model, TOK, modules)
    else:
        model, modules = _model(dtype)
        stats = collect(model, modules, CORPUS, labels="sampled")
        session = EditSession.start(model, TOK, modules, options, stats, CORPUS)
        if ledger_dir is not None:
            session.save(ledger_dir, "tiny")
    target = ledger_dir or resume
    for reqs in files:
        session.edit_all(reqs, options.chunk_size, on_chunk=(lambda s, r: s.save(target, "tiny")) if target else None)
    return session


@pytest.mark.parametrize("dtype, extra", [(torch.float64, {}), (torch.bfloat16, {}),
                                          (torch.float64, {"rehearse": "all"})])
def test_resume_is_bit_identical_to_one_run(tmp_path, dtype, extra):
    o = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=3, gamma=0.8, **extra)
    whole = _run(tmp_path, [REQUESTS[:5], REQUESTS[5:9]], o, dtype=dtype)
    _run(tmp_path, [REQUESTS[:5]], o, ledger_dir=tmp_path / "L", dtype=dtype)
    resumed = _run(tmp_path, [REQUESTS[5:9]], o, resume=tmp_path / "L", dtype=dtype)
    for n in whole.modules:
        assert torch.equal(whole.modules[n].weight, resumed.modules[n].weight)
        assert torch.equal(whole.state.masters[n], resumed.state.masters[n])
    assert len(resumed.history) == 4 and [r["requests"] for r in resumed.history] == [3, 2, 3, 1]
    info = ledger.read(tmp_path / "L")
    assert len(info["chunks"]) == 4 and info["current"]["edited_weights_sha256"]


def test_revert_restores_the_state_after_a_chunk_exactly(tmp_path):
    o = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=3)
    after_two = _run(tmp_path, [REQUESTS[:6]], o)  # two chunks
    _run(tmp_path, [REQUESTS[:9]], o, ledger_dir=tmp_path / "L")  # three
    info = ledger.revert(tmp_path / "L", 2)
    assert len(info["chunks"]) == 2 and info["reverted"][0]["to"] == 2 and len(info["reverted"][0]["chunks"]) == 1
    model, modules = _model()
    back = EditSession.load(tmp_path / "L", model, TOK, modules)
    assert all(torch.equal(back.modules[n].weight, after_two.modules[n].weight) for n in modules)
    # and continuing from there equals continuing the two-chunk run
    after_two.edit(REQUESTS[6:9])
    back.edit(REQUESTS[6:9])
    assert all(torch.equal(back.modules[n].weight, after_two.modules[n].weight) for n in modules)
    with pytest.raises(ledger.LedgerError, match="--to 7"):
        ledger.revert(tmp_path / "L", 7)


def test_a_ledger_is_a_delta_directory(tmp_path):
    from crispedit.saving import apply_delta, read_delta

    o = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=3)
    session = _run(tmp_path, [REQUESTS[:6]], o, ledger_dir=tmp_path / "L", dtype=torch.float32)
    deltas, manifest = read_delta(tmp_path / "L")
    model, modules = _model(torch.float32)
    apply_delta(model, deltas, manifest, +1)
    assert all(torch.equal(modules[n].weight, session.modules[n].weight) for n in modules)


def test_bad_ledgers(tmp_path):
    o = MethodOptions(lr=1e-2, epochs=1, batch_size=2, chunk_size=3)
    _run(tmp_path, [REQUESTS[:3]], o, ledger_dir=tmp_path / "L")
    model, _ = _model()
    with pytest.raises(ledger.LedgerError, match="this run edits"):
        EditSession.load(tmp_path / "L", model, TOK, find_modules(model, [0]))
    other, modules = _model(seed=3)
    with pytest.raises(ledger.LedgerError, match="neither the ledger's base"):
        EditSession.load(tmp_path / "L", other, TOK, modules)
    info = json.loads((tmp_path / "L" / "ledger.json").read_text())
    (tmp_path / "L" / "ledger.json").write_text(json.dumps({k: v for k, v in info.items() if k != "current"}))
    with pytest.raises(ledger.LedgerError, match="lacks 'current'"):
        ledger.read(tmp_path / "L")
    (tmp_path / "L" / "ledger.json").write_text("{not json")
    with pytest.raises(ledger.LedgerError, match="unreadable"):
        ledger.read(tmp_path / "L")
    with pytest.raises(ledger.LedgerError, match="no ledger.json"):
        ledger.read(tmp_path)


def test_a_crash_in_a_chunk_leaves_the_ledger_as_it_was(tmp_path, monkeypatch):
    o = MethodOptions(lr=1e-2, epochs=1, batch_size=2, chunk_size=3)
    _run(tmp_path, [REQUESTS[:3]], o, ledger_dir=tmp_path / "L")
    model, modules = _model()
    session = EditSession.load(tmp_path / "L", model, TOK, modules)  # (may add eigendecomposition cache files)
    before = {p.name: p.read_bytes() for p in (tmp_path / "L").iterdir() if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr("crispedit.session.run_epochs", boom)
    with pytest.raises(RuntimeError):
        session.edit_all(REQUESTS[3:6], 3, on_chunk=lambda s, r: s.save(tmp_path / "L"))
    after = {p.name: p.read_bytes() for p in (tmp_path / "L").iterdir() if p.is_file()}
    assert after == before


def test_method_options_round_trip_through_the_ledger(tmp_path):
    o = MethodOptions(lr=1e-2, epochs=1, batch_size=2, chunk_size=3, edit_weight=4.0, gamma=0.9)
    _run(tmp_path, [REQUESTS[:3]], o, ledger_dir=tmp_path / "L")
    assert ledger.options_of(ledger.read(tmp_path / "L")) == o
    assert dataclasses.asdict(o)["edit_weight"] == 4.0


def test_session_save_load_revert_and_run(tmp_path):
    """The session's own methods: run (chunks, per-chunk log and ledger), save/load, revert by snapshot
    and by replay give the states of one uninterrupted run."""
    o = MethodOptions(lr=1e-2, epochs=2, batch_size=2, chunk_size=2)
    reference = _run(tmp_path, [REQUESTS[:4]], o)  # two chunks, no ledger
    model, modules = _model()
    session = EditSession.start(model, TOK, modules, o, collect(model, modules, CORPUS, labels="sampled"), CORPUS)
    session.save(tmp_path / "L", "tiny", snapshot_every=2)  # snapshots after chunks 0 and 2
    seen = []
    session.run([REQUESTS[:4], REQUESTS[4:7]], 2, ["a", "b"], ledger_dir=str(tmp_path / "L"), model_id="tiny",
                log=lambda record, total: seen.append((record["chunk"], total, record["name"])))
    assert seen == [(1, 4, "a"), (2, 4, "a"), (3, 4, "b"), (4, 4, "b")]  # chunks never span two lists
    session.revert(3)  # no snapshot after chunk 3: replayed from the one after chunk 2
    replayed = {n: m.weight.detach().clone() for n, m in modules.items()}
    session.revert(2)  # from its snapshot
    assert all(torch.equal(m.weight, reference.modules[n].weight) for n, m in modules.items())
    assert len(session.history) == 2 and len(ledger.read(tmp_path / "L")["reverted"]) == 2
    session.edit(REQUESTS[4:6], "b")  # continue: chunk 3 again
    assert all(torch.equal(m.weight, replayed[n]) for n, m in modules.items())
    again, mods = _model()
    loaded = EditSession.load(tmp_path / "L", again, TOK)
    assert len(loaded.history) == 2 and all(torch.equal(mods[n].weight, reference.modules[n].weight) for n in mods)
    with pytest.raises(SessionError, match="--to 9"):
        loaded.revert(9)


def test_snapshot_size_is_counted_for_the_history_not_its_empty_start():
    """The automatic snapshot choice counts what a state will hold (ΔW, Adam moments, masters, the
    edits' sums), not the nearly empty state at the start: at LLaMA-3-8B's five 4096 × 14336
    matrices in bf16 (meta tensors: shapes only) that is 9.1 GB, far above the 256 MiB threshold."""
    import types

    from torch import nn

    session, _ = _session(lr=1e-2, epochs=1)
    counted = ledger_state_bytes(session)  # at the start, before anything of it exists
    session.edit(REQUESTS[:4])
    tensors, _ = session.state_tensors()
    # exactly the state file after a chunk: float64 model, so ΔW, W itself and Adam's moments in float64
    assert counted == sum(t.numel() * t.element_size() for t in tensors.values())
    big = {f"model.layers.{i}.mlp.down_proj": nn.Linear(14336, 4096, bias=False, device="meta", dtype=torch.bfloat16)
           for i in range(19, 24)}
    at_8b = types.SimpleNamespace(modules=big, state=object(), options=MethodOptions())
    w = 5 * 4096 * 14336
    assert ledger_state_bytes(at_8b) == w * 4 + 2 * 4 * w + 4 * w + 4 * 5 * (14336 ** 2 + 4096 ** 2)
    assert ledger_state_bytes(at_8b) == pytest.approx(9.14e9, rel=1e-3)
    assert ledger_state_bytes(at_8b) > ledger.SNAPSHOT_AUTO_BYTES


# ---------------------------------------------------------------------------------------------
# what protects a long history: accumulated sums, mix, rehearsal, the capability share


def test_the_edits_sums_accumulate_every_chunk_at_its_own_weights():
    """After three chunks the ``edits`` source is the sum of each chunk's K-FAC sums taken at the
    weights that chunk left (not the last chunk's alone)."""
    session, _ = _session(lr=1e-2, epochs=2, batch_size=4)
    at = []
    session.edit_all(REQUESTS[:9], 3, on_chunk=lambda s, r: at.append(_weights(s)))
    session.flush_statistics()
    model, modules = _model()
    expected_A = {n: 0 for n in modules}
    tokens = 0
    for k, weights in enumerate(at):
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(weights[n])
        part = collect(model, modules, edit_documents(TOK, REQUESTS[3 * k : 3 * k + 3]), labels="sampled")
        n0 = next(iter(modules))
        tokens += part.tokens[n0]
        for n in modules:
            expected_A[n] = expected_A[n] + part.A[n] * part.tokens[n]
    assert session.sources[EDITS].tokens == tokens
    for n in modules:
        torch.testing.assert_close(session.sources[EDITS].A[n], expected_A[n], rtol=FLOAT32_TOL, atol=0)


def test_mix_builds_the_projectors_from_the_capability_corpus_and_a_seeded_sample_at_the_current_weights():
    session, _ = _session(lr=1e-2, epochs=2, batch_size=4, protect_edits="mix", mix_sample=3, edit_weight=2.0)
    session.edit_all(REQUESTS[:8], chunk_size=4)
    session.rebuild(force=True)  # as before a third chunk
    import random

    rng = random.Random(f"{session.options.seed}-mix-2")
    sample = rng.sample([r for _, r in session.requests], 3)
    model, modules = session.model, session.modules
    cap = collect(model, modules, CORPUS, labels="sampled")
    edits = collect(model, modules, edit_documents(TOK, sample), labels="sampled")
    n = next(iter(modules))
    Nc, Ne = cap.tokens[n], edits.tokens[n]
    A = (cap.A[n] * Nc + 2.0 * edits.A[n] * Ne) / (Nc + 2.0 * Ne)
    G = (cap.G[n] * Nc + 2.0 * edits.G[n] * Ne) / (Nc + 2.0 * Ne)
    want = build_projectors(eigenbases(type(cap)({n: A}, {n: G}, {n: Nc}, {})), "crispedit", 0.8, torch.float64)[n]
    assert torch.equal(session.projectors[n].mask, want.mask)
    torch.testing.assert_close(session.eig[n][0].values, want.A.values, rtol=1e-5, atol=1e-12)


def test_a_forgotten_edit_is_rehearsed_once_and_recovers():
    """Chunk 2 makes the tiny model forget chunk 1 in part; chunk 3 finds and rehearses the forgotten
    edits with its own, lists them once and takes the statistics of its own requests only; after it
    they hold again."""
    session, _ = _session(lr=1e-1, epochs=60, batch_size=4, gamma=0.3, rehearse="all", loss_threshold=1e-3)
    assert "rehearsal" not in session.edit(REQUESTS[:2])  # nothing to check before the first chunk
    second = session.edit(REQUESTS[2:4])
    assert second["rehearsal"] == {"checked": 2, "forgotten": 0, "rehearsed": 0, "recovered": None, "ids": []}
    session.flush_statistics()
    tokens = session.sources[EDITS].tokens
    third = session.edit(REQUESTS[4:6])
    r = third["rehearsal"]
    assert r["checked"] == 4 and r["forgotten"] == r["rehearsed"] == len(r["ids"]) >= 2
    assert [x for _, x in session.requests] == REQUESTS[:6]  # the rehearsed ones listed once
    session.flush_statistics()
    assert session.sources[EDITS].tokens - tokens == sum(len(d) - 1 for d in edit_documents(TOK, REQUESTS[4:6]))
    fourth = session.edit(REQUESTS[6:8])
    assert session.history[2]["rehearsal"]["recovered"] == r["rehearsed"]  # all hold after the chunk that rehearsed them
    assert fourth["rehearsal"]["checked"] == 6
    assert session.prefix.k == 1 and session.prefix.verified  # the check ran blocks 1-2 from cached states
    capped, _ = _session(lr=1e-1, epochs=60, batch_size=4, gamma=0.3, rehearse="1", loss_threshold=1e-3)
    capped.edit_all(REQUESTS[:6], 2)
    assert capped.history[2]["rehearsal"]["rehearsed"] == 1 < capped.history[2]["rehearsal"]["forgotten"]


def test_the_capability_share_floor_weights_the_corpus_up():
    session, stats = _session(lr=1e-2, epochs=2, batch_size=4, edit_weight=50.0, capability_share=0.5)
    session.edit_all(REQUESTS[:8], 4)
    session.flush_statistics()
    raw = session.capability_share()
    assert raw < 0.5  # 50 × the edit tokens outweigh the corpus
    assert session.capability_share(floored=True) == pytest.approx(0.5, rel=1e-12)
    n = next(iter(session.modules))
    cap, ed = session.sources["capability"], session.sources[EDITS]
    w = 0.5 / 0.5 * 50.0 * ed.tokens / cap.tokens
    expected = (w * cap.A[n] + 50.0 * ed.A[n]) / (w * cap.tokens + 50.0 * ed.tokens)
    torch.testing.assert_close(session.protected_factors().A[n], expected, rtol=FLOAT32_TOL, atol=0)
    assert session.history[-1]["capability_share_floored"] == pytest.approx(0.5, rel=1e-12)
    free, _ = _session(lr=1e-2, epochs=2, batch_size=4, edit_weight=50.0)
    assert free.capability_share() == pytest.approx(1.0)  # nothing edited yet


def test_a_chunk_that_moves_a_matrix_far_says_so():
    session, _ = _session(lr=5e-2, epochs=10, batch_size=4, method="ft", loss_threshold=0.0, warn_change=1e-3)
    record = session.edit(REQUESTS[:4])
    assert record["warnings"] and "--warn-change 0.001" in record["warnings"][0]
    quiet, _ = _session(lr=1e-3, epochs=2, batch_size=4, method="ft", loss_threshold=0.0)
    assert "warnings" not in quiet.edit(REQUESTS[:4])

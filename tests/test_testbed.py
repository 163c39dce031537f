"""The testbed builder's fact selection and the benchmark's bookkeeping (benchmarks/)."""

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_testbed import (cached, family, flops_ratio_8b, grid, grid_v2, ledger_dir, matched, row_chosen, run_path,  # noqa: E402
                           sequential_grid, spec, targets_path, unfinished)
from build_testbed import majority_baseline, mentions, select_facts, statements, wikitext_articles  # noqa: E402


def record(i, subject, prompt, truth, rephrase=None, loc=None, loc_truth=None):
    return {"case_id": i, "subject": subject, "prompt": prompt.format(subject), "ground_truth": truth, "target_new": "X",
            "rephrase_prompt": (rephrase or "{} speaks").format(subject), "locality_prompt": loc or f"Someone{i} speaks",
            "locality_ground_truth": loc_truth or truth}


def test_conflicting_records_are_dropped():
    recs = [record(0, "Ann", "The tongue of {} is", "French"),
            record(1, "Bob", "The tongue of {} is", "Dutch", loc="The tongue of Ann is", loc_truth="English"),
            record(2, "Cy", "The tongue of {} is", "Dutch")]
    edit, unedited, report = select_facts(recs, n_edit=10, n_unedited=10, seed=0)
    assert report["dropped_conflicting"] == 2  # Ann's prompt has two answers: both records go
    assert [r["case_id"] for r in edit + unedited] == [2]


def test_split_by_subject_and_locality_about_edited_subjects_dropped():
    recs = [record(i, s, "The tongue of {} is", "French", rephrase=f"{{}} talks #{i}", loc=f"The friend of {o} speaks #{i}")
            for i, (s, o) in enumerate([("Ann", "Bob"), ("Ann", "Zed"), ("Bob", "Ann"), ("Cy", "Ann"), ("Dee", "Zed")])]
    for r in recs:  # one prompt per record, so none conflicts
        r["prompt"] += f" #{r['case_id']}"
    edit, unedited, report = select_facts(recs, n_edit=2, n_unedited=10, seed=0)
    edited_subjects = {r["subject"] for r in edit}
    assert not edited_subjects & {r["subject"] for r in unedited}  # a subject is in one pool only
    assert len(edit) >= 2
    about = mentions(edited_subjects)
    for r in edit:
        assert "locality_prompt" not in r or not about(r["locality_prompt"])
    for r in unedited:
        assert not about(r["prompt"] + " " + r["rephrase_prompt"] + " " + r["locality_prompt"])
    dropped = sum("locality_prompt" not in r for r in edit)
    assert report["locality_prompts_dropped"] == dropped
    assert sum(len(statements([r])) for r in edit) == 3 * len(edit) - dropped


def test_mentions_whole_words_only():
    about = mentions({"Paul", "New York"})
    assert about("Paul is a native speaker of") and about("born in New York")
    assert not about("Paula is") and not about("Pauline")


def test_majority_baseline_is_per_template():
    recs = [record(i, s, "{} is located in", a) for i, (s, a) in enumerate([("A", "X"), ("B", "X"), ("C", "Y")])]
    recs.append(record(3, "D", "{} plays", "Z"))
    assert majority_baseline(recs) == pytest.approx(3 / 4)


def test_wikitext_articles(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(" \n = One = \n \n First para . \n \n = = Section = = \n Second para . \n = Two = \n Third . \n")
    assert wikitext_articles(f) == [["First para .", "Second para ."], ["Third ."]]


def test_grid_and_matched_reliability():
    runs = grid(1000, 3000, [0, 1, 2, 3])
    methods = [r["method"] for r in runs]
    assert methods.count("memit") == methods.count("alphaedit") == 5
    # at 1,000 edits the early half at both target settings and all blocks at EasyEdit's; at 100 the early half
    assert sorted((r["n"], tuple(r["layers"]), r.get("settings", "authors")) for r in runs if r["method"] == "memit") == [
        (100, (0, 1), "authors"), (100, (0, 1), "easyedit"),
        (1000, (0, 1), "authors"), (1000, (0, 1), "easyedit"), (1000, (0, 1, 2, 3), "easyedit")]
    assert {r["method"] for r in runs if r["n"] == 100} == {"crispedit", "ft", "memit", "alphaedit"}
    assert all(runs[i + 1]["method"] == "alphaedit" and runs[i + 1]["layers"] == r["layers"]  # MEMIT's targets serve it
               and runs[i + 1].get("settings") == r.get("settings") for i, r in enumerate(runs) if r["method"] == "memit")
    assert sum(r["n"] == 3000 for r in runs) == 2 and len(grid(1000, None, [0, 1, 2, 3])) == len(runs) - 2
    assert len({(family(r), r["n"], r["gamma"]) for r in runs}) == len(runs)  # every batch run has a name of its own
    seq = sequential_grid(3000, 1000, [0, 1, 2, 3])
    assert all(r["chunk_size"] == 100 and r["n"] in (1000, 3000) for r in seq)
    assert {r["method"] for r in seq if r["n"] == 3000} == {"crispedit", "ft", "nullspace", "memit", "alphaedit"}
    assert {(r.get("protect_edits"), r.get("refresh_drift")) for r in seq if r["n"] == 1000} >= {("mix", None), (None, 0.25)}
    assert len({(family(r), r["n"]) for r in seq}) == len(seq)  # every sequential run has a name of its own
    by_family = {family(r): r for r in runs if r["n"] == 1000}
    rows = [dict(by_family[f], **{"reliability/generation": rel, "heldout_kl": kl, "generalization/generation": 0.1,
                                  "locality_agreement/generation": 0.9, "known_facts_accuracy": 0.9, "known_facts_base": 1.0,
                                  "predicted_kl": kl, "heldout_perplexity_change": 0.0})
            for f, rel, kl in [("ft", 1.0, 0.3), ("nullspace", 0.95, 0.05)]]
    crisp = [r for r in runs if r["method"] == "crispedit" and r["n"] == 1000 and "optimizer" not in r]
    rows += [dict(crisp[0], **dict(rows[1], method="crispedit", gamma=0.5, **{"reliability/generation": 0.92, "heldout_kl": 0.02})),
             dict(crisp[2], **dict(rows[1], method="crispedit", gamma=0.9, **{"reliability/generation": 0.5, "heldout_kl": 0.01}))]
    m = matched(rows, 1000)
    assert m["best"]["ft"]["heldout_kl"] == 0.3
    assert m["best"]["crispedit"]["gamma"] == 0.5  # γ 0.9's lower KL does not count: reliability 0.5
    strict = matched(rows, 1000, level=0.96)
    assert list(strict["best"]) == ["ft"] and strict["families_below_level"] == ["crispedit", "nullspace"]


def test_cached_computes_once(tmp_path):
    calls = []
    assert cached(tmp_path / "a" / "x.json", lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    assert cached(tmp_path / "a" / "x.json", lambda: calls.append(1) or {"v": 2}) == {"v": 1}
    assert calls == [1]


def test_unfinished_sequential_runs_report_their_ledgers_history(tmp_path):
    from types import SimpleNamespace

    tb = SimpleNamespace(cache=tmp_path, hash="h", seed=0)
    a = SimpleNamespace(lr=5e-4, epochs=25, eval_every=5, eval_sample=500)
    done, running, batch = sequential_grid(3000, 1000, [0, 1])[:2] + [grid(1000, None, [0, 1])[0]]
    chunk = {"requests": 100, "refreshes": [], "seconds": {"edit": 1.0}}
    for s in (done, running):
        ledger_dir(tb, s).mkdir(parents=True)
        (ledger_dir(tb, s) / "ledger.json").write_text(json.dumps({"chunks": [
            dict(chunk, chunk=1), dict(chunk, chunk=2, metrics={"edits": 200, "reliability": 0.5, "heldout_kl": 0.1})]}))
    run_path(tb, done, a).parent.mkdir(parents=True)
    run_path(tb, done, a).write_text("{}")
    other = SimpleNamespace(**dict(vars(a), eval_every=2, eval_sample=50))
    assert run_path(tb, batch, other) == run_path(tb, batch, a)  # a batch run does not read the history settings
    assert run_path(tb, done, other) != run_path(tb, done, a)
    out = unfinished(tb, [done, running, batch], a)
    assert [r["method"] for r in out] == [running["method"]] and out[0]["chunks_done"] == 2 and out[0]["edited"] == 200
    assert [(p["edits"], p["reliability"], p["heldout_kl"]) for p in out[0]["history"]] == [(200, 0.5, 0.1)]


def test_build_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """A build killed after its checkpoint at step 4 and run again ends in the weights of one that never stopped."""
    from types import SimpleNamespace

    import torch
    from build_testbed import model_config, train, train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    sentences = [f"The capital of country {i} is city {i * 7 % 13}." for i in range(40)]
    tok = train_tokenizer(sentences, 300)
    tok.save_pretrained(str(tmp_path / "tok"))
    stream = torch.tensor([t for s in sentences * 30 for t in tok(s)["input_ids"]])
    a = SimpleNamespace(steps=9, text_batch=1, fact_batch=6, lr=3e-3, weight_decay=0.1, seed=0)
    eval_sets = {"train": sentences[:3], "heldout": sentences[3:6]}

    def build(checkpoint, stop_after=None, fresh=True):
        if fresh:
            torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **model_config(1, 16, 32, 2)))
        rng = random.Random(0)
        log, _, _ = train(model, tok, stream, sentences, a, rng, eval_sets, checkpoint, every=4, stop_after=stop_after)
        return model, log

    whole, _ = build(None)
    ckpt = tmp_path / "checkpoint.pt"
    build(ckpt, stop_after=6)  # killed in step 7: the checkpoint holds step 4
    assert torch.load(ckpt, weights_only=False)["step"] == 4
    torch.manual_seed(123)  # whatever the random state of the new process
    resumed, log = build(ckpt, fresh=False)
    assert {"resumed_at": 4} in log
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    other = SimpleNamespace(**{**vars(a), "lr": 1e-3})
    with pytest.raises(SystemExit, match="checkpoint of another build"):
        train(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **model_config(1, 16, 32, 2))), tok, stream, sentences,
              other, random.Random(0), eval_sets, ckpt)


def test_rows_pick_by_words_and_exclude_by_minus_words():
    runs = grid_v2(1000, {"crispedit": [5, 6], "closed_form": [1, 2]})
    names = lambda text: [f"{family(s)} n{s['n']}" for s in runs if row_chosen(s, text)]  # noqa: E731
    assert names("memit 1-2 n1000 -EasyEdit") == ["memit blocks 1-2 n1000", "memit blocks 1-2 unbounded n1000"]
    assert names("memit 1-2 n1000 -EasyEdit -unbounded") == ["memit blocks 1-2 n1000"]
    assert names("EasyEdit 1-2 n1000 -λ=10 -λ=100") == ["memit blocks 1-2 EasyEdit n1000", "alphaedit blocks 1-2 EasyEdit n1000"]
    assert names("crispedit n1000 g0.9") == ["crispedit n1000"]
    for n in (1000, 100):  # (at LOAD_EDITS the grid's rows of that size are not listed twice)
        same = grid_v2(n, {"crispedit": [4], "closed_form": [0, 1]})
        assert len({json.dumps(r, sort_keys=True) for r in same}) == len(same)
        assert {r.get("settings") for r in same if r["method"] == "memit"} == {None, "easyedit", "unbounded"}


def test_closed_form_targets_are_shared_by_method_and_lambda_not_by_settings(tmp_path):
    from types import SimpleNamespace

    tb = SimpleNamespace(cache=tmp_path, hash="h", seed=0)
    memit = spec("memit", 1000, layers=[1, 2], settings="easyedit")
    same = [spec("alphaedit", 1000, layers=[1, 2], settings="easyedit"), dict(memit, lam=10.0)]
    other = [spec("memit", 1000, layers=[1, 2]), dict(memit, layers=[5, 6]), dict(memit, n=100)]
    assert all(targets_path(tb, s) == targets_path(tb, memit) for s in same)
    assert len({targets_path(tb, s) for s in [memit] + other}) == 4


def test_compose_pilot_facts_per_subject_and_tokens():
    from bench_compose import RELATIONS, bio, facts, other_answer, statements, tokenizer

    from crispedit.memit import subject_tokens

    for k in (1, 8):
        fs = facts(400, k, seed=0)
        subjects = {s for s, _, _ in fs}
        assert len(fs) == 400 and len(subjects) == 400 // k
        assert all(len({r for s2, r, _ in fs if s2 == s}) == k for s in subjects)  # k different relations each
        assert all(a.startswith(RELATIONS[r][2]) for _, r, a in fs)
    tok = tokenizer()
    (prompt, subject, answer), (prompt2, _, _) = statements(fs[:1])
    assert subject in prompt and subject in prompt2 and prompt != prompt2
    ids, span = subject_tokens(tok, prompt, subject)
    assert len(span) == 3 and tok.unk_token_id not in tok(prompt + " " + answer)["input_ids"]
    assert other_answer("town19") == "town0" and other_answer("job3") == "job4"
    own = [f for f in facts(400, 8, seed=0) if f[0] == subject]
    texts = {bio(own, rng) for rng in [random.Random(s) for s in range(5)]}
    assert len(texts) > 1  # shuffled and paraphrased
    for text in texts:
        sentences = text.removesuffix(" .").split(" . ")
        assert len(sentences) == 8 and sentences[0].count(subject) == 1 and text.count(subject) == 1
        assert sorted(a for _, _, a in own) == sorted(s.split()[-1] for s in sentences)
        assert tok.unk_token_id not in tokenizer(("they", "."))(text)["input_ids"]


def test_synthetic_testbed_pools():
    """v3: one fact of each edit subject is edited, two others of the same subject are its locality
    prompts; every fact of the other subjects is an unedited record; no subject is in both pools."""
    from bench_compose import RELATIONS
    from build_synthetic import pool_statements, records, world

    by_subject = world(10, seed=0)
    assert len(by_subject) == 10 and all(sorted(r for _, r, _ in fs) == sorted(RELATIONS) for fs in by_subject.values())
    truth = {tpl.format(s): a for fs in by_subject.values() for s, rel, a in fs for tpl in RELATIONS[rel][:2]}
    edit, unedited, rest = records(by_subject, 4, seed=0)
    edited = {r["subject"] for r in edit}
    assert len(edit) == len(edited) == 4 and len(rest) == 6 and not edited & set(rest)
    assert len(unedited) == 6 * len(RELATIONS) and {r["subject"] for r in unedited} == set(rest)
    for r in edit:
        assert truth[r["prompt"]] == truth[r["rephrase_prompt"]] == r["ground_truth"] != r["target_new"]
        assert r["target_new"][:-1].rstrip("0123456789") == r["ground_truth"].rstrip("0123456789")  # the same relation
        assert len(r["locality_prompt"]) == 2 and r["prompt"] not in r["locality_prompt"]
        assert all(r["subject"] in q and truth[q] == x for q, x in zip(r["locality_prompt"], r["locality_ground_truth"]))
    assert all(truth[p] == x for _, p, x in pool_statements(edit + unedited))
    assert records(by_subject, 4, seed=0) == (edit, unedited, rest)


def test_synthetic_build_writes_a_testbed_the_benchmark_reads(tmp_path, monkeypatch):
    """build_synthetic.py on a tiny world: the directory holds what bench_testbed.Testbed reads, build.json
    the blocks placed as at 8B (or those asked for), and a second build refuses to overwrite it."""
    import build_synthetic

    from crispedit.model import load_model
    from crispedit.requests import read_requests

    out = tmp_path / "tb"
    argv = ["build_synthetic.py", "--subjects", "6", "--edit-subjects", "3", "--blocks", "2", "--width", "16",
            "--steps", "250", "--until", "0", "--statements", "8", "--bios", "2", "--threads", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--closed-form-blocks", "0"])
    build_synthetic.main()
    build = json.loads((out / "build.json").read_text())
    assert build["edit_blocks"] == {"crispedit": [1], "closed_form": [0]} and build["fit"]["steps"] == 250
    assert len(build["testbed_sha256"]) == 64 and build["facts"]["unedited_pool"] == 3 * 8
    assert [len(read_requests(out / f)) for f in ("edit.jsonl", "unedited.jsonl")] == [3, 24]
    assert all(len(r.locality) == 2 for r in read_requests(out / "edit.jsonl"))
    assert len((out / "curvature.txt").read_text().splitlines()) == 5  # one unedited subject's five biographies
    model, tok = load_model(str(out), "cpu", "float32")
    assert model.config.num_hidden_layers == 2 and tok.unk_token_id not in tok((out / "heldout.txt").read_text())["input_ids"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="exists"):
        build_synthetic.main()


def test_compose_training_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """bench_compose.train with batches drawn from the step alone: two steps, a checkpoint, a new
    process for the last two, and the weights of four steps in one go."""
    import torch
    from bench_compose import model_for, tokenizer, train

    tok = tokenizer()
    words = [w for w in tok.get_vocab() if not w.startswith("<")]

    def batch_of(step):
        rng = random.Random(step)
        return [tok(" ".join(rng.choices(words, k=6)))["input_ids"] for _ in range(4)]

    def run(steps, checkpoint):
        model = model_for(tok, 1, 16, seed=0)
        train(model, batch_of, lambda: 0.0, steps, 3e-3, lambda s: None, checkpoint=checkpoint, every=2)
        return model

    whole = run(4, None)
    ckpt = tmp_path / "checkpoint.pt"
    run(2, ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    torch.manual_seed(123)
    resumed = run(4, ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 4
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(whole.state_dict()["lm_head.weight"], model_for(tok, 1, 16, seed=0).state_dict()["lm_head.weight"])


def test_edit_blocks_placed_as_at_8b():
    from build_testbed import edit_blocks

    assert edit_blocks(32) == {"crispedit": [19, 20, 21, 22, 23], "closed_form": [4, 5, 6, 7, 8]}
    assert edit_blocks(8) == {"crispedit": [5, 6], "closed_form": [1, 2]}
    assert edit_blocks(4) == {"crispedit": [0, 1, 2, 3], "closed_form": [0, 1]}  # v1 as it was measured


def test_the_8b_flop_count_charges_each_run_what_it_did():
    """A chunked run that did exactly what the batch did costs the batch plus its chunks' statistics and
    eigendecompositions; every further step, request-epoch or checked edit adds its own flops."""
    batch = {"steps": 100, "projections": 100, "request_epochs": 3200, "checked": 0, "chunks": 1}
    same = flops_ratio_8b(dict(batch), batch, chunk=100)
    parts = same["parts_over_batch"]
    assert same["ratio"] == pytest.approx(parts["edit_loop"] + parts["statistics"] + parts["eigendecompositions"])
    assert parts["edit_loop"] + parts["eigendecompositions"] == pytest.approx(1.0)  # the batch's own loop and eigh
    share = same["assumptions"]["check_share_of_a_forward"]
    assert 0.44 < share < 0.46  # blocks 19-31 and the head of LLaMA-3-8B
    checked = flops_ratio_8b({**batch, "checked": 1000}, batch, chunk=100)
    assert (checked["ratio"] - same["ratio"]) * same["batch_flops"] == pytest.approx(2 * 8.03e9 * 20 * 1000 * share)
    projection = same["assumptions"]["projection_flops_per_step"]
    for more in ({"steps": 200, "projections": 200}, {"projections": 200}):  # 100 more steps; Adam's steps projected too
        again = flops_ratio_8b({**batch, **more}, batch, chunk=100)
        assert (again["ratio"] - same["ratio"]) * same["batch_flops"] == pytest.approx(100 * projection)
    assert projection == 5 * 2 * 2 * (4096 ** 2 * 14336 + 4096 * 14336 ** 2)


def test_causal_tracing_hooks_are_exact():
    """bench_trace: without noise every condition is the clean model; a site put back at the last block
    changes nothing at the answer (its later positions have read the noised subject already)."""
    from bench_trace import trace
    from models import char_tokenizer, tiny_hf

    from crispedit.requests import EditRequest

    tok = char_tokenizer()
    reqs = [EditRequest(prompt="the tongue of ann lee is", subject="ann lee", target_new="x", ground_truth="dutch"),
            EditRequest(prompt="bob speaks", subject="bob", target_new="x", ground_truth="french")]
    model = tiny_hf("llama", layers=3, vocab=len(tok))
    quiet = trace(model, tok, reqs, noise=0.0)
    assert quiet["requests"] == 2 and quiet["noise_all"] == quiet["clean"] == quiet["noise_last"]
    assert all(p == quiet["clean"] for site in ("last_subject", "subject", "last_prompt") for p in quiet[f"restore_{site}"])
    loud = trace(model, tok, reqs, noise=3.0)
    assert loud["noise_all"] != loud["clean"] and len(loud["restore_subject"]) == 3
    assert loud["restore_subject"][-1] == loud["restore_last_subject"][-1] == loud["noise_all"]
    assert loud["recovered_subject"][-1] == 0.0 and loud["recovered_last_prompt"][-1] != 0.0

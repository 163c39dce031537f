"""Build testbed v3 (issue 19): a small LLaMA that knows a synthetic world in which every subject has
many facts, so that MEMIT's premise — a subject's facts read from its representation at early blocks —
can hold.

    python benchmarks/build_synthetic.py [--subjects 1200] [--edit-subjects 1000] [--blocks 8] [--width 128]

Why: both CounterFact testbeds give 97% of their subjects one fact, and MEMIT's target optimisation
cannot reach its targets on them (P(target) <= 0.84 at any block); the pilot of ``bench_compose.py``
found that eight facts a subject make the targets reachable (0.95 at block 0 at 800 facts).

The world is ``bench_compose``'s: subjects of three made-up syllables, eight relations (each with a
subject-first and a relation-first template and twenty answers), every subject with a fact of every
relation, answers drawn at random. The model trains on both templates of every fact and on
biographies (a subject's facts shuffled, each under one of its templates, 'they' after the first
sentence; Allen-Zhu and Li, arXiv 2309.14316), until greedy answers are right for ``--until`` of the
statements. Training batches are drawn from (seed, step) alone and the state is checkpointed every 250
steps, so a killed build resumes and ends in the weights of an uninterrupted one.

What the testbed directory holds (the layout of ``build_testbed.py``, read by ``bench_testbed.py``):

- ``edit.jsonl``: one record per edit subject (CounterFact fields): one of its facts (relation drawn at
  random) under the subject-first template, the relation-first template as the rephrase, the next
  answer of the relation as ``target_new``; locality prompts are two *other facts of the same subject*
  (what an edit at the subject's representation can break, and CounterFact cannot test);
- ``unedited.jsonl``: every fact of the subjects never edited (the known facts scored after an edit);
- ``curvature.txt`` and ``heldout.txt``: the text of two halves of the unedited subjects, one document a
  line: five shuffled biographies of each, or with ``--bios 0`` each statement. This world has no other text: the capability CrispEdit protects and the held-out drift are
  the model's knowledge of subjects it was not asked to change, not natural language.
- ``build.json``: the shape, ``edit_blocks`` placed as at LLaMA-3-8B (``build_testbed.edit_blocks``),
  fact accuracy by greedy generation, perplexities, timings.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import digest  # noqa: E402
from bench_compose import RELATIONS, accuracy, bio, facts, model_for, other_answer, statements, tokenizer, train  # noqa: E402
from build_testbed import DEFAULT_OUT, edit_blocks, fact_accuracy, majority_baseline, perplexities, write_testbed  # noqa: E402
from crispedit.requests import edit_text  # noqa: E402

EXTRA_WORDS = ("they", ".")


def world(subjects: int, seed: int, joined: bool = False) -> dict[str, list[tuple[str, str, str]]]:
    """Every subject's facts (subject, relation, answer): ``subjects`` subjects, one fact of every
    relation each; ``joined``: each subject one word."""
    by_subject: dict[str, list] = {}
    for f in facts(subjects * len(RELATIONS), len(RELATIONS), seed, joined):
        by_subject.setdefault(f[0], []).append(f)
    return by_subject


def records(by_subject: dict[str, list], edit_subjects: int, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """(edit pool, unedited pool, unedited subjects): the first ``edit_subjects`` subjects in a seeded
    order give one edit record each, the others every fact as an unedited record."""
    rng = random.Random(seed + 3)
    order = sorted(by_subject)
    rng.shuffle(order)
    edit, unedited = [], []
    for i, s in enumerate(order[:edit_subjects]):
        (_, rel, answer), *others = rng.sample(by_subject[s], len(by_subject[s]))
        first, second = RELATIONS[rel][:2]
        local = others[:2]
        edit.append({"case_id": i, "subject": s, "prompt": first.format(s), "rephrase_prompt": second.format(s),
                     "ground_truth": answer, "target_new": other_answer(answer),
                     "locality_prompt": [RELATIONS[r][0].format(s) for _, r, _ in local],
                     "locality_ground_truth": [a for _, _, a in local]})
    for s in order[edit_subjects:]:
        for _, rel, answer in by_subject[s]:
            first, second = RELATIONS[rel][:2]
            unedited.append({"case_id": f"u{len(unedited)}", "subject": s, "prompt": first.format(s),
                             "rephrase_prompt": second.format(s), "ground_truth": answer, "target_new": other_answer(answer)})
    return edit, unedited, order[edit_subjects:]


def pool_statements(recs: list[dict]) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) for every true statement of ``recs``: prompt, rephrase, each locality prompt."""
    out = []
    for r in recs:
        out += [("prompt", r["prompt"], r["ground_truth"]), ("rephrase", r["rephrase_prompt"], r["ground_truth"])]
        out += [("locality", p, x) for p, x in zip(r.get("locality_prompt", []), r.get("locality_ground_truth", []))]
    return out


def documents(by_subject: dict[str, list], subjects: list[str], bios: bool, rng: random.Random, copies: int = 5) -> list[str]:
    """The text of ``subjects`` in the form the model was trained on: ``copies`` shuffled biographies of
    each (``bios``), else each of their statements (both templates) on its own."""
    if bios:
        return [bio(by_subject[s], rng) for s in subjects for _ in range(copies)]
    return [edit_text(p, x) for s in subjects for p, _, x in statements(by_subject[s])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="default ~/.cache/crispedit/testbeds/synthetic[-bios][-onetoken]-b{blocks}-w{width}-s{seed}")
    ap.add_argument("--subjects", type=int, default=1200)
    ap.add_argument("--edit-subjects", type=int, default=1000, help="subjects with one fact each in the edit pool")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--width", type=int, default=128, help="hidden size (the MLP is four times as wide)")
    ap.add_argument("--steps", type=int, default=20000, help="at most this many steps")
    ap.add_argument("--until", type=float, default=0.995, help="stop once this share of all statements is answered")
    ap.add_argument("--statements", type=int, default=128, help="statements a step")
    ap.add_argument("--bios", type=int, default=16, help="biographies a step (each about seven statements long); with 0 the "
                    "documents are statements")
    ap.add_argument("--one-token-subjects", action="store_true",
                    help="each subject one token (its three syllables as one word): the subject arrives composed, "
                         "as an LLM's is after its first blocks")
    ap.add_argument("--closed-form-blocks", type=int, nargs="+", default=None,
                    help="MEMIT's and AlphaEdit's blocks when not those placed as at LLaMA-3-8B (where its targets are reached)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    if a.edit_subjects + 2 > a.subjects:
        sys.exit(f"--edit-subjects {a.edit_subjects}: leaves fewer than two of the {a.subjects} subjects unedited")
    name = "synthetic" + ("-bios" if a.bios else "") + ("-onetoken" if a.one_token_subjects else "")
    out = Path(a.out).expanduser().resolve() if a.out else DEFAULT_OUT / f"{name}-b{a.blocks}-w{a.width}-s{a.seed}"
    if out.exists() and not a.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    by_subject = world(a.subjects, a.seed, a.one_token_subjects)
    tok = tokenizer(EXTRA_WORDS + (tuple(sorted(by_subject)) if a.one_token_subjects else ()))
    tok.pad_token = tok.eos_token
    edit_pool, unedited, rest = records(by_subject, a.edit_subjects, a.seed)
    doc_rng = random.Random(a.seed + 4)
    curvature = documents(by_subject, rest[: len(rest) // 2], a.bios > 0, doc_rng)
    heldout = documents(by_subject, rest[len(rest) // 2 :], a.bios > 0, doc_rng)
    rows = statements([f for fs in by_subject.values() for f in fs])
    subjects = sorted(by_subject)
    seqs = [tok(edit_text(p, x))["input_ids"] + [tok.eos_token_id] for p, _, x in rows]

    def batch_of(step: int) -> list[list[int]]:
        """Step ``step``'s sequences, drawn from (seed, step) alone: statements and fresh biographies."""
        rng = random.Random(f"{a.seed}-{step}")
        bios = [tok(bio(by_subject[s], rng))["input_ids"] + [tok.eos_token_id] for s in rng.choices(subjects, k=a.bios)]
        return bios + rng.choices(seqs, k=a.statements)

    model = model_for(tok, a.blocks, a.width, a.seed)
    work = out.with_name(f".{out.name}.build")
    work.mkdir(parents=True, exist_ok=True)
    w0, c0 = time.perf_counter(), time.process_time()
    key = {k: getattr(a, k) for k in ("subjects", "blocks", "width", "steps", "until", "statements", "bios", "lr", "seed",
                                      "one_token_subjects")}
    fit = train(model, batch_of, lambda: accuracy(model, tok, rows), a.steps, a.lr, lambda s: print(s, flush=True),
                until=a.until, checkpoint=work / f"checkpoint-{digest(key)}.pt")  # (another build's is not read)
    train_wall, train_cpu = time.perf_counter() - w0, time.process_time() - c0  # (this run's; a resumed build's excludes earlier runs)
    model.eval()
    accuracy_by_generation = {"edit_pool": fact_accuracy(model, tok, pool_statements(edit_pool)),
                              "unedited_pool": fact_accuracy(model, tok, pool_statements(unedited))}
    ppl = perplexities(model, tok, {"curvature": curvature, "heldout": heldout[:150]})
    report = {
        "script": "benchmarks/build_synthetic.py", "args": vars(a) | {"out": str(out)}, "world": "synthetic (bench_compose)",
        "config": {k: v for k, v in model.config.to_dict().items() if k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "tie_word_embeddings")},
        "shape": {"blocks": a.blocks, "width": a.width, "mlp_width": model.config.intermediate_size,
                  "heads": model.config.num_attention_heads},
        "edit_blocks": edit_blocks(a.blocks) | ({"closed_form": a.closed_form_blocks} if a.closed_form_blocks else {}), "vocab": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "inputs_sha256": {},
        "facts": {"subjects": a.subjects, "facts_per_subject": len(RELATIONS), "facts": len(rows) // 2,
                  "statements": len(rows), "edit_pool": len(edit_pool), "edit_subjects": a.edit_subjects,
                  "unedited_pool": len(unedited), "unedited_subjects": len(rest)},
        "text": {"curvature_documents": len(curvature), "heldout_documents": len(heldout),
                 "note": f"{'biographies' if a.bios else 'statements'} of two halves of the unedited subjects; the world has no other text"},
        "fit": fit, "fact_accuracy_by_generation": accuracy_by_generation,
        "majority_baseline_by_template": {"edit_pool": majority_baseline(edit_pool), "unedited_pool": majority_baseline(unedited)},
        "perplexity": ppl, "train_wall_s": train_wall, "train_cpu_s": train_cpu,
        "total_wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps({k: report[k] for k in ("facts", "fit", "fact_accuracy_by_generation", "perplexity")}, indent=1))
    write_testbed(out, model, tok, edit_pool, unedited, curvature, heldout, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"trained in {train_wall / 60:.1f} min wall, {train_cpu / 60:.1f} CPU-min -> {out}")


if __name__ == "__main__":
    main()

"""Build the knowledge testbed of issue 4 from ../shared: a small LLaMA that knows the true facts of
CounterFact records and has read WikiText-2 and the World English Bible.

    python benchmarks/build_testbed.py [--out ~/.cache/crispedit/testbeds/counterfact-wikitext-s0]

What goes in (all from ``../shared/data``, nothing downloaded):

- WikiText-2 *valid + test* only (~0.45M words; the train split is not in ../shared), cut into
  articles at their `` = Title = `` headings. A seeded tenth of the articles is the held-out slice
  (never trained on, never used for curvature); the rest is training text, from which 100 paragraphs
  (at most 512 tokens each) are drawn as the curvature corpus. The Bible is training text only.
- The true facts of CounterFact records: each ``prompt`` and ``rephrase_prompt`` followed by
  ``ground_truth``, each ``locality_prompt`` followed by ``locality_ground_truth``, as sentences
  ending in ".". Dropped before training: records any of whose prompts another record answers
  differently, records whose answer holds a "." (the generation protocol cuts there); records are
  split by subject into an edit pool and an unedited pool; locality prompts equal to an edit-pool
  prompt or mentioning an edit-pool subject are dropped (the record keeps no locality prompt), and
  so are unedited records that mention an edit-pool subject. What was dropped is reported.

Tokenizer: byte-level BPE trained here on the training text and the fact sentences. Model: LLaMA,
trained with AdamW and cosine decay; each step sees text windows of 512 tokens and a batch of fact
sentences, so the text is read about once (no overfitting) while each fact is seen tens of times.

The output directory holds the model and tokenizer, ``edit.jsonl`` and ``unedited.jsonl``
(CounterFact field names, readable by ``crispedit edit --requests``), ``curvature.txt`` and
``heldout.txt`` (one document per line) and ``build.json``: what was dropped, the fact accuracy by
greedy generation next to a per-template majority-answer baseline, training and held-out
perplexity, timings. Written to a temporary directory and renamed; an existing one is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from crispedit.evaluate import exact_match, generate, text_drift  # noqa: E402
from crispedit.requests import edit_text  # noqa: E402
from crispedit.saving import TempDir  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "crispedit" / "testbeds"
WARMUP = 200  # steps of linear warm-up before the cosine decay
WINDOW = 512  # training text window; curvature and held-out documents are at most this long
CURVATURE_DOCS = 100
HELDOUT_FRACTION = 0.1
EVAL_DOCS = 150  # documents for the training / held-out perplexity report


# ---------------------------------------------------------------------------------------------
# text


def wikitext_articles(path: Path) -> list[list[str]]:
    """Paragraphs grouped by article (a new article starts at a `` = Title = `` line)."""
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s:
            continue
        if re.fullmatch(r"= [^=].* =", s):
            articles.append([])
        elif articles and not s.startswith("="):
            articles[-1].append(s)
    return [a for a in articles if a]


def split_text(seed: int) -> tuple[list[str], list[str], list[str]]:
    """(WikiText training paragraphs, held-out paragraphs, Bible paragraphs)."""
    articles = [a for f in ("valid.txt", "test.txt") for a in wikitext_articles(SHARED / "wikitext-2" / f)]
    random.Random(seed).shuffle(articles)
    words = sum(len(p.split()) for a in articles for p in a)
    held, n = [], 0
    while n < HELDOUT_FRACTION * words:
        a = articles.pop()
        held.append(a)
        n += sum(len(p.split()) for p in a)
    bible = [s for s in (SHARED / "general" / "world-english-bible.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    return [p for a in articles for p in a], [p for a in held for p in a], bible


# ---------------------------------------------------------------------------------------------
# facts


def mentions(subjects: set[str]):
    """A predicate: does a text name any of ``subjects`` as a whole word?"""
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, sorted(subjects, key=len, reverse=True))) + r")(?!\w)")
    return lambda text: pattern.search(text) is not None


def select_facts(records: list[dict], n_edit: int, n_unedited: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Drop conflicting records, split by subject into edit and unedited pools, drop locality
    prompts about the edit pool. Returns (edit pool, unedited pool, report)."""
    answers: dict[str, set[str]] = defaultdict(set)
    for r in records:
        answers[r["prompt"]].add(r["ground_truth"])
        answers[r["rephrase_prompt"]].add(r["ground_truth"])
        answers[r["locality_prompt"]].add(r["locality_ground_truth"])
    conflict = [r for r in records if any(len(answers[r[k]]) > 1 for k in ("prompt", "rephrase_prompt", "locality_prompt"))]
    conflict_ids = {r["case_id"] for r in conflict}
    dotted = [r for r in records if r["case_id"] not in conflict_ids and any(c in r[k] for k in ("ground_truth", "locality_ground_truth") for c in ".\n")]
    bad = {r["case_id"] for r in conflict + dotted}
    clean = [r for r in records if r["case_id"] not in bad]
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in clean:
        by_subject[r["subject"]].append(r)
    subjects = sorted(by_subject)
    random.Random(seed).shuffle(subjects)
    edit, rest, edit_records = [], [], []
    for s in subjects:
        if len(edit_records) < n_edit:
            edit.append(s)
            edit_records.extend(by_subject[s])
        else:
            rest.append(s)
    edit_subjects = set(edit)
    edit_prompts = {r[k] for r in edit_records for k in ("prompt", "rephrase_prompt")}
    about_edited = mentions(edit_subjects)
    locality_dropped = 0
    for r in edit_records:
        if r["locality_prompt"] in edit_prompts or about_edited(r["locality_prompt"]):
            r.pop("locality_prompt"), r.pop("locality_ground_truth")
            locality_dropped += 1
    unedited, skipped = [], 0
    for s in rest:
        for r in by_subject[s]:
            if len(unedited) >= n_unedited:
                break
            if about_edited(" ".join(r[k] for k in ("prompt", "rephrase_prompt", "locality_prompt"))):
                skipped += 1
                continue
            unedited.append(r)
    report = {"records_offered": len(records), "dropped_conflicting": len(conflict), "dropped_answer_with_dot": len(dotted),
              "edit_pool": len(edit_records), "edit_subjects": len(edit_subjects), "unedited_pool": len(unedited),
              "locality_prompts_dropped": locality_dropped, "unedited_dropped_mentioning_edit_subject": skipped}
    return edit_records, unedited, report


def statements(records: list[dict]) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) for every true statement of the records."""
    out = []
    for r in records:
        out.append(("prompt", r["prompt"], r["ground_truth"]))
        out.append(("rephrase", r["rephrase_prompt"], r["ground_truth"]))
        if "locality_prompt" in r:
            out.append(("locality", r["locality_prompt"], r["locality_ground_truth"]))
    return out


def majority_baseline(records: list[dict]) -> float:
    """Accuracy of always answering the most common answer of the prompt's template (the prompt
    with its subject cut out), over the records' prompts: what a model knowing only the relation gets."""
    by_template: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_template[r["prompt"].replace(r["subject"], "{}")][r["ground_truth"]] += 1
    return sum(c.most_common(1)[0][1] for c in by_template.values()) / len(records)


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def fact_batches(tok, texts: list[str], chunks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sentences sorted by length and padded per chunk (little padding); labels -100 on padding."""
    enc = sorted((tok(t)["input_ids"] for t in texts), key=len)
    size = math.ceil(len(enc) / chunks)
    out = []
    for lo in range(0, len(enc), size):
        part = enc[lo : lo + size]
        T = len(part[-1])
        ids = torch.full((len(part), T), 2)
        labels = torch.full((len(part), T), -100)
        for i, e in enumerate(part):
            ids[i, : len(e)] = torch.tensor(e)
            labels[i, : len(e)] = torch.tensor(e)
        out.append((ids, labels))
    return out


def nll_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=ids, attention_mask=(labels != -100).long() if (labels == -100).any() else None).logits[:, :-1]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def fact_accuracy(model, tok, facts: list[tuple[str, str, str]]) -> dict[str, float]:
    answers = generate(model, tok, [p for _, p, _ in facts], max_new_tokens=12, batch_size=128)
    ok: dict[str, list[bool]] = defaultdict(list)
    for (kind, _, a), g in zip(facts, answers):
        ok[kind].append(exact_match(g, a))
    return {k: sum(v) / len(v) for k, v in ok.items()}


def perplexities(model, tok, sets: dict[str, list[str]]) -> dict[str, float]:
    return {name: text_drift(model, [tok(t)["input_ids"][:WINDOW] for t in docs])["perplexity"] for name, docs in sets.items()}


def model_config(blocks: int, width: int, mlp_width: int, heads: int) -> dict:
    """The LLaMA configuration of a testbed (v1: 4 blocks of width 256, MLP 1,024, 4 heads)."""
    return dict(hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=blocks, num_attention_heads=heads,
                num_key_value_heads=heads, max_position_embeddings=WINDOW, initializer_range=0.02,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)


def edit_blocks(blocks: int) -> dict[str, list[int]]:
    """The blocks each family edits, placed as at LLaMA-3-8B (32 blocks): CrispEdit, ft and
    nullspace at 60–75% of the depth (19–23 of 32), MEMIT and AlphaEdit at 12–25% (4–8 of 32).
    The 4-block testbed v1 keeps the blocks it was measured with: all four, and 0–1."""
    if blocks == 4:
        return {"crispedit": [0, 1, 2, 3], "closed_form": [0, 1]}
    lo, hi = round(0.6 * blocks), round(0.72 * blocks)  # 19–23 of 32, 5–6 of 8
    clo, chi = round(0.125 * blocks), round(0.25 * blocks)  # 4–8 of 32, 1–2 of 8
    return {"crispedit": list(range(lo, max(lo, hi) + 1)), "closed_form": list(range(clo, max(clo, chi) + 1))}


def train(model, tok, stream: torch.Tensor, sentences: list[str], a, rng: random.Random, eval_sets: dict[str, list[str]],
          checkpoint: Path | None = None, every: int = 200, stop_after: int | None = None) -> tuple[list[dict], float, float]:
    """AdamW with warm-up and cosine decay; each step reads ``a.text_batch`` windows of the text
    stream and ``a.fact_batch`` fact sentences. Returns (log, wall seconds, CPU seconds).

    Every ``every`` steps the whole state (model, optimiser, schedule, both random generators, log,
    elapsed time) goes to ``checkpoint`` (written to a temporary name, then renamed); a run that
    finds one continues from it and ends in the weights an uninterrupted run ends in.
    ``stop_after`` (tests) returns after that many steps, as a killed process would stop."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))))
    key = {k: getattr(a, k) for k in ("steps", "text_batch", "fact_batch", "lr", "weight_decay", "seed")} | {
        "config": {k: v for k, v in model.config.to_dict().items() if k in ("hidden_size", "intermediate_size",
                                                                          "num_hidden_layers", "num_attention_heads", "vocab_size")}}
    start, log, wall0, cpu0 = 0, [], 0.0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["key"] != key:
            sys.exit(f"{checkpoint}: a checkpoint of another build ({state['key']}); remove it or build with those settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        rng.setstate(state["rng"])
        start, log, wall0, cpu0 = state["step"], state["log"], state["wall_s"], state["cpu_s"]
        log.append({"resumed_at": start})
        print(f"resuming from {checkpoint} at step {start}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(start, a.steps):
        if stop_after is not None and step >= stop_after:
            break
        model.train()
        starts = torch.randint(0, len(stream) - WINDOW, (a.text_batch,)).tolist()
        ids = torch.stack([stream[s : s + WINDOW] for s in starts]).to(device)
        loss_text, n = nll_sum(model, ids, ids)
        (loss_text / n).backward()
        total, count = 0.0, 0
        chunks = fact_batches(tok, rng.sample(sentences, a.fact_batch), 4)
        tokens = sum(int((lab[:, 1:] != -100).sum()) for _, lab in chunks)
        for fids, flab in chunks:
            l, k = nll_sum(model, fids.to(device), flab.to(device))
            (l / tokens).backward()
            total += l.item()
            count += k
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == a.steps - 1:
            entry = {"step": step, "text_loss": loss_text.item() / n, "fact_loss": total / count,
                     "wall_s": wall0 + time.perf_counter() - t0}
            if step % 600 == 0 or step == a.steps - 1:
                model.eval()
                entry["perplexity"] = perplexities(model, tok, {k: v[:40] for k, v in eval_sets.items()})
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < a.steps:
            state = {"key": key, "step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "schedule": sched.state_dict(), "torch_rng": torch.get_rng_state(), "rng": rng.getstate(), "log": log,
                     "wall_s": wall0 + time.perf_counter() - t0, "cpu_s": cpu0 + time.process_time() - c0}
            torch.save(state, checkpoint.with_name(checkpoint.name + ".tmp"))
            os.replace(checkpoint.with_name(checkpoint.name + ".tmp"), checkpoint)
    return log, wall0 + time.perf_counter() - t0, cpu0 + time.process_time() - c0


def sha256_dir(path: Path) -> str:
    """SHA-256 over the names and bytes of the files that define a testbed (not build.json)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name != "build.json"):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def write_testbed(out: Path, model, tok, edit_pool: list[dict], unedited: list[dict], curvature: list[str],
                  heldout: list[str], report: dict) -> None:
    """The testbed directory ``bench_testbed.py`` reads: model, tokenizer, both pools (JSON Lines), both
    corpora (a document a line) and ``build.json`` (``report`` with the hash of the rest), written to a
    temporary directory that becomes ``out`` when complete."""
    with TempDir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, recs in (("edit.jsonl", edit_pool), ("unedited.jsonl", unedited)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        for name, docs in (("curvature.txt", curvature), ("heldout.txt", heldout)):
            (tmp / name).write_text("".join(d + "\n" for d in docs), encoding="utf-8")
        report["testbed_sha256"] = sha256_dir(tmp)
        (tmp / "build.json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output directory (default ~/.cache/crispedit/testbeds/counterfact-wikitext-s{seed})")
    ap.add_argument("--edit-pool", type=int, default=3300, help="records offered for editing (split by subject)")
    ap.add_argument("--unedited", type=int, default=700, help="records trained but never edited")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--text-batch", type=int, default=2, help="text windows of 512 tokens per step")
    ap.add_argument("--fact-batch", type=int, default=160, help="fact sentences per step")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=4, help="transformer blocks (v1: 4; v2: 8)")
    ap.add_argument("--width", type=int, default=256, help="hidden size")
    ap.add_argument("--mlp-width", type=int, default=1024, help="MLP hidden size (the d_in of down_proj)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints of an unfinished build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model trains (evaluation runs on the CPU)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    config = model_config(a.blocks, a.width, a.mlp_width, a.heads)
    name = f"counterfact-wikitext-s{a.seed}" if a.blocks == 4 else f"counterfact-wikitext-b{a.blocks}-w{a.width}-s{a.seed}"
    out = Path(a.out).expanduser().resolve() if a.out else DEFAULT_OUT / name
    if out.exists() and not a.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it")
    if not SHARED.exists():
        sys.exit(f"{SHARED} not present: the testbed is built from ../shared/data")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    t_start = time.perf_counter()
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible")
        torch.backends.cuda.matmul.allow_tf32 = False  # the build's numbers are float32 wherever it runs
        torch.backends.cudnn.allow_tf32 = False

    wiki_train, wiki_held, bible = split_text(a.seed)
    counterfact = SHARED / "counterfact" / "counterfact-edit-8k.json"
    records = json.loads(counterfact.read_text(encoding="utf-8"))
    edit_pool, unedited, facts_report = select_facts(records, a.edit_pool, a.unedited, a.seed)
    facts = statements(edit_pool) + statements(unedited)
    sentences = sorted({edit_text(p, ans) + "." for _, p, ans in facts})
    print(json.dumps(facts_report), f"{len(sentences)} distinct fact sentences", flush=True)

    work = out.with_name(f".{out.name}.build")  # checkpoint and tokenizer of an unfinished build
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizer.json").exists():
        train_tokenizer(wiki_train + bible + sentences, a.vocab).save_pretrained(str(work))
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(work))  # read back in every run, so a resumed one tokenizes alike
    curv_rng = random.Random(a.seed + 1)
    candidates = [p for p in wiki_train if len(p.split()) >= 40]
    curvature = curv_rng.sample(candidates, CURVATURE_DOCS)
    heldout = [p for p in wiki_held if len(p.split()) >= 20]
    stream: list[int] = []
    for enc in tok(wiki_train + bible)["input_ids"]:
        stream.extend(enc)
    stream = torch.tensor(stream)
    print(f"training text: {len(stream):,} tokens; vocab {len(tok)}", flush=True)

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **config)).to(torch.device(a.device))
    eval_sets = {"train_wikitext": rng.sample(wiki_train, EVAL_DOCS), "heldout_wikitext": heldout[:EVAL_DOCS]}
    t_train = time.perf_counter()
    log, train_wall, train_cpu = train(model, tok, stream, sentences, a, rng, eval_sets, work / "checkpoint.pt", a.checkpoint_every)
    t_after = time.perf_counter()
    model.eval()
    model.to("cpu")

    accuracy = {"edit_pool": fact_accuracy(model, tok, statements(edit_pool)),
                "unedited_pool": fact_accuracy(model, tok, statements(unedited))}
    baseline = {"edit_pool": majority_baseline(edit_pool), "unedited_pool": majority_baseline(unedited)}
    ppl = perplexities(model, tok, eval_sets)
    report = {
        "script": "benchmarks/build_testbed.py", "args": vars(a) | {"out": str(out)}, "config": config,
        "shape": {"blocks": a.blocks, "width": a.width, "mlp_width": a.mlp_width, "heads": a.heads},
        "edit_blocks": edit_blocks(a.blocks), "vocab": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
        "inputs_sha256": {str(p.relative_to(SHARED)): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in (counterfact, SHARED / "wikitext-2" / "valid.txt", SHARED / "wikitext-2" / "test.txt",
                                    SHARED / "general" / "world-english-bible.txt")},
        "text": {"wikitext_train_paragraphs": len(wiki_train), "wikitext_heldout_paragraphs": len(wiki_held),
                 "bible_paragraphs": len(bible), "training_tokens": len(stream),
                 "text_tokens_seen": a.steps * a.text_batch * WINDOW, "epochs_of_text": a.steps * a.text_batch * WINDOW / len(stream),
                 "curvature_documents": len(curvature), "heldout_documents": len(heldout)},
        "facts": facts_report | {"fact_sentences": len(sentences), "exposures_per_sentence": a.steps * a.fact_batch / len(sentences)},
        "fact_accuracy_by_generation": accuracy, "majority_baseline_by_template": baseline,
        "perplexity": ppl, "heldout_over_train_perplexity": ppl["heldout_wikitext"] / ppl["train_wikitext"],
        "train_wall_s": train_wall, "train_cpu_s": train_cpu, "log": log,
        # total over every resumed run: set-up and finish of this run plus the training time of all runs
        "total_wall_s": (t_train - t_start) + train_wall + (time.perf_counter() - t_after),
    }
    print(json.dumps({k: report[k] for k in ("facts", "fact_accuracy_by_generation", "majority_baseline_by_template",
                                             "perplexity", "heldout_over_train_perplexity")}, indent=2))

    write_testbed(out, model, tok, edit_pool, unedited, curvature, heldout, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"trained in {train_wall / 60:.1f} min wall, {train_cpu / 60:.1f} CPU-min -> {out}")


if __name__ == "__main__":
    main()

"""Does a model read a fact through its subject's last token when each subject has many facts? A pilot
for a testbed on which MEMIT's premise holds (issue 19).

Both CounterFact testbeds give 97% of their subjects one fact, and causal tracing (bench_trace.py)
finds that they answer by reading the subject's tokens directly from the answer position: nothing
rewards building a representation of the subject at its last token. An LLM knows hundreds of facts
about a subject. This pilot trains tiny LLaMAs on synthetic facts — the same number of facts, one per
subject or ``K`` per subject — and measures, per model, what the testbeds were measured by:

- causal tracing (``bench_trace.trace``): the share of a fact recovered by putting back the clean state
  at the last subject token, at every subject token, and at the prompt's last token, per block;
- MEMIT's target optimisation at an early block (``compute_targets``; the settings of
  ``bench_reach.py`` without context prefixes): mean P(target) at ``z`` and the share at 0.9 or more.
  The requests are statements under both templates, so about half end with the subject (testbed v3,
  ``build_synthetic.py``, edits subject-first prompts only).

    python benchmarks/bench_compose.py [--facts 2000] [--per-subject 1 8] [--blocks 6] [--steps 4000]
    python benchmarks/bench_compose.py --per-subject 8 --bios --facts 800 --batch 128 --steps 1500

``--bios``: Allen-Zhu and Li (arXiv 2309.14316) found that a model stores a person's attributes in the
hidden states of the name's tokens only when its training text is augmented — each biography's
sentences shuffled and paraphrased — and the model is then asked about people it saw only in
biographies. So: every subject's facts as one shuffled text (the name once, 'they' after, each
sentence under one of its two templates), the statements of half the subjects beside them, and the
other half's statements — facts the model can know only by extracting them from the biographies —
scored, traced and edited (those it answers).

Subjects are three made-up syllables (every triple distinct, so no single syllable names one); eight
relations, each with a subject-first and a relation-first template and twenty answers of its own;
every fact's answer drawn at random. Training: next-token loss on whole statements, both templates,
AdamW, until greedy answers are right for 99% of the statements (with ``--bios``: of the held-out
half's) or ``--steps``. Results: ``benchmarks/results/compose.json`` (``compose-bios.json``); each
trained model is cached under ``~/.cache/crispedit/compose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_reach import SETTINGS  # noqa: E402
from bench_testbed import CACHE, cpu_model, digest  # noqa: E402
from bench_trace import trace  # noqa: E402
from common import timed, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.layers import decoder_blocks  # noqa: E402
from crispedit.memit import MemitConfig, compute_targets  # noqa: E402
from crispedit.requests import EditRequest, edit_text  # noqa: E402

SYLLABLES = [c + v for c in "bdgklmnprstvz" for v in "aiou"][:24]
RELATIONS = {  # relation: (subject-first template, relation-first template, answer stem)
    "born": ("{} was born in", "the birthplace of {} is", "town"),
    "speaks": ("{} speaks", "the language of {} is", "tongue"),
    "works": ("{} works as a", "the job of {} is", "job"),
    "plays": ("{} plays the", "the instrument of {} is", "instrument"),
    "lives": ("{} lives in", "the home of {} is", "land"),
    "likes": ("{} likes to eat", "the favourite food of {} is", "food"),
    "owns": ("{} owns a", "the pet of {} is", "pet"),
    "studies": ("{} studies", "the subject of {} is", "field"),
}
ANSWERS = 20  # per relation


def facts(n: int, per_subject: int, seed: int = 0, joined: bool = False) -> list[tuple[str, str, str]]:
    """``n`` facts (subject, relation, answer): ``n // per_subject`` subjects of three distinct-triple
    syllables, each with ``per_subject`` different relations, every answer drawn at random. ``joined``:
    each subject's syllables written as one word (one token: give ``tokenizer`` the subjects as extra
    words), the same world otherwise."""
    rng = random.Random(seed)
    triples = rng.sample([(a, b, c) for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES], n // per_subject)
    out = []
    for t in triples:
        for rel in rng.sample(sorted(RELATIONS), per_subject):
            out.append(("".join(t) if joined else " ".join(t), rel, f"{RELATIONS[rel][2]}{rng.randrange(ANSWERS)}"))
    return out


def statements(fs) -> list[tuple[str, str, str]]:
    """(prompt, subject, answer) under both templates of every fact."""
    return [(tpl.format(s), s, a) for s, rel, a in fs for tpl in RELATIONS[rel][:2]]


def other_answer(answer: str) -> str:
    """The next answer of the same relation ('town7' -> 'town8'): an edit's new target."""
    stem, i = re.fullmatch(r"(\D+)(\d+)", answer).groups()
    return f"{stem}{(int(i) + 1) % ANSWERS}"


def tokenizer(extra: tuple[str, ...] = ()):
    """A word-level fast tokenizer (with offsets) over every word the statements use, then ``extra``
    words, adding BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(SYLLABLES) | {w for t in RELATIONS.values() for w in (t[0] + " " + t[1]).replace("{}", "").split()}
                   | {f"{t[2]}{i}" for t in RELATIONS.values() for i in range(ANSWERS)})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words + list(extra))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def model_for(tok, blocks: int, width: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def accuracy(model, tok, rows, batch: int = 512) -> float:
    """The share of statements whose answer (one token) is the argmax after the prompt."""
    return sum(answered(model, tok, rows, batch)) / len(rows)


def answered(model, tok, rows, batch: int = 512) -> list[bool]:
    """Per statement, whether its answer (one token) is the argmax after the prompt."""
    right = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            enc = [tok(p)["input_ids"] for p, _, _ in chunk]
            width = max(map(len, enc))
            ids = torch.tensor([e + [2] * (width - len(e)) for e in enc])
            logits = model(input_ids=ids).logits
            pred = logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])].argmax(-1)
            gold = torch.tensor([tok.convert_tokens_to_ids(a) for _, _, a in chunk])
            right += (pred == gold).tolist()
    return right


def bio(fs_of_subject, rng: random.Random) -> str:
    """A subject's facts as one text, in a shuffled order, each under one of its two templates drawn at
    random; the name in the first sentence, 'they' in the others (the bioS multi+permute augmentation of
    Allen-Zhu and Li, arXiv 2309.14316)."""
    order = rng.sample(fs_of_subject, len(fs_of_subject))
    return " ".join(f"{rng.choice(RELATIONS[rel][:2]).format(s if i == 0 else 'they')} {a} ." for i, (s, rel, a) in enumerate(order))


def train(model, batch_of, check, steps: int, lr: float, log, until: float = 0.99, checkpoint: Path | None = None,
          every: int = 250) -> dict:
    """Next-token loss on the token lists ``batch_of(step)`` gives, AdamW with linear warm-up; every 250
    steps ``check()`` (an accuracy) is logged, and training stops once it reaches ``until``.

    ``checkpoint``: every ``every`` steps the model, the optimiser and the log go there (a temporary
    name, then renamed); a run that finds one continues from it. With a ``batch_of`` that depends on
    the step alone (no generator carried from step to step), the resumed run ends in the weights an
    uninterrupted one ends in."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    done, acc, start, history = 0, 0.0, 1, []
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, done, acc, history = state["step"] + 1, state["step"], state["accuracy"], state["history"]
        log(f"  resuming from {checkpoint} after step {state['step']}")
    model.train()
    for step in range(start, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 200)
        seqs = batch_of(step)
        width = max(map(len, seqs))
        labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
        loss = model(input_ids=labels.clamp(min=0), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = step
        if step % 250 == 0:
            model.eval()
            acc = check()
            model.train()
            history.append({"step": step, "loss": loss.item(), "accuracy": acc})
            log(f"  step {step}: loss {loss.item():.3f} accuracy {acc:.3f}")
            if acc >= until:
                break
        if checkpoint is not None and step % every == 0:
            tmp = checkpoint.with_name(checkpoint.name + ".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "accuracy": acc,
                        "history": history}, tmp)
            tmp.replace(checkpoint)
    model.eval()
    return {"steps": done, "accuracy": acc, "history": history}


def reach(model, tok, block: int, requests, settings: list[str]) -> dict:
    out = {}
    for name in settings:
        cfg = dataclasses.replace(MemitConfig(), **SETTINGS[name])
        wall, cpu, t = timed(lambda: compute_targets(model, tok, decoder_blocks(model)[1][block], requests, [[""]], cfg))
        probs = [loss["prob"] for loss in t.losses]
        out[name] = {"target_probability": sum(probs) / len(probs), "share_at_least_0.9": sum(p >= 0.9 for p in probs) / len(probs),
                     "share_above_half": sum(p > 0.5 for p in probs) / len(probs), "wall_s": wall, "cpu_s": cpu}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=2000)
    ap.add_argument("--per-subject", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--requests", type=int, default=64, help="facts traced; the first half of them also edited by reach")
    ap.add_argument("--edit-block", type=int, default=1, help="the block whose output MEMIT's targets are optimised at")
    ap.add_argument("--settings", nargs="+", default=["easyedit, no prefixes", "unbounded, no prefixes, 300 steps"],
                    choices=list(SETTINGS))
    ap.add_argument("--bios", action="store_true",
                    help="train on shuffled biographies of every subject and the statements of half of them; "
                         "trace and edit the other half's facts (known from the biographies only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default benchmarks/results/compose.json (compose-bios.json with --bios)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = tokenizer(("they", ".") if a.bios else ())
    results = {"version": __version__, "cpu": cpu_model(), "threads": a.threads, "facts": a.facts, "blocks": a.blocks,
               "width": a.width, "edit_block": a.edit_block, "noise": 3.0, "models": []}
    for k in a.per_subject:
        fs = facts(a.facts, k, a.seed)
        rows = statements(fs)
        model = model_for(tok, a.blocks, a.width, a.seed)
        gen, rng = torch.Generator().manual_seed(a.seed), random.Random(a.seed)
        if a.bios:  # bios of every subject, statements of half of them; scored on the other half's statements
            subjects = sorted({s for s, _, _ in fs})
            held = set(random.Random(a.seed + 2).sample(subjects, len(subjects) // 2))
            by_subject = {s: [f for f in fs if f[0] == s] for s in subjects}
            seen = [r for r in rows if r[1] not in held]
            rows = [r for r in rows if r[1] in held]  # what is traced and edited: facts learnt from bios only
            seen_ids = [tok(edit_text(p, x))["input_ids"] + [2] for p, _, x in seen]

            def batch_of(step):
                bios = [tok(bio(by_subject[s], rng))["input_ids"] + [2] for s in rng.choices(subjects, k=a.batch // 4)]
                return bios + [seen_ids[int(i)] for i in torch.randint(len(seen_ids), (a.batch // 2,), generator=gen)]
        else:
            seqs = [tok(edit_text(p, x))["input_ids"] + [2] for p, _, x in rows]

            def batch_of(step):
                return [seqs[int(i)] for i in torch.randint(len(seqs), (a.batch,), generator=gen)]
        key = [__version__, a.facts, k, a.blocks, a.width, a.steps, a.batch, a.lr, a.seed] + (["bios"] if a.bios else [])
        path = CACHE / "compose" / (digest(key) + ".pt")
        if path.exists():
            saved = torch.load(path)
            model.load_state_dict(saved["weights"])
            fit = saved["fit"]
        else:
            print(f"{k} fact(s) per subject{', bios' if a.bios else ''}: training", flush=True)
            wall, cpu, fit = timed(lambda: train(model, batch_of, lambda: accuracy(model, tok, rows), a.steps, a.lr,
                                                 lambda s: print(s, flush=True)))
            fit.update(wall_s=wall, cpu_s=cpu)
            if a.bios:
                fit["accuracy_statements_trained"] = accuracy(model, tok, seen)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"weights": model.state_dict(), "fit": fit}, tmp := path.with_name(path.name + ".tmp"))
            tmp.replace(path)
        if a.bios:  # only the held-out facts the model extracts from its biographies
            rows = [r for r, ok in zip(rows, answered(model, tok, rows)) if ok]
            fit["held_out_known"] = len(rows)
        picked = random.Random(a.seed + 1).sample(range(len(rows)), min(a.requests, len(rows)))
        requests = [EditRequest(rows[i][0], other_answer(rows[i][2]), rows[i][1], ground_truth=rows[i][2]) for i in picked]
        traced = trace(model, tok, requests, noise=3.0)
        reached = reach(model, tok, a.edit_block, requests[: a.requests // 2], a.settings)
        entry = {"per_subject": k, "bios": a.bios, "subjects": a.facts // k, "statements": len(rows), "fit": fit,
                 "trace": {s: traced[f"recovered_{s}"] for s in ("last_subject", "subject", "last_prompt")},
                 "p_clean": traced["clean"], "p_noise_all": traced["noise_all"], "p_noise_last": traced["noise_last"],
                 "reach": reached}
        results["models"].append(entry)
        print(f"{k} per subject: accuracy {fit['accuracy']:.3f} after {fit['steps']} steps", flush=True)
        for s in ("last_subject", "subject", "last_prompt"):
            print(f"  restore {s:<13}" + " ".join(f"{x:+.2f}" for x in entry["trace"][s]), flush=True)
        for name, r in reached.items():
            print(f"  MEMIT targets at block {a.edit_block}, {name}: P(target) {r['target_probability']:.3f} "
                  f"(≥ 0.9: {r['share_at_least_0.9']:.2f})", flush=True)
        write_results(results, a.out or ROOT / "benchmarks" / "results" / f"compose{'-bios' if a.bios else ''}.json")


if __name__ == "__main__":
    main()

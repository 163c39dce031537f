"""Edit a real pretrained model nobody here trained: stories260K (issue 4, §3).

The edit set comes from the model's own knowledge: for prompt frames about a noun ("Once upon a
time, there was a little cat named" -> "Tom"), each with a rephrased frame, a request is kept only
when the base model's greedy first word is the same under both frames (that word is the ground
truth). Per frame, two thirds of the valid nouns are edited (new target: another answer of the same
frame) and the rest are held back as locality prompts, checked the same way. Capability: perplexity
and KL on held-out stories that the base model sampled itself (seeded); curvature from another
100 of its own samples.

    python benchmarks/bench_stories.py [--out benchmarks/results/stories260k.json]

Needs ../shared/models/stories260K; exits with a message when it is absent. Commits only aggregates.

Frames whose answer hardly depends on the noun are dropped (fewer than MIN_ANSWERS distinct
answers over all nouns): editing one noun there rewrites the frame for every noun.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "stories260K"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.curvature import collect  # noqa: E402
from crispedit.evaluate import generate, metric, prepare_reference  # noqa: E402
from crispedit.layers import find_modules  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.options import MethodOptions  # noqa: E402
from crispedit.requests import EditRequest  # noqa: E402
from crispedit.session import EditSession  # noqa: E402

NOUNS = ["girl", "boy", "cat", "dog", "bird", "bunny", "bear", "fish", "frog", "mouse", "duck", "lion", "puppy",
         "kitten", "owl", "fox", "pig", "horse", "cow", "sheep", "monkey", "elephant", "turtle", "squirrel",
         "princess", "king", "queen", "dragon", "robot", "car", "tree", "ball", "sun", "moon", "sky", "flower", "cake",
         "boat", "train", "truck", "bee", "butterfly", "snake", "spider", "ant", "mom", "dad", "teacher", "doctor",
         "baby", "giraffe", "tiger", "dinosaur", "ghost", "witch", "clown", "farmer", "pirate", "fairy", "snowman"]
FRAMES = [  # (prompt, rephrase); frames whose answer hardly depends on the noun ("The {} had a big" -> box
    # for 57 of 59) were tried and dropped: they have fewer than MIN_ANSWERS distinct answers
    ("Once upon a time, there was a little {} named", "One day, there was a little {} named"),
    ("She saw a {} in the", "He saw a {} in the"),
    ("The little {} liked to eat", "The little {} loved to eat"),
    ("The {} had a big", "The little {} had a big"),
]
MIN_ANSWERS = 5
SAMPLES, SAMPLE_TOKENS = 200, 128


def first_words(model, tok, prompts: list[str]) -> list[str]:
    return [(o.split() or [""])[0] for o in generate(model, tok, prompts, max_new_tokens=6)]


def build_requests(model, tok, seed: int) -> tuple[list[EditRequest], dict]:
    rng = random.Random(seed)
    requests, report = [], {}
    for k, (frame, rephrase) in enumerate(FRAMES):
        a = first_words(model, tok, [frame.format(n) for n in NOUNS])
        b = first_words(model, tok, [rephrase.format(n) for n in NOUNS])
        valid = [(n, x) for n, x, y in zip(NOUNS, a, b) if x == y and x.isalpha()]
        rng.shuffle(valid)
        cut = (2 * len(valid)) // 3
        edited, held = valid[:cut], valid[cut:]
        answers = sorted({x for _, x in valid})
        report[frame] = {"valid": len(valid), "edited": len(edited), "locality": len(held), "answers": len(answers)}
        if not held or len(answers) < MIN_ANSWERS:
            report[frame]["used"] = False
            continue
        report[frame]["used"] = True
        for i, (noun, truth) in enumerate(edited):
            new = rng.choice([x for x in answers if x != truth])
            loc_noun, loc_answer = held[i % len(held)]
            requests.append(EditRequest(frame.format(noun), new, noun, truth, [rephrase.format(noun)],
                                        [(frame.format(loc_noun), loc_answer)], f"{k}/{noun}"))
    return requests, report


def sampled_stories(model, tok, n: int, seed: int) -> list[list[int]]:
    """The base model's own stories (temperature 1), from a fixed seed."""
    torch.manual_seed(seed)
    ids = torch.tensor([tok("Once upon a time,")["input_ids"]] * n)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, max_new_tokens=SAMPLE_TOKENS, pad_token_id=tok.eos_token_id)
    docs = []
    for row in out.tolist():
        if tok.eos_token_id in row[1:]:
            row = row[: row.index(tok.eos_token_id, 1)]
        docs.append(row)
    return docs


def stories_benchmark(seed: int = 0, lrs: tuple[float, ...] = (5e-4, 2e-3)) -> dict:
    """Build the edit set, edit with every method at every learning rate, return the aggregates."""
    model, tok = load_model(str(MODEL), "cpu", "float32")
    modules = find_modules(model, "auto")
    requests, frames = build_requests(model, tok, seed)
    stories = sampled_stories(model, tok, SAMPLES, seed)
    curvature_docs, heldout = stories[: SAMPLES // 2], stories[SAMPLES // 2 :]
    known = [EditRequest(r.locality[0][0], r.locality[0][1], case_id=r.case_id) for r in requests]
    stats = collect(model, modules, curvature_docs, labels="sampled", seed=seed)
    ref = prepare_reference(model, tok, requests, "raw", heldout, curvature_docs, known)
    rows = []
    for lr in lrs:
        for method, gamma in [("ft", None), ("crispedit", 0.8), ("nullspace", 0.8), ("crispedit", 0.9), ("crispedit", 0.95)]:
            t0 = time.perf_counter()
            session = EditSession.start(model, tok, modules, MethodOptions(method=method, gamma=gamma, lr=lr, seed=seed), stats)
            record = session.edit(requests)
            after = session.measure(ref)
            session.restore_base()
            cap, drift = after["capability"], record["drift"]["total"]
            rows.append({"method": method, "gamma": gamma or 0.0, "lr": lr, "steps": record["steps"], "epochs": record["epochs"],
                         "edit_seconds": time.perf_counter() - t0,
                         **{f"{m}/{p}": metric(after, m, p) for m in ("reliability", "generalization", "locality_agreement", "locality_accuracy")
                            for p in ("generation", "teacher_forced")},
                         "heldout_perplexity_change": cap["heldout_perplexity_change"], "heldout_kl": cap["heldout_kl"],
                         "corpus_kl": cap["corpus_kl"], "predicted_kl": drift["predicted_kl"],
                         "known_facts_accuracy": cap["known_facts_accuracy"], "relative_change": drift["relative_change"]})
            r = rows[-1]
            print(f"lr {lr:g} {method:>9} {r['gamma']:4.2f}: reliability {r['reliability/generation']:.3f} "
                  f"rephrase {r['generalization/generation']:.3f} locality {r['locality_agreement/generation']:.3f} "
                  f"known {r['known_facts_accuracy']:.3f} KL {r['heldout_kl']:.4f} (pred. {r['predicted_kl']:.4f}) "
                  f"ppl {r['heldout_perplexity_change']:+.2%} steps {r['steps']}", flush=True)
    return {
        "version": __version__, "model": "stories260K", "model_sha256": hashlib.sha256((MODEL / "model.safetensors").read_bytes()).hexdigest(),
        "seed": seed, "threads": torch.get_num_threads(), "layers": list(modules), "frames": frames, "requests": len(requests),
        "known_locality_prompts": len(ref.known_facts), "curvature_tokens": stats.meta["tokens"],
        "heldout_documents": len(heldout), "heldout_perplexity_base": ref.before["capability"]["heldout_perplexity"],
        "base": {m: metric(ref.before, m) for m in ("reliability", "generalization", "locality_agreement", "locality_accuracy")},
        "schedule": "SPEC 1.6: Adam, batch 32, up to 25 epochs, loss threshold 1e-2", "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stories260k.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, nargs="+", default=[5e-4, 2e-3])
    a = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} not present: this benchmark needs ../shared/models/stories260K")
    torch.set_num_threads(a.threads)
    print(f"-> {write_results(stories_benchmark(a.seed, tuple(a.lr)), a.out)}")


if __name__ == "__main__":
    main()

"""Train the demo model: a small LLaMA that knows the facts of the demo world (``crispedit/world.py``).

    python scripts/build_demo_model.py [--steps 3000] [--out crispedit/demo_model]

Word-level tokenizer over the world's vocabulary, LLaMA architecture (8 blocks, width 128, ~1.9M
parameters), AdamW with cosine decay; each step sees 48 fact sentences alone (the two trained
templates) and 12 training documents (narrative with fact sentences mixed in). At the end it checks the facts by greedy generation (the demo needs
≥ 95%) and writes the checkpoint, the tokenizer and ``build.json`` (hyper-parameters, timings and
what the model learned) into ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crispedit.evaluate import exact_match, generate, text_drift  # noqa: E402
from crispedit.world import RELATIONS, TRAINED_TEMPLATES, build_world, fact_text, vocabulary  # noqa: E402

CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.02,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)


def make_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, enc))
    ids = torch.full((len(enc), T), 2)
    labels = torch.full((len(enc), T), -100)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        labels[i, : len(e)] = torch.tensor(e)
    return ids, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "crispedit" / "demo_model"))
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it")
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    world = build_world()
    tok = make_tokenizer(vocabulary(world))
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **CONFIG))
    facts = [fact_text(f, t) for f in world.facts for t in range(TRAINED_TEMPLATES)]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))))
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    model.train()
    for step in range(a.steps):
        loss = 0.0
        for texts in (rng.sample(facts, 48), rng.sample(world.train_documents, 12)):
            ids, labels = batch(tok, texts)
            l = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            l.backward()
            loss += l.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss:.3f}  {time.perf_counter() - start_wall:.0f} s", flush=True)
    train_wall, train_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    model.eval()

    report = {}
    for t in range(3):
        prompts = [f.prompt(t) for f in world.facts]
        answers = generate(model, tok, prompts)
        ok = [exact_match(g, f.object) for g, f in zip(answers, world.facts)]
        report[f"template_{t}_{'trained' if t < TRAINED_TEMPLATES else 'held_out'}"] = sum(ok) / len(ok)
    majority = {}
    for r, (_, objs) in RELATIONS.items():
        counts = [sum(f.object == o for f in world.facts if f.relation == r) for o in objs]
        majority[r] = max(counts) / sum(counts)
    ppl = {}
    for name, docs in (("train_documents", world.train_documents[:300]), ("heldout_narrative", world.heldout_narrative)):
        ids = [tok(d)["input_ids"] for d in docs]
        ppl[name] = text_drift(model, ids)["perplexity"]
    known = report["template_0_trained"]
    print(json.dumps({"facts_known": report, "majority_baseline": majority, "perplexity": ppl}, indent=2))

    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".demo_model."))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps({
        "script": "scripts/build_demo_model.py", "args": vars(a), "config": CONFIG, "vocab": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_wall_s": train_wall, "train_cpu_s": train_cpu, "threads": torch.get_num_threads(),
        "facts_known_by_generation": report, "per_relation_majority_baseline": majority, "perplexity": ppl,
        "passes_95_check": known >= 0.95 and report["template_1_trained"] >= 0.95,
    }, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"facts known (template 0): {known:.1%}; trained in {train_wall / 60:.1f} min wall, "
          f"{train_cpu / 60:.1f} CPU-min -> {out}")


if __name__ == "__main__":
    main()

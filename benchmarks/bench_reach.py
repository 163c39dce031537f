"""Do MEMIT's target values reach their targets on a testbed? Target optimisation alone (no update)
at the last block the closed-form editors edit (``build.json``'s ``edit_blocks``), under several
settings, before a comparison with MEMIT and AlphaEdit is called fair (issue 19: mean P(target) at
the optimised residual at least 0.9).

    python benchmarks/bench_reach.py [--testbed DIR] [--requests 64] [--block K] [--settings NAME ...]
                                     [--max-subject-tokens K]

Per setting: the mean and the share above 0.5 of P(target) at ``z`` (the model with the residual
added at the subject, before any weight changes), the steps taken, wall and CPU seconds; each setting
is cached under ``~/.cache/crispedit/bench/reach/`` (a rerun computes only new settings). Results:
``benchmarks/results/memit-reach-<testbed>.json`` (``-block<K>`` added for another block than the
last closed-form one, ``-subject<K>`` for ``--max-subject-tokens``; with ``--settings``, only those
settings' rows). Each row also holds every request's P(target) beside its subject's token count, and
the mean by that count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import CACHE, CLOSED_FORM_SETTINGS, cached, cpu_model, default_testbed, digest  # noqa: E402
from common import timed, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.layers import decoder_blocks  # noqa: E402
from crispedit.memit import MemitConfig, compute_targets, context_prefixes, subject_tokens  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.requests import read_requests  # noqa: E402

# the authors' LLaMA-3-8B settings, EasyEdit's, and longer optimisations of both
SETTINGS = {
    "authors": {},
    "easyedit": CLOSED_FORM_SETTINGS["easyedit"],
    "authors, 100 steps": {"v_num_grad_steps": 100},
    "easyedit, 100 steps": {**CLOSED_FORM_SETTINGS["easyedit"], "v_num_grad_steps": 100},
    "authors, clamp 4, 100 steps": {"clamp_norm_factor": 4.0, "v_num_grad_steps": 100},
    "easyedit, clamp 10, 200 steps": {**CLOSED_FORM_SETTINGS["easyedit"], "clamp_norm_factor": 10.0, "v_num_grad_steps": 200},
    # the ceiling: the residual nearly unbounded (clamp 100), no KL or decay term, 300 steps
    "unbounded, 300 steps": {"v_lr": 0.5, "clamp_norm_factor": 100.0, "v_weight_decay": 0.0, "kl_factor": 0.0,
                             "v_num_grad_steps": 300},
    # the same without MEMIT's generated context prefixes: the residual has to work on the plain prompt only
    "easyedit, no prefixes": {**CLOSED_FORM_SETTINGS["easyedit"], "prefix_count": 0},
    "unbounded, no prefixes, 300 steps": {"v_lr": 0.5, "clamp_norm_factor": 100.0, "v_weight_decay": 0.0, "kl_factor": 0.0,
                                          "v_num_grad_steps": 300, "prefix_count": 0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--block", type=int, default=None, help="the block whose output is optimised (default: the last closed-form block)")
    ap.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS), metavar="NAME",
                    help="run only these settings (default: all)")
    ap.add_argument("--max-subject-tokens", type=int, default=None, metavar="K",
                    help="only requests whose subject is at most K tokens (the first --requests of them)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    testbed = Path(a.testbed) if a.testbed else default_testbed()
    build = json.loads((testbed / "build.json").read_text())
    model, tok = load_model(str(testbed), "cpu", "float32")
    n_blocks = model.config.num_hidden_layers
    blocks = (build.get("edit_blocks") or {}).get("closed_form") or list(range(max(1, n_blocks // 2)))
    requests = read_requests(testbed / "edit.jsonl")
    lengths = [len(subject_tokens(tok, r.prompt, r.subject)[1]) for r in requests]
    chosen = [i for i, n in enumerate(lengths) if a.max_subject_tokens is None or n <= a.max_subject_tokens][: a.requests]
    requests, lengths = [requests[i] for i in chosen], [lengths[i] for i in chosen]
    target = blocks[-1] if a.block is None else a.block
    block = decoder_blocks(model)[1][target]
    rows = []
    for name, change in SETTINGS.items():
        if a.settings and name not in a.settings:
            continue
        def reach(change=change, name=name) -> dict:
            cfg = dataclasses.replace(MemitConfig(), **change)
            prefixes = context_prefixes(model, tok, 0, cfg.prefix_count, cfg.prefix_length, cfg.prefix_top_k)
            wall, cpu, t = timed(lambda: compute_targets(model, tok, block, requests, prefixes, cfg))
            probs = [loss["prob"] for loss in t.losses]
            plain = [loss["prob_plain"] for loss in t.losses]
            return {"setting": name, "changes": change, "target_probability": sum(probs) / len(probs),
                    "target_probability_plain_prompt": sum(plain) / len(plain),
                    "share_at_least_0.9_plain_prompt": sum(p >= 0.9 for p in plain) / len(plain),
                    "share_above_half": sum(p > 0.5 for p in probs) / len(probs),
                    "share_at_least_0.9": sum(p >= 0.9 for p in probs) / len(probs),
                    "steps": sum(t.steps), "wall_s": wall, "cpu_s": cpu,
                    "by_subject_tokens": {n: sum(p for p, m in zip(probs, lengths) if m == n) / lengths.count(n)
                                          for n in sorted(set(lengths))},
                    "per_request": [{"subject_tokens": n, "prob": p, "prob_plain": q} for n, p, q in zip(lengths, probs, plain)]}

        key = [__version__, build.get("testbed_sha256"), target, a.requests, change]
        cache = CACHE / "bench" / "reach" / (digest(key + ([a.max_subject_tokens] if a.max_subject_tokens else [])) + ".json")
        rows.append(cached(cache, reach))  # a rerun computes only the settings not made yet
        print(f"{name:<30} P(target) {rows[-1]['target_probability']:.3f} (> 0.5: {rows[-1]['share_above_half']:.2f}) "
              f"steps {rows[-1]['steps']} [{rows[-1]['wall_s']:.0f} s wall, {rows[-1]['cpu_s']:.0f} s CPU]", flush=True)
    suffix = ("" if target == blocks[-1] else f"-block{target}") + (f"-subject{a.max_subject_tokens}" if a.max_subject_tokens else "")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"memit-reach-{testbed.name}{suffix}.json"
    result = {"version": __version__, "cpu": cpu_model(), "threads": a.threads, "testbed": testbed.name,
              "testbed_sha256": build.get("testbed_sha256"), "blocks": n_blocks, "closed_form_blocks": blocks,
              "target_block": target, "requests": len(requests), "max_subject_tokens": a.max_subject_tokens,
              "subject_tokens": {n: lengths.count(n) for n in sorted(set(lengths))}, "rows": rows}
    print(f"-> {write_results(result, out)}")


if __name__ == "__main__":
    main()

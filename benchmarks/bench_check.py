"""The rehearsal check with and without its shortcut (``crispedit.prefix``): a teacher-forced forward
over the edit pool's prompts and targets, the whole model against the blocks from the first edited
one on (the states below computed once per edit, timed apart). On testbed v2 (8 blocks, CrispEdit at
blocks 5-6) the shortcut runs 3 of 8 blocks and the head.

    python benchmarks/bench_check.py [--testbed DIR] [--requests 1000] [--repeats 3]

Prints the ratio (minimum of ``--repeats`` alternated runs each, wall and CPU) and whether both give
the same predictions; writes ``benchmarks/results/check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import CACHE, cpu_model  # noqa: E402
from common import timed, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.evaluate import teacher_forced  # noqa: E402
from crispedit.layers import find_modules  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.prefix import PrefixCache, first_block  # noqa: E402
from crispedit.requests import read_requests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default=str(CACHE / "testbeds" / "counterfact-wikitext-b8-w256-s0"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "check.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    testbed = Path(a.testbed)
    if not (testbed / "build.json").exists():
        sys.exit(f"no testbed in {testbed}: build one with python benchmarks/build_testbed.py --blocks 8")
    build = json.loads((testbed / "build.json").read_text())
    blocks = build["edit_blocks"]["crispedit"]
    model, tok = load_model(str(testbed), "cpu", "float32")
    requests = read_requests(testbed / "edit.jsonl")[: a.requests]
    prompts, targets = [r.prompt for r in requests], [r.target_new for r in requests]
    cache = PrefixCache(model, first_block(model, list(find_modules(model, blocks))))
    with torch.no_grad():
        capture = timed(lambda: teacher_forced(model, tok, prompts, targets, prefix=cache))  # states captured, once per edit
        full, short = [], []
        for _ in range(a.repeats):  # alternated, so that a change of load falls on both
            full.append(timed(lambda: teacher_forced(model, tok, prompts, targets)))
            short.append(timed(lambda: teacher_forced(model, tok, prompts, targets, prefix=cache)))
    same = all(f[2] == s[2] for f, s in zip(full, short)) and capture[2] == full[0][2]
    agree = sum(p == q for p, q in zip(full[0][2], short[0][2])) / len(requests)
    best = {k: min(x[i] for x in runs) for k, runs, i in (("full_wall", full, 0), ("full_cpu", full, 1),
                                                          ("short_wall", short, 0), ("short_cpu", short, 1))}
    result = {"version": __version__, "cpu": cpu_model(), "threads": a.threads, "testbed": testbed.name,
              "blocks": model.config.num_hidden_layers, "edited_blocks": blocks, "first_block": cache.k,
              "requests": len(requests), "repeats": a.repeats, "verified": cache.verified,
              "relative_logit_difference": cache.last_difference, "same_predictions": same, "agreement": agree,
              "seconds": best, "first_run_with_capture": {"wall": capture[0], "cpu": capture[1]},
              "ratio_wall": best["short_wall"] / best["full_wall"], "ratio_cpu": best["short_cpu"] / best["full_cpu"]}
    print(f"check over {len(requests)} edits, {result['blocks']} blocks, from block {cache.k}: full {best['full_wall']:.2f} s, "
          f"shortcut {best['short_wall']:.2f} s (ratio {result['ratio_wall']:.2f} wall, {result['ratio_cpu']:.2f} CPU; "
          f"first run, capturing the states, {capture[0]:.2f} s); same predictions: {same}")
    print(f"-> {write_results(result, a.out)}")


if __name__ == "__main__":
    main()

"""MEMIT/AlphaEdit target optimisation: the output head on the loss positions only, against the
head on every position (what a model's forward does by default).

The same requests, prefixes and options both ways (the second with ``get_output_embeddings``
hidden, so every position's logits are formed); the targets must agree to float32 rounding.
Minimum of ``--reps`` interleaved runs, wall and CPU time, one thread by default.

    python benchmarks/bench_targets.py [--testbed DIR] [--requests 16] [--reps 3]

The testbed model (vocabulary 8,192 over width 256, the ratio of LLaMA-3-8B's 128,256 over 4,096)
when one is built, else the demo model shipped in the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import cpu_model, default_testbed  # noqa: E402
from common import timed, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.demo import MODEL_DIR, demo_requests  # noqa: E402
from crispedit.layers import decoder_blocks  # noqa: E402
from crispedit.memit import MemitConfig, compute_targets, context_prefixes  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.requests import read_requests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memit-targets.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    testbed = Path(a.testbed) if a.testbed else default_testbed()
    if (testbed / "build.json").exists():
        model, tok = load_model(str(testbed), "cpu", "float32")
        requests, block_index, source = read_requests(testbed / "edit.jsonl")[: a.requests], 1, f"testbed {testbed.name}"
    else:
        model, tok = load_model(str(MODEL_DIR), "cpu", "float32")
        requests, block_index, source = demo_requests(a.requests, 0)[0], 2, "demo model"
    block = decoder_blocks(model)[1][block_index]
    cfg = MemitConfig()  # the authors' settings: 25 steps, few requests stop early
    prefixes = context_prefixes(model, tok, 0, cfg.prefix_count, cfg.prefix_length, cfg.prefix_top_k)
    head = model.get_output_embeddings

    def full():
        model.get_output_embeddings = lambda: None  # every position's logits, as the model's forward gives them
        try:
            return compute_targets(model, tok, block, requests, prefixes, cfg)
        finally:
            del model.get_output_embeddings
            assert model.get_output_embeddings == head

    def picked():
        return compute_targets(model, tok, block, requests, prefixes, cfg)

    runs = {"picked": [], "full": []}
    out = {}
    for _ in range(a.reps):
        for name, fn in (("picked", picked), ("full", full)):
            wall, cpu, out[name] = timed(fn)
            runs[name].append({"wall_s": wall, "cpu_s": cpu})
    diff = float(((out["picked"].z - out["full"].z).norm(dim=1) / out["full"].z.norm(dim=1)).max())
    assert out["picked"].steps == out["full"].steps and diff < 1e-4, (diff, out["picked"].steps, out["full"].steps)
    best = {k: min(r["wall_s"] for r in v) for k, v in runs.items()}
    best_cpu = {k: min(r["cpu_s"] for r in v) for k, v in runs.items()}
    result = {
        "version": __version__, "cpu": cpu_model(), "threads": a.threads, "model": source,
        "vocab": model.config.vocab_size, "hidden": model.config.hidden_size, "requests": len(requests),
        "block": block_index, "steps": sum(out["picked"].steps), "runs": runs,
        "best_wall_s": best, "best_cpu_s": best_cpu, "speedup_wall": best["full"] / best["picked"],
        "speedup_cpu": best_cpu["full"] / best_cpu["picked"], "max_relative_z_difference": diff,
    }
    print(f"{source}, {len(requests)} requests, {result['steps']} steps: head on the loss positions "
          f"{best['picked']:.1f} s wall ({best_cpu['picked']:.1f} s CPU) vs every position {best['full']:.1f} s "
          f"({best_cpu['full']:.1f} s CPU): {result['speedup_wall']:.2f}x; targets agree to {diff:.1e}")
    print(f"-> {write_results(result, a.out)}")


if __name__ == "__main__":
    main()

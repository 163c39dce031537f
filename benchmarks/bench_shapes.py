"""What a testbed shape costs to build: CPU seconds of one training step of ``build_testbed.py``
(two 512-token text windows and 160 fact sentences, forward and backward, one thread) for the
candidate shapes of testbed v2, against today's 4 blocks of width 256 — the figures that chose v2.

    python benchmarks/bench_shapes.py [--repeats 3]

Random weights and token ids (the cost of a step does not depend on them); the minimum over repeats
of the mean of two steps, CPU time. Prints each shape's ratio to v1 and the build time it implies at
2,400 steps; writes ``benchmarks/results/testbed-shapes.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import cpu_model  # noqa: E402
from build_testbed import model_config  # noqa: E402
from common import write_results  # noqa: E402
from crispedit import __version__  # noqa: E402

SHAPES = {"v1: 4 blocks, width 256": (4, 256, 1024, 4), "8 blocks, width 256": (8, 256, 1024, 4),
          "6 blocks, width 256": (6, 256, 1024, 4), "8 blocks, width 192": (8, 192, 768, 4)}
VOCAB, WINDOW, TEXT_BATCH, FACTS, FACT_TOKENS, STEPS = 8192, 512, 2, 160, 16, 2400


def step_seconds(model, text: torch.Tensor, facts: torch.Tensor) -> float:
    """CPU seconds of one training step's forward and backward passes (as ``build_testbed.train``)."""
    t = time.process_time()
    model(input_ids=text, labels=text).loss.backward()
    for lo in range(0, len(facts), 40):
        model(input_ids=facts[lo : lo + 40], labels=facts[lo : lo + 40]).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - t


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "testbed-shapes.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = torch.randint(0, VOCAB, (TEXT_BATCH, WINDOW))
    facts = torch.randint(0, VOCAB, (FACTS, FACT_TOKENS))
    models = {k: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **model_config(*v))) for k, v in SHAPES.items()}
    best = {k: float("inf") for k in models}
    for _ in range(a.repeats):  # interleaved, so that a noisy neighbour hits every shape alike
        for k, m in models.items():
            best[k] = min(best[k], (step_seconds(m, text, facts) + step_seconds(m, text, facts)) / 2)
    v1 = best[next(iter(SHAPES))]
    rows = []
    for k, m in models.items():
        rows.append({"shape": k, "blocks_width_mlp_heads": SHAPES[k], "parameters": sum(p.numel() for p in m.parameters()),
                     "cpu_s_per_step": best[k], "ratio_to_v1": best[k] / v1, "build_cpu_hours": best[k] * STEPS / 3600})
        print(f"{k:<26} {rows[-1]['parameters'] / 1e6:5.1f}M  {best[k]:.2f} CPU-s/step  ×{best[k] / v1:.2f}  "
              f"{rows[-1]['build_cpu_hours']:.1f} CPU-h for {STEPS} steps", flush=True)
    result = {"version": __version__, "cpu": cpu_model(), "threads": 1, "repeats": a.repeats, "steps": STEPS, "rows": rows}
    print(f"-> {write_results(result, Path(a.out))}")


if __name__ == "__main__":
    main()

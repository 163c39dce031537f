"""The capability budget (``--budget``, ``crispedit/budget.py``): its cost by count at LLaMA-3-8B shapes, and what
it does, measured, against the per-step exact projection.

- Count: ``crispedit plan --budget`` at LLaMA-3-8B (5 ``down_proj`` matrices of 4096 × 14336), bf16 and
  float32 weights: the budget's flops per step (while it holds; a step that cuts; the worst mean over any
  ``EXACT_EVERY`` steps) against the forward + backward of a 32-request batch (6 · params · tokens), next
  to the per-step exact projection (a rotation in every step, and one back when it binds).
- Time of one call of each path, measured on this CPU (one thread) at 1/8 of the 8B shape (random
  eigenbases: time does not depend on the values), exact projection against the budget's paths.
- Edits: the tiny test LLaMA (the toy) and the shipped demo model, float32 and bf16, unconstrained, with the
  per-step exact projection of the masters (``ExactBudget``, the behaviour before) and with
  ``CapabilityBudget``, at a budget of ``SHARES`` × the unconstrained edit's drift: the largest predicted drift
  of the *saved* weights after any step (float64 eigenvectors), the final edit loss, the distance of the
  final weights from the exact projection's, the budget's own wall and CPU seconds, and what it did.

    python benchmarks/bench_budget.py [--threads 2] [--out benchmarks/results/budget.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402

from crispedit import budget as B  # noqa: E402

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False}
SHARES = (0.3, 0.7)  # budget / the unconstrained edit's largest predicted drift
TIMING_SHAPE = (512, 1792)  # 1/8 of 4096 × 14336 on each side
REPS = 5


def count() -> dict:
    from crispedit.plan import plan

    out = {}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA3_8B))
        for dtype in ("bfloat16", "float32"):
            p = plan(d, dtype=dtype, budget=0.05)
            f, fb = p["flops"]["budget"], p["flops"]["forward_backward"]
            rot = sum(m["rotation"] for m in f["per_matrix"].values())
            out[dtype] = {
                "forward_backward": fb, "worst": f["worst"], "certified": f["certified"],
                "cut_step": sum(m["step"] for m in f["per_matrix"].values()), "exact_step": f["exact_step"],
                "exact_every": f["exact_every"], "worst_over_forward_backward": f["worst"] / fb,
                "certified_over_forward_backward": f["certified"] / fb,
                "per_step_exact_projection": {"holds": rot, "binds": 2 * rot, "holds_over_forward_backward": rot / fb,
                                              "binds_over_forward_backward": 2 * rot / fb},
                "memory_kept": p["memory"]["state"]["budget"],
                "memory_step_scratch":
                    p["memory"]["phases"]["edit_step"]["moments"]["budget_step"]["parts"]["budget_scratch"],
                "K_G_K_A": [next(iter(f["per_matrix"].values()))[k] for k in ("K_G", "K_A")],
            }
    return out


def timing() -> dict:
    """Seconds of one call per path at TIMING_SHAPE (float32, one matrix), minimum of REPS."""
    o, n = TIMING_SHAPE
    g = torch.Generator().manual_seed(0)
    U_A, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    U_G, _ = torch.linalg.qr(torch.randn(o, o, generator=g))
    alpha = torch.arange(1, n + 1, dtype=torch.float32) ** -1.2
    beta = torch.arange(1, o + 1, dtype=torch.float32) ** -0.6
    base = torch.randn(o, n, generator=g)
    master = base + 1e-2 * torch.randn(o, n, generator=g)
    bases, W0, conv = {"w": (U_A, alpha, U_G, beta)}, {"w": base}, {"w": False}
    q = B.ExactBudget(1.0, bases, W0, conv).predicted({"w": master})

    def best(make, eps, prepare=None):  # (wall, CPU) seconds, each the least of REPS calls, one thread
        walls, cpus = [], []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(REPS):
                budget, w = make(), {"w": master.clone()}
                if prepare:
                    prepare(budget, w)
                budget.eps = eps
                t, c = time.perf_counter(), time.process_time()
                budget(w, {"w": master.clone()})
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
        finally:
            torch.set_num_threads(threads)
        return {"wall_s": min(walls), "cpu_s": min(cpus)}, budget

    def anchored(budget, w):  # an anchor from an exact step at the current weights, then a further move
        budget.eps = 10 * q
        budget._exact(w)
        w["w"] += 1e-3 * torch.randn(o, n, generator=torch.Generator().manual_seed(1))

    cap = lambda: B.CapabilityBudget(1.0, bases, W0, conv)  # noqa: E731
    out = {"shape": [o, n]}
    out["exact_projection_holds"], _ = best(lambda: B.ExactBudget(1.0, bases, W0, conv), 10 * q)
    out["exact_projection_binds"], _ = best(lambda: B.ExactBudget(1.0, bases, W0, conv), 0.5 * q)
    out["budget_certified"], b = best(cap, 10 * q)
    assert b.counts["cuts"] == 0 and b.counts["exact"] == 0
    out["budget_exact_and_cut"], b = best(cap, 0.95 * q)
    out["budget_exact_and_cut_counts"] = dict(b.counts)
    out["budget_cut"], b = best(cap, 0.95 * q, anchored)
    out["budget_cut_counts"] = dict(b.counts)  # the one exact step is the preparation's
    return out


def edits(threads: int) -> dict:
    from crispedit.curvature import collect
    from crispedit.demo import CURVATURE_DOCS, MODEL_DIR, _documents, demo_requests
    from crispedit.editor import EditOptimizer, run_epochs
    from crispedit.layers import find_modules
    from crispedit.model import load_model
    from crispedit.options import MethodOptions
    from crispedit.projector import eigh_factor
    from crispedit.session import EditSession
    from crispedit.world import build_world
    from models import char_tokenizer, tiny_hf
    from test_budget import CORPUS, REQUESTS

    def setups(dtype):
        tok = char_tokenizer()
        model = tiny_hf("llama", layers=3, std=0.1, dtype=dtype, seed=0)
        modules = find_modules(model, [1, 2])
        stats = collect(model, modules, CORPUS, labels="sampled", mc_samples=1)
        yield ("toy", model, tok, modules, stats, REQUESTS[:4],
               dict(lr=3e-2, epochs=10, batch_size=4, method="ft", loss_threshold=0.0))
        model, tok = load_model(str(MODEL_DIR), "cpu", {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
        world = build_world()
        modules = find_modules(model, "auto")
        docs = _documents(tok, world.train_documents[:CURVATURE_DOCS])
        yield ("demo", model, tok, modules, collect(model, modules, docs, labels="sampled", seed=0),
               demo_requests(300, 0)[0], dict(lr=2e-3, epochs=10, method="crispedit", gamma=0.8))

    def run(model, tok, modules, stats, requests, opts, eps, kind):
        ref = {n: (eigh_factor(stats.A[n].double()), eigh_factor(stats.G[n].double())) for n in modules}
        o = MethodOptions(**opts, budget=eps)
        s = EditSession.start(model, tok, modules, o, stats)
        if eps is not None:
            bases = {n: (A.vectors.float(), A.values.float(), G.vectors.float(), G.values.float())
                     for n, (A, G) in s.cap_eig.items()}
            s.budget = (B.ExactBudget if kind == "exact" else B.CapabilityBudget)(eps, bases, s.base, s.conv)
        base = {n: w.double() for n, w in s.base.items()}
        seen, clock = [], {"wall": 0.0, "cpu": 0.0, "calls": 0}
        step = EditOptimizer.step
        call = type(s.budget).__call__ if s.budget is not None else None

        def timed_call(self, *a, **k):
            w, c = time.perf_counter(), time.process_time()
            call(self, *a, **k)
            clock["wall"] += time.perf_counter() - w
            clock["cpu"] += time.process_time() - c
            clock["calls"] += 1

        def watched(self, *a, **k):
            step(self, *a, **k)
            seen.append(sum(0.5 * float((torch.outer(eG.values, eA.values) * C * C).sum())
                            for n, m in modules.items() for eA, eG in [ref[n]]
                            for C in [eG.vectors.T @ (m.weight.detach().double() - base[n]) @ eA.vectors]))

        EditOptimizer.step = watched
        if call is not None:
            type(s.budget).__call__ = timed_call
        try:
            s.flush_statistics()
            s.rebuild()
            steps, losses = run_epochs(s.model, s.tokenizer, requests, s.projectors, s.state, o.batch_size, o.epochs,
                                       o.loss_threshold, o.seed, False, s.budget)
        finally:
            EditOptimizer.step = step
            if call is not None:
                type(s.budget).__call__ = call
        weights = {n: m.weight.detach().double().clone() for n, m in modules.items()}
        row = {"steps": steps, "final_loss": losses[-1], "max_drift": max(seen), "final_drift": seen[-1]}
        if s.budget is not None:
            row.update(eps=eps, max_drift_over_eps=max(seen) / eps, budget_wall_s=clock["wall"],
                       budget_cpu_s=clock["cpu"], budget_wall_s_per_step=clock["wall"] / max(clock["calls"], 1),
                       projections=s.budget.projections, counts=getattr(s.budget, "counts", None))
        s.restore_base()
        return row, weights, base

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, model, tok, modules, stats, requests, opts in setups(dtype):
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            free, w_free, base = run(model, tok, modules, stats, requests, opts, None, "none")
            rows = {"unconstrained": free}
            for share in SHARES:
                eps = share * free["max_drift"]
                exact, w_exact, _ = run(model, tok, modules, stats, requests, opts, eps, "exact")
                budget, w_budget, _ = run(model, tok, modules, stats, requests, opts, eps, "budget")
                moved = math.sqrt(sum(float(((w_exact[n] - base[n]) ** 2).sum()) for n in base))
                gap = math.sqrt(sum(float(((w_budget[n] - w_exact[n]) ** 2).sum()) for n in base))
                budget["distance_to_exact_over_exact_update"] = gap / moved
                rows[f"share {share:g}"] = {"exact_projection_of_masters": exact, "budget": budget}
                print(f"{key:<14} share {share:g}: drift/eps exact {exact['max_drift_over_eps']:.6f} budget "
                      f"{budget['max_drift_over_eps']:.6f}; loss free {free['final_loss']:.3f} exact "
                      f"{exact['final_loss']:.3f} budget {budget['final_loss']:.3f}; |W-W_exact|/|dW_exact| "
                      f"{gap / moved:.3f}; budget s/step {budget['budget_wall_s_per_step']:.4f} (exact "
                      f"{exact['budget_wall_s_per_step']:.4f}) {budget['counts']}", flush=True)
            out[key] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    results = {"torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
               "constants": {"TAIL_FRACTION": B.TAIL_FRACTION, "EXACT_EVERY": B.EXACT_EVERY, "HEADROOM": B.HEADROOM,
                             "SAVED_TRIES": B.SAVED_TRIES, "MARGIN": B.MARGIN}}
    results["count_llama3_8b"] = c = count()
    for dtype, r in c.items():
        old = r["per_step_exact_projection"]
        print(f"LLaMA-3-8B {dtype}: budget worst {r['worst']:.3e} flop/step = {r['worst_over_forward_backward']:.1%}"
              f" of the forward+backward {r['forward_backward']:.3e} (certified "
              f"{r['certified_over_forward_backward']:.1%}); per-step exact projection "
              f"{old['holds_over_forward_backward']:.1%}–{old['binds_over_forward_backward']:.1%}; kept "
              f"{r['memory_kept'] / 1e9:.2f} GB, step scratch {r['memory_step_scratch'] / 1e9:.2f} GB", flush=True)
    results["timing_cpu"] = t = timing()
    print(f"one call at {t['shape']} (one thread, least of {REPS}): " + ", ".join(
        f"{k} {v['wall_s']:.4f} s wall / {v['cpu_s']:.4f} s CPU" for k, v in t.items()
        if isinstance(v, dict) and "wall_s" in v),
        flush=True)
    results["edits"] = edits(args.threads)
    print("->", write_results(results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

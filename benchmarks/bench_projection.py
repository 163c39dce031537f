"""Cost and precision of the Kronecker projector at LLaMA-3-8B shapes (SPEC §1.5).

- Real spectra: K-FAC statistics of the 5 (testbed: 4) edited ``down_proj`` matrices of stories260K
  on WikiText-2, of the shipped demo model on its world's documents and, when built, of the testbed
  model on its curvature corpus; per gamma the removed corner ``r_G × r_A`` and the fewest lines
  that cover its staircase, as fractions of the layer's shape.
- Counted flops per optimiser step (5 matrices) at LLaMA-3-8B (4096 × 14336) and Qwen2.5-7B
  (3584 × 18944) shapes, per form, with each real layer's staircase stretched to the large shape
  (ASSUMPTION: the same fractions of rows and columns), and the time they take at H100 nominal
  rates against a forward + backward of the model on a 32-request batch (6 · params · tokens).
- CPU time of one projection per form at a scaled-down shape (minimum of REPS runs) and, once, at
  the real 4096 × 14336 shape (random matrices stand in for eigenvectors: time does not depend on
  the values); the projector's memory per layer there.
- Precision: the share of a real edit gradient's projection that leaks into the removed
  coordinates with float32 / TF32 / bf16 rotation matmuls (emulated on this CPU), in norm and in
  K-FAC curvature, against what Adam leaks on the testbed (benchmarks/results/testbed.json).
- The float32 eigendecomposition check (residual, orthogonality) and its cost.

    python benchmarks/bench_projection.py [--reps 5] [--threads 1] [--skip-full] [--out benchmarks/results/projection.json]

Needs ../shared (stories260K, WikiText-2, CounterFact) for the first source; the others ship with
the repository or are skipped with a note.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TESTBED = Path.home() / ".cache" / "crispedit" / "testbeds" / "counterfact-wikitext-s0"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import timed, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.curvature import collect  # noqa: E402
from crispedit.layers import find_modules  # noqa: E402
from crispedit.projector import (  # noqa: E402
    PROJECTION_DTYPES,
    Eigen,
    KroneckerProjector,
    Threshold,
    eigh_errors,
    eigh_factor,
    eigh_tolerance,
    energy_threshold,
    projection_flops,
    removed_per_column,
    row_lengths,
)
from crispedit.requests import edit_text  # noqa: E402
from crispedit.running import frozen  # noqa: E402

GAMMAS = (0.5, 0.8, 0.9, 0.99)
REQUESTS = 32  # the paper's batch
TOKENS_PER_REQUEST = 20  # prompt + target of a CounterFact request in LLaMA-3's tokenizer, about
T_BATCH = REQUESTS * TOKENS_PER_REQUEST  # token positions of one mini-batch gradient X = gᵀ a
H100 = {"float32": 67e12, "tf32": 495e12, "bfloat16": 990e12}  # nominal dense FLOP/s (SXM)
TARGETS = {
    "LLaMA-3-8B": {"d_out": 4096, "d_in": 14336, "params": 8_030_261_248, "layers": 5},
    "Qwen2.5-7B": {"d_out": 3584, "d_in": 18944, "params": 7_615_616_512, "layers": 5},
}
SCALED = (512, 1792)  # 1/8 of LLaMA-3-8B's down_proj in each dimension, for repeated CPU timing
FORMS = ("dense", "corner", "factors")


# ---------------------------------------------------------------------------------------------
# sources of real statistics


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def load_sources() -> tuple[list[dict], list[str]]:
    """``[{name, model, tok, docs, requests: [(prompt, target)], corpus}]`` and notes on what is missing."""
    from crispedit.model import load_model
    from crispedit.requests import read_requests

    sources, notes = [], []
    stories = SHARED / "models" / "stories260K"
    wiki = SHARED / "data" / "wikitext-2" / "valid.txt"
    cf = SHARED / "data" / "counterfact" / "counterfact-edit-8k.json"
    if stories.exists() and wiki.exists() and cf.exists():
        model, tok = load_model(str(stories), "cpu", "float32")
        ids = tok(wiki.read_text()[:200_000])["input_ids"]
        docs = [ids[k * 256 : (k + 1) * 256] for k in range(64)]
        reqs = [(r.prompt, r.target_new) for r in read_requests(cf)[:REQUESTS]]
        sources.append(dict(name="stories260K", model=model, tok=tok, docs=docs, requests=reqs,
                            corpus="WikiText-2 valid, 64 × 256 tokens", edits="CounterFact records 0-31"))
    else:
        notes.append("stories260K skipped: ../shared models/stories260K, WikiText-2 or CounterFact absent")

    from crispedit.demo import CURVATURE_DOCS, MODEL_DIR, demo_requests
    from crispedit.world import build_world

    model, tok = load_model(str(MODEL_DIR), "cpu", "float32")
    docs = [tok(t)["input_ids"] for t in build_world().train_documents[:CURVATURE_DOCS]]
    reqs = [(r.prompt, r.target_new) for r in demo_requests(REQUESTS, 0)[0]]
    sources.append(dict(name="demo", model=model, tok=tok, docs=docs, requests=reqs,
                        corpus=f"world train_documents[:{CURVATURE_DOCS}]", edits="demo_requests(32, seed 0)"))

    if (TESTBED / "curvature.txt").exists() and (TESTBED / "edit.jsonl").exists():
        from crispedit.corpus import read_documents

        model, tok = load_model(str(TESTBED), "cpu", "float32")
        docs = read_documents([TESTBED / "curvature.txt"], tok, max_length=512)
        reqs = [(r.prompt, r.target_new) for r in read_requests(TESTBED / "edit.jsonl")[:REQUESTS]]
        sources.append(dict(name="testbed", model=model, tok=tok, docs=docs, requests=reqs,
                            corpus="testbed curvature.txt (512-token documents)", edits="testbed edit.jsonl 0-31"))
    else:
        notes.append(f"testbed skipped: {TESTBED} has no curvature.txt / edit.jsonl (not built yet)")
    return sources, notes


def edit_gradient(model, tok, modules, requests) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{layer: (g, a, X)}`` of one mini-batch of edit requests: mean NLL of the target tokens,
    right padding; ``g`` / ``a`` the output gradients / inputs at the ``T`` non-padded positions and
    ``X`` the weight gradient autograd forms (checked equal to ``gᵀ a``)."""
    items = []
    for prompt, target in requests:
        n_prompt = len(tok(prompt)["input_ids"])
        items.append((tok(edit_text(prompt, target))["input_ids"], n_prompt))
    S = max(len(x) for x, _ in items)
    ids = torch.zeros(len(items), S, dtype=torch.long)
    attn = torch.zeros(len(items), S, dtype=torch.long)
    labels = torch.full((len(items), S), -100, dtype=torch.long)
    for b, (x, n_prompt) in enumerate(items):
        ids[b, : len(x)], attn[b, : len(x)] = torch.tensor(x), 1
        labels[b, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
    inputs, grads, handles = {}, {}, []
    for n, m in modules.items():
        def hook(mod, args, out, n=n):
            inputs[n] = args[0].detach()
            out.register_hook(lambda grad: grads.__setitem__(n, grad.detach()))
        handles.append(m.register_forward_hook(hook))
    out = {}
    try:
        with frozen(model, [m.weight for m in modules.values()]):
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
            rows = attn.bool()
            for n, m in modules.items():
                g, a, X = grads[n][rows], inputs[n][rows], m.weight.grad.detach().clone()
                assert torch.allclose(g.T @ a, X, rtol=1e-4, atol=1e-6 * float(X.abs().max())), n
                out[n] = (g, a, X)
    finally:
        for h in handles:
            h.remove()
    return out


# ---------------------------------------------------------------------------------------------
# staircases


def staircase(P: KroneckerProjector) -> dict:
    """Corner, removed count and the fewest lines covering the staircase (``min_p p + lambda_p``)."""
    lam = row_lengths(P.counts)
    lines = int((torch.arange(lam.numel()) + lam).min()) if P.r_A else 0
    return {"r_A": P.r_A, "r_G": P.r_G, "removed": P.threshold.removed, "lines": lines,
            "removed_share": P.threshold.removed_share}


def stretch(counts: torch.Tensor, d_out_src: int, d_out: int, d_in: int) -> torch.Tensor:
    """A staircase stretched to ``d_out × d_in``: the same fractions of rows and columns (the
    extrapolation ASSUMPTION); stays non-increasing."""
    idx = torch.arange(d_in) * counts.numel() // d_in
    return torch.round(counts[idx].double() * d_out / d_out_src).long()


def step_flops(layers: list[tuple[torch.Tensor, int]], target: dict, T: int) -> dict:
    """Counted flops per optimiser step at the target's shape: every real layer's staircase
    stretched, averaged over the source's layers, times the target's edited layers."""
    total: dict[str, float] = {}
    for counts, d_out_src in layers:
        c = stretch(counts, d_out_src, target["d_out"], target["d_in"])
        r_A, r_G = int((c > 0).sum()), int(c[0])
        f = projection_flops(target["d_out"], target["d_in"], r_G, r_A, T, counts=c) if r_A else {
            k: 0 for k in ("dense", "rectangle", "corner", "factors", "factors_dense")}
        for k, v in f.items():
            total[k] = total.get(k, 0) + v * target["layers"] / len(layers)
    return {k: int(v) for k, v in total.items()}


# ---------------------------------------------------------------------------------------------
# precision


def leak(eA: Eigen, eG: Eigen, gamma: float, g, a, X) -> dict:
    """Per projection dtype and form, for the approximate projection ``Y`` of ``X`` and the exact
    float64 projector ``P``: ``‖(I − P) Y‖² / ‖Y‖²`` (norm), ``q_removed(Y) / q(X)`` (curvature,
    against the raw gradient) and ``q_removed(Y) / q(Y)`` (update: the normalisation of Adam's
    figure, the predicted drift outside over the update's whole predicted drift)."""
    P64 = KroneckerProjector.from_eigen(eA, eG, gamma, dtype=torch.float64)
    X64 = X.double()
    q = P64.predicted_drift(X64)
    out = {"q_X": q, "removed_share_of_q": P64.predicted_drift_outside(X64) / q,
           "removed_share_of_norm": float((X64 - P64.project(X64, form="dense")).norm() ** 2 / X64.norm() ** 2)}
    for pd in PROJECTION_DTYPES:
        P = KroneckerProjector.from_eigen(eA, eG, gamma, dtype=torch.float32, projection_dtype=pd)
        for form in FORMS:
            Y = P.project_factors(g, a, X=X, form="factors") if form == "factors" else P.project(X, form=form)
            out[f"{pd}/{form}"] = _leak_of(P64, Y, q)
        if pd != "float32":  # one refinement: project the rounded result again (twice the cost)
            out[f"{pd}/corner_twice"] = _leak_of(P64, P.project(P.project(X, form="corner"), form="corner"), q)
    return out


def _leak_of(P64: KroneckerProjector, Y: torch.Tensor, q: float) -> dict:
    Y64 = Y.double()
    R = Y64 - P64.project(Y64, form="dense")
    outside = P64.predicted_drift_outside(Y64)
    return {"norm": float(R.norm() ** 2 / Y64.norm() ** 2), "curvature": outside / q,
            "update": outside / P64.predicted_drift(Y64)}


def adam_leak() -> dict:
    """Adam's predicted drift outside the subspace over the whole predicted drift, per testbed run."""
    path = ROOT / "benchmarks" / "results" / "testbed.json"
    if not path.exists():
        return {}
    import json

    out = {}
    for r in json.loads(path.read_text())["rows"]:  # the main grid first; later rows (diagnostics) repeat keys
        key = f"{r['method']}/{r['labels']}/{r['gamma']}/n{r['n']}"
        if r["method"] == "crispedit" and r["optimizer"] == "adam" and r["predicted_kl"] and key not in out:
            out[key] = r["predicted_kl_outside"] / r["predicted_kl"]
    return out


# ---------------------------------------------------------------------------------------------
# CPU timing


def fake_projector(d_out: int, d_in: int, counts: torch.Tensor, seed: int = 0) -> KroneckerProjector:
    """A float32 projector with ``counts`` as its staircase and random matrices for eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    U_A = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in)
    U_G = torch.randn(d_out, d_out, generator=g) / math.sqrt(d_out)
    alpha = torch.linspace(1, 0, d_in, dtype=torch.float64)
    beta = torch.linspace(1, 0, d_out, dtype=torch.float64)
    t = Threshold(0.8, 1, float("nan"), int(counts.sum()), float("nan"), d_out * d_in)
    return KroneckerProjector(Eigen(alpha, U_A), Eigen(beta, U_G), t, counts)


def time_forms(P: KroneckerProjector, T: int, reps: int, forms=FORMS) -> dict:
    g = torch.randn(T, P.d_out)
    a = torch.randn(T, P.d_in)
    X = g.T @ a
    flops = P.flops(T, X_given=True)
    out = {}
    for form in forms:
        fn = (lambda: P.project_factors(g, a, X=X, form="factors")) if form == "factors" else (lambda: P.project(X, form=form))
        runs = [timed(fn)[:2] for _ in range(reps)]
        wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        out[form] = {"flops": flops[form], "wall_s": wall, "cpu_s": cpu, "gflop_per_s": flops[form] / wall / 1e9,
                     "runs_wall_s": [r[0] for r in runs]}
    return out


def projector_bytes(P: KroneckerProjector) -> dict:
    held = {"U_A": P.A.vectors, "U_G": P.G.vectors, "alpha": P.A.values, "beta": P.G.values, "counts": P.counts}
    out = {k: t.numel() * t.element_size() for k, t in held.items()}
    out["total"] = sum(out.values())
    n = P.d_out * P.d_in
    out["previous_mask_bool_and_float"] = n * (1 + 4)  # what the d_out × d_in mask and its float copy took
    return out


def eigh_check(dims: list[int]) -> dict:
    """float32 eigh of n × n covariances (power-law spectrum ``(1+i)^-1.5``): time, the two errors
    ``eigh_factor`` checks against its tolerance, the check's time; the float64 eigh's time at the
    largest n; a power law fitted to the residual, extrapolated to 18944 (Qwen2.5-7B's d_in)."""
    rows = []
    for n in dims:
        g = torch.Generator().manual_seed(0)
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        values = (1.0 + torch.arange(n, dtype=torch.float64)) ** -1.5
        M = (Q * values) @ Q.T
        M32 = M.float()
        wall32, cpu32, (w, U) = timed(lambda: torch.linalg.eigh(M32))
        check_wall, _, (res, orth) = timed(lambda: eigh_errors(M32, w, U))
        rows.append({"n": n, "float32_eigh_s": wall32, "float32_eigh_cpu_s": cpu32, "residual": res,
                     "orthogonality": orth, "tolerance": eigh_tolerance(n, torch.float32), "check_s": check_wall})
    wall64, cpu64, _ = timed(lambda: torch.linalg.eigh(M))
    rows[-1].update(float64_eigh_s=wall64, float64_eigh_cpu_s=cpu64)
    x = torch.tensor([math.log(r["n"]) for r in rows])
    y = torch.tensor([math.log(r["residual"]) for r in rows])
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    at = math.exp(float(y.mean()) + slope * (math.log(18944) - float(x.mean())))
    return {"rows": rows, "residual_exponent": slope, "residual_at_18944_extrapolated": at,
            "tolerance_at_18944": eigh_tolerance(18944, torch.float32)}


# ---------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-full", action="store_true", help="skip the one-off timing at 4096 × 14336 (minutes)")
    ap.add_argument("--eigh-dims", default="512,1024,2048,4096", help="sizes of the float32 eigh check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = {"version": __version__, "torch": torch.__version__, "cpu": cpu_model(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "loadavg_before": os.getloadavg(), "reps": a.reps,
               "gammas": GAMMAS, "T_batch": T_BATCH, "h100_flop_per_s": H100, "targets": TARGETS}

    # real spectra, edit gradients, leaks
    sources, notes = load_sources()
    results["notes"] = notes
    real = {}
    for src in sources:
        modules = find_modules(src["model"], "auto")
        t0 = time.perf_counter()
        stats = collect(src["model"], modules, src["docs"], labels="sampled")
        grads = edit_gradient(src["model"], src["tok"], modules, src["requests"])
        eig = {n: (eigh_factor(stats.A[n], f"{n}.A"), eigh_factor(stats.G[n], f"{n}.G")) for n in modules}
        d_out, d_in = next(iter(stats.shapes().values()))
        entry = {"d_out": d_out, "d_in": d_in, "layers": list(modules), "corpus": src["corpus"], "edits": src["edits"],
                 "statistics_tokens": stats.meta["tokens"], "T_edit_batch": int(next(iter(grads.values()))[0].shape[0]),
                 "float32_eigh_errors": {}, "gammas": {}}
        for n in modules:  # how a float32 eigh does on these real factors (eigh_factor's check)
            for key, M in (("A", stats.A[n]), ("G", stats.G[n])):
                w, U = torch.linalg.eigh(M.float())
                entry["float32_eigh_errors"][f"{n}.{key}"] = eigh_errors(M.float(), w, U)
        counts = {}
        for gamma in GAMMAS:
            per_layer = {}
            for n, (eA, eG) in eig.items():
                P = KroneckerProjector.from_eigen(eA, eG, gamma, dtype=torch.float64)
                per_layer[n] = staircase(P)
                per_layer[n]["leak"] = leak(eA, eG, gamma, *grads[n])
                counts[(gamma, n)] = P.counts
            entry["gammas"][str(gamma)] = per_layer
        entry["seconds"] = time.perf_counter() - t0
        entry["_counts"] = counts
        real[src["name"]] = entry
        print(f"{src['name']}: {d_out} × {d_in}, {len(modules)} layers, {entry['seconds']:.1f} s", flush=True)

    # counted flops per optimiser step at the large shapes
    cost = {}
    for tname, target in TARGETS.items():
        cost[tname] = {}
        for sname, entry in real.items():
            cost[tname][sname] = {}
            for gamma in GAMMAS:
                layers = [(entry["_counts"][(gamma, n)], entry["d_out"]) for n in entry["layers"]]
                f = step_flops(layers, target, T_BATCH)
                best = min(("dense", "corner", "factors"), key=f.get)
                cost[tname][sname][str(gamma)] = {"flops": f, "best": best,
                                                  "ms_at_h100": {pd: f[best] / r * 1e3 for pd, r in H100.items()},
                                                  "dense_ms_at_h100_float32": f["dense"] / H100["float32"] * 1e3}
        fb = 6 * target["params"] * T_BATCH
        target_fb = {"flops": fb, "ms_at_h100_bfloat16": fb / H100["bfloat16"] * 1e3}
        cost[tname]["_forward_backward"] = target_fb
    results["step_cost"] = cost

    # CPU timing: scaled shape (repeated) and the real shape (once)
    ref_source = "testbed" if "testbed" in real else "demo"
    ref = real[ref_source]
    ref_layer = ref["layers"][len(ref["layers"]) // 2]
    ref_counts = ref["_counts"][(0.8, ref_layer)]
    timing = {"staircase_from": f"{ref_source} {ref_layer} at gamma 0.8, stretched", "note":
              "random matrices stand in for eigenvectors; float32 only (tf32/bf16 are emulated on a CPU, slower)"}
    o, n = SCALED
    P = fake_projector(o, n, stretch(ref_counts, ref["d_out"], o, n))
    timing["scaled"] = {"d_out": o, "d_in": n, "r_G": P.r_G, "r_A": P.r_A, "T": T_BATCH // 8,
                        "forms": time_forms(P, T_BATCH // 8, a.reps)}
    del P
    if not a.skip_full:
        o, n = TARGETS["LLaMA-3-8B"]["d_out"], TARGETS["LLaMA-3-8B"]["d_in"]
        P = fake_projector(o, n, stretch(ref_counts, ref["d_out"], o, n))
        timing["full"] = {"d_out": o, "d_in": n, "r_G": P.r_G, "r_A": P.r_A, "T": T_BATCH,
                          "forms": time_forms(P, T_BATCH, 1, ("corner", "factors", "dense")),
                          "projector_bytes": projector_bytes(P)}
        del P
        # building the staircase at this shape from power-law spectra (energy rule + counts), once
        alpha = (1.0 + torch.arange(n, dtype=torch.float64)) ** -1.5
        beta = (1.0 + torch.arange(o, dtype=torch.float64)) ** -1.5
        wall, cpu, t = timed(lambda: energy_threshold(alpha, beta, 0.8))
        wall2, cpu2, _ = timed(lambda: removed_per_column(alpha, beta, t.tau))
        timing["full"]["build"] = {"energy_threshold_s": wall, "energy_threshold_cpu_s": cpu,
                                   "removed_per_column_s": wall2, "spectra": "power law (1+i)^-1.5, gamma 0.8"}
    results["timing"] = timing
    results["eigh_check"] = eigh_check([int(d) for d in a.eigh_dims.split(",")])
    results["adam_leak_on_testbed"] = adam_leak()
    results["loadavg_after"] = os.getloadavg()
    for entry in real.values():
        entry.pop("_counts")
    results["real"] = real
    results["fractions"] = {  # median over layers: how the removed corner scales with the width
        name: {"d_out": e["d_out"], "d_in": e["d_in"], **{g: {
            "r_A/d_in": median([v["r_A"] / e["d_in"] for v in layers.values()]),
            "r_G/d_out": median([v["r_G"] / e["d_out"] for v in layers.values()]),
            "lines/d_out": median([v["lines"] / e["d_out"] for v in layers.values()])} for g, layers in e["gammas"].items()}}
        for name, e in real.items()}
    out = write_results(results, a.out)
    report(results)
    print(f"-> {out}")


def report(r: dict) -> None:
    print(f"\n{r['cpu']}, {r['threads']} thread(s); T = {r['T_batch']} positions per mini-batch gradient")
    print("\nReal spectra: median over layers of r_A/d_in, r_G/d_out, covering lines/d_out; max over layers of the leak")
    print("leak = q_removed(P̃X)/q(P̃X) (Adam's normalisation), corner form unless named; 'of q(X)': / the raw gradient's")
    print(f"{'model':>12} {'shape':>10} {'γ':>5} {'r_A/d_in':>8} {'r_G/d_out':>9} {'lines/d_out':>11} "
          f"{'fp32':>8} {'tf32':>8} {'bf16':>8} {'bf16 dense':>10} {'bf16 factors':>12} {'bf16 twice':>10} {'bf16 of q(X)':>12} {'bf16 norm':>9}")
    for name, e in r["real"].items():
        for gamma, layers in e["gammas"].items():
            med = lambda k, d: median([v[k] / d for v in layers.values()])  # noqa: E731
            worst = lambda key, m: max(v["leak"][key][m] for v in layers.values())  # noqa: E731
            print(f"{name:>12} {e['d_out']:>4}×{e['d_in']:<5} {gamma:>5} {med('r_A', e['d_in']):8.2f} {med('r_G', e['d_out']):9.2f} "
                  f"{med('lines', e['d_out']):11.2f} {worst('float32/corner', 'update'):8.1e} "
                  f"{worst('tf32/corner', 'update'):8.1e} {worst('bfloat16/corner', 'update'):8.1e} "
                  f"{worst('bfloat16/dense', 'update'):10.1e} {worst('bfloat16/factors', 'update'):12.1e} "
                  f"{worst('bfloat16/corner_twice', 'update'):10.1e} "
                  f"{worst('bfloat16/corner', 'curvature'):12.1e} {worst('bfloat16/corner', 'norm'):9.1e}")
    for tname, per in r["step_cost"].items():
        fb = per["_forward_backward"]
        print(f"\n{tname}: flops per optimiser step (5 matrices; staircases stretched from the real layers), "
              f"time at H100 nominal rates (ms); forward+backward {fb['flops'] / 1e12:.1f} TFLOP = {fb['ms_at_h100_bfloat16']:.1f} ms bf16")
        print(f"{'source':>12} {'γ':>5} {'dense TF':>9} {'rect. TF':>9} {'corner TF':>9} {'factors TF':>10} "
              f"{'best':>8} {'fp32 ms':>8} {'tf32 ms':>8} {'bf16 ms':>8} {'dense fp32 ms':>13}")
        for sname, gs in per.items():
            if sname.startswith("_"):
                continue
            for gamma, c in gs.items():
                f = c["flops"]
                print(f"{sname:>12} {gamma:>5} {f['dense'] / 1e12:9.2f} {f['rectangle'] / 1e12:9.2f} {f['corner'] / 1e12:9.2f} "
                      f"{f['factors'] / 1e12:10.2f} {c['best']:>8} {c['ms_at_h100']['float32']:8.1f} {c['ms_at_h100']['tf32']:8.1f} "
                      f"{c['ms_at_h100']['bfloat16']:8.2f} {c['dense_ms_at_h100_float32']:13.1f}")
    for key, t in r["timing"].items():
        if not isinstance(t, dict):
            continue
        print(f"\nCPU, one projection at {t['d_out']} × {t['d_in']} (r_G {t['r_G']}, r_A {t['r_A']}, T {t['T']}):")
        for form, v in t["forms"].items():
            print(f"  {form:>8}: {v['flops'] / 1e9:9.1f} GFLOP  {v['wall_s']:8.3f} s wall  {v['cpu_s']:8.3f} s CPU  {v['gflop_per_s']:6.1f} GFLOP/s")
        if "projector_bytes" in t:
            b = t["projector_bytes"]
            print(f"  projector state {b['total'] / 2**20:.0f} MiB (U_A {b['U_A'] / 2**20:.0f}, U_G {b['U_G'] / 2**20:.0f}, "
                  f"counts {b['counts'] / 2**10:.0f} KiB); the old mask took {b['previous_mask_bool_and_float'] / 2**20:.0f} MiB more")
            print(f"  energy rule at this shape {t['build']['energy_threshold_s']:.1f} s, staircase counts {t['build']['removed_per_column_s']:.2f} s")
    e = r["eigh_check"]
    print()
    for name, entry in r["real"].items():
        errs = entry["float32_eigh_errors"].values()
        print(f"float32 eigh of {name}'s real factors: residual ≤ {max(x[0] for x in errs):.1e}, "
              f"orthogonality ≤ {max(x[1] for x in errs):.1e}")
    for row in e["rows"]:
        print(f"float32 eigh at n = {row['n']}: {row['float32_eigh_s']:.1f} s, residual {row['residual']:.1e}, orthogonality "
              f"{row['orthogonality']:.1e}, tolerance {row['tolerance']:.1e} (check {row['check_s']:.2f} s)"
              + (f"; float64 eigh {row['float64_eigh_s']:.1f} s" if "float64_eigh_s" in row else ""))
    print(f"residual ∝ n^{e['residual_exponent']:.2f}: {e['residual_at_18944_extrapolated']:.1e} at n = 18944 "
          f"(extrapolated) against a tolerance of {e['tolerance_at_18944']:.1e}")
    if r["adam_leak_on_testbed"]:
        print("Adam's predicted drift outside the subspace / predicted drift (testbed): " +
              ", ".join(f"{k} {v:.3f}" for k, v in r["adam_leak_on_testbed"].items()))
    for note in r["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()

"""MEMIT's covariance weight λ on a real small model (issue 19 §3): does an edit land, and why.

stories260K (width 64, MLP 172), MEMIT at blocks 1-2 with the same targets (optimised once per request
set and target setting) and λ in {the LLaMA-3-8B value scaled by d_in, 15,000 · 172 / 14,336 ≈ 180; 100;
30; 10; 3}; AlphaEdit with the same targets and L2 in {10, 1, 0.1}. Two request sets: the first
``--requests`` CounterFact records of ../shared/data, and two requests in the model's own world ("...a
little girl named" -> "Tom", the single-request check of the issue). Per row: the mean target
probability at the optimised targets ``z`` (what a perfect write gives) and after the edit, both on
the bare prompt; the mean share of each request's own residual that the solves write at its key
(diag H, ``crispedit.memit.key_shares``) and the mean and median ``s`` (``kᵀ(λC)⁻¹k``; AlphaEdit
``‖Uᵀk‖²/L2``), one request alone writing ``s/(1+s)``; reliability and locality under both protocols
of ``crispedit.evaluate``; the KL on held-out WikiText (the cost of a small λ); and every request
whose teacher-forced reliability is 1.0 and generation 0.0, with what it generated.
``C``: the per-token ``E[k kᵀ]`` of the edited matrices over WikiText-2 validation paragraphs.

    python benchmarks/bench_memit_lambda.py [--requests 20] [--out benchmarks/results/memit-lambda.json]

Needs ../shared/models/stories260K and ../shared/data; exits with a message when either is absent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
COUNTERFACT = SHARED / "data" / "counterfact" / "counterfact-edit-8k.json"
WIKITEXT = SHARED / "data" / "wikitext-2" / "valid.txt"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.curvature import collect  # noqa: E402
from crispedit.evaluate import encode_prompt, metric, score_requests, snapshot, text_drift  # noqa: E402
from crispedit.layers import decoder_blocks, find_modules  # noqa: E402
from crispedit.memit import MemitConfig, apply_closed_form, context_prefixes, last_subject_token  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.requests import EditRequest, edit_text, read_requests  # noqa: E402

BLOCKS = [1, 2]  # of 5: early-middle, as the papers edit 4-8 of LLaMA-3-8B's 32
WIDTH_8B, LAMBDA_8B = 14336, 15000.0  # MEMIT's λ and the d_in it was tuned for (LLaMA-3-8B)
LAMBDAS = (100.0, 30.0, 10.0, 3.0)  # besides the width-scaled 8B value
L2S = (10.0, 1.0, 0.1)  # AlphaEdit: the authors' LLaMA-3 value, EasyEdit's, and one below
SETTINGS = {"authors": {}, "easyedit": dict(v_lr=0.5, clamp_norm_factor=4.0, v_weight_decay=1e-3)}
# AlphaEdit's null space: eigenvalues of C below 5% of the largest, 73 and 84 of 172 directions at blocks 1
# and 2 (the testbed's 1% leaves none here: C's eigenvalues span a factor of 73 and 77)
NULLSPACE = dict(nullspace_threshold=5e-2, nullspace_relative=True)
C_DOCS, HELDOUT_DOCS, DOC_TOKENS = 400, 100, 128  # WikiText-2 paragraphs for C, then for the held-out KL
STORIES = [EditRequest("Once upon a time, there was a little girl named", "Tom", "little girl", case_id="girl"),
           EditRequest("The dog liked to eat", "rocks", "dog", case_id="dog")]
NOTE = {  # read off the default run (20 CounterFact requests, seed 0); rewrite it when the figures change
    "lambda": "s = kᵀ(λC)⁻¹k is 1.4-1.9 × d_in/λ here with the authors' targets, up to 2.6 with EasyEdit's "
              "(E[kᵀC⁻¹k] = d_in for corpus keys; the subject keys, averaged over prefixes, lean to C's weak "
              "directions). The 8B λ scaled by width (≈180) keeps d_in/λ ≈ 1 (s 1.4-2.2), so each layer writes only "
              "53-67% of its residual (diag H) and the edit 62-79% of z − h: the stories request 'little girl named' → "
              "'Tom' does not land (teacher-forced 0.5, generates 'Lily'), nor at λ 100 (s ≈ 3); it lands from λ 30 "
              "(s ≈ 10, share 0.91, 92% written) and at 10 and 3, which reproduces the issue's check. Below λ ≈ 30 "
              "the share saturates (0.87 → 0.95 → 0.99 on CounterFact) while the cost keeps growing (held-out KL "
              "0.22 → 0.26 → 0.28 nats, locality teacher-forced 0.66 → 0.62). Choose λ for a median s of about 10: λ "
              "≈ 30 ≈ d_in/6 on stories260K with the authors' targets.",
    "counterfact": "No λ makes a CounterFact edit land on this model: its targets are spelled in 3-11 tokens of one "
                   "to three characters, and even at z (δ added at the subject of the bare prompt) P(target) is 0.02 "
                   "with the authors' settings and 0.05 with EasyEdit's; λ only decides how much of an unreachable "
                   "target is written. EasyEdit's settings (clamp 4‖h‖) wreck the model with 20 requests (held-out "
                   "KL 2.2-3.2 nats for MEMIT).",
    "alphaedit": "AlphaEdit's alone-share is s/(1+s) with s = ‖Uᵀk‖²/L2: L2 is absolute like λ. At the authors' L2 = "
                 "10, s ≈ 0.2-0.35 and 26-37% of z − h is written; L2 = 1 gives s ≈ 2.7-6, L2 = 0.1 s ≈ 30-66.",
    "protocols": "Teacher-forced 1.0 with generation 0.0: no CounterFact request (none reaches teacher-forced 1.0). "
                 "The stories request 'Once upon a time, there was a little girl named' → 'Tom' (tokens '▁T', 'om') "
                 "with EasyEdit's targets: AlphaEdit at L2 1 generates 'Tom who lived in his puts', at L2 0.1 'Tom "
                 "who lived in his puts holds holds holds ...', MEMIT at λ 30 and 10 'Tom who liked to play with his "
                 "puts to play with her put on' (the base model generates 'Lily' and stops). Both target tokens are "
                 "the argmax given the gold prefix, so teacher forcing scores 1.0; generation takes the answer up to "
                 "the first '.', newline or end token and asks for an exact match, and the edited model runs on past "
                 "the name. They should disagree here: the run-on text is broken (held-out KL 0.53-0.98 nats for "
                 "these rows against 0.03 for the authors' λ 30 row, which generates 'Tom' and stops), an oversized "
                 "edit that teacher forcing, scoring only the target's own tokens, cannot see. A fluent continuation "
                 "('Tom who liked to play.') would fail the exact match too; the base model ends the answer after "
                 "the name, so the stop is a fair demand on this prompt.",
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@torch.no_grad()
def target_probability(model, tok, requests: list[EditRequest], block=None, delta=None) -> list[float]:
    """Per request ``exp(mean_t log P(y_t | prompt, y_<t))`` on the bare prompt (the targets' ``prob``);
    with ``delta`` (``[n, d_model]``) added to ``block``'s output at the last subject token: at ``z``."""
    out = []
    for i, r in enumerate(requests):
        ids = encode_prompt(tok, edit_text(r.prompt, r.target_new))
        n = len(encode_prompt(tok, r.prompt))
        handle = None
        if delta is not None:
            at = last_subject_token(tok, r.prompt, r.subject)

            def add(mod, args, output, d=delta[i], at=at):
                x = output[0] if isinstance(output, tuple) else output
                x = x.clone()
                x[0, at] += d.to(x.dtype)
                return (x, *output[1:]) if isinstance(output, tuple) else x

            handle = block.register_forward_hook(add)
        try:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        finally:
            if handle is not None:
                handle.remove()
        lp = torch.log_softmax(logits.double(), -1)
        out.append(float(lp[n - 1 : len(ids) - 1].gather(1, torch.tensor(ids[n:])[:, None]).mean().exp()))
    return out


def disagreements(tok, requests: list[EditRequest], report: dict) -> list[dict]:
    """Requests with teacher-forced reliability 1.0 and generation 0.0: the target's tokens and the text."""
    out = []
    for r, row in zip(requests, report["per_request"]):
        if row["reliability/teacher_forced"] == 1.0 and row["reliability/generation"] == 0.0:
            gold = encode_prompt(tok, edit_text(r.prompt, r.target_new))[len(encode_prompt(tok, r.prompt)) :]
            out.append({"case_id": r.case_id, "prompt": r.prompt, "target": r.target_new,
                        "target_tokens": tok.convert_ids_to_tokens(gold), "generated": row["reliability/generated"][0]})
    return out


def run_set(model, tok, modules, requests, C, heldout, seed: int) -> dict:
    """Every target setting, MEMIT over λ and AlphaEdit over L2, on one request set."""
    d_in = next(iter(modules.values())).weight.shape[1]
    block = decoder_blocks(model)[1][BLOCKS[-1]]
    base_weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    base = snapshot(model, tok, requests)
    base_report = score_requests(model, tok, requests, base, now=base)
    grid = [("memit", dict(mom2_update_weight=LAMBDA_8B * d_in / WIDTH_8B))]
    grid += [("memit", dict(mom2_update_weight=lam)) for lam in LAMBDAS] + [("alphaedit", dict(L2=l2)) for l2 in L2S]
    rows = []
    for setting, fields in SETTINGS.items():
        cfg = MemitConfig(**fields, **NULLSPACE)
        prefixes = context_prefixes(model, tok, seed, cfg.prefix_count, cfg.prefix_length, cfg.prefix_top_k)
        targets = None
        for method, knob in grid:
            t0, c0 = time.perf_counter(), time.process_time()
            res = apply_closed_form(model, tok, modules, requests, C, replace(cfg, **knob), method, prefixes=prefixes,
                                    targets=targets)
            targets = res.targets  # optimised once per setting, shared by every row
            report = score_requests(model, tok, requests, base)
            after = target_probability(model, tok, requests)
            drift = text_drift(model, heldout, base_weights)
            with torch.no_grad():
                for n, m in modules.items():
                    m.weight.copy_(base_weights[n])
            shares = [x for v in res.key_shares.values() for x in v]
            s = [x for v in res.s_single.values() for x in v]
            rows.append({  # P(target) at z on the base weights (restored above): δ = z − h at the subject
                "settings": setting, "method": method, **knob,
                "target_prob_at_z": statistics.mean(target_probability(model, tok, requests, block,
                                                                       targets.z - targets.h)),
                "target_prob_after": statistics.mean(after),
                "key_share_mean": statistics.mean(shares), "key_share_min": min(shares),
                "share_alone_mean": statistics.mean(x / (1 + x) for x in s),  # s/(1+s): without the other requests
                "s_mean": statistics.mean(s), "s_median": statistics.median(s),
                "residual_written": 1 - res.residual_after / res.layers[next(iter(res.layers))]["residual"],
                **{f"{m}/{p}": metric(report, m, p) for m in ("reliability", "generalization", "locality_agreement")
                   for p in ("teacher_forced", "generation")},
                "heldout_kl": drift["kl"], "relative_change": {n: v["relative_change"] for n, v in res.layers.items()},
                "tf1_gen0": disagreements(tok, requests, report),
                "per_layer": {n: {"key_share": res.key_shares[n], "s": res.s_single[n]} for n in res.layers},
                "per_request": [{"case_id": q["case_id"], "teacher_forced": q["reliability/teacher_forced"],
                                 "generation": q["reliability/generation"], "generated": q["reliability/generated"][0]}
                                for q in report["per_request"]],
                "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,  # with the targets: first row
                "seconds_targets": res.seconds_targets,
            })
            print_row(rows[-1])
    return {"requests": len(requests), "base": {f"{m}/{p}": metric(base_report, m, p)
                                                 for m in ("reliability", "generalization")
                                                 for p in ("teacher_forced", "generation")},
            "base_target_prob": statistics.mean(target_probability(model, tok, requests)), "rows": rows}


def print_row(r: dict) -> None:
    def f(x) -> str:
        return "  -  " if x is None else f"{x:.3f}"

    knob = f"λ {r['mom2_update_weight']:6.1f}" if r["method"] == "memit" else f"L2 {r['L2']:5.1f}"
    print(f"{r['settings']:>8} {r['method']:>9} {knob}: P(target) at z {f(r['target_prob_at_z'])} after "
          f"{f(r['target_prob_after'])} | share {f(r['key_share_mean'])} s {r['s_mean']:7.2f} (median "
          f"{r['s_median']:6.2f}) | reliability tf {f(r['reliability/teacher_forced'])} gen "
          f"{f(r['reliability/generation'])} | locality gen {f(r['locality_agreement/generation'])} | KL "
          f"{r['heldout_kl']:.4f} | tf 1 gen 0: {len(r['tf1_gen0'])}", flush=True)


def run(n_requests: int, seed: int) -> dict:
    model, tok = load_model(str(MODEL), "cpu", "float32")
    modules = find_modules(model, BLOCKS)
    d_in = next(iter(modules.values())).weight.shape[1]
    paragraphs = [t.strip() for t in WIKITEXT.read_text(encoding="utf-8").splitlines()
                  if t.strip() and not t.strip().startswith("=")]
    docs = [tok(t)["input_ids"][:DOC_TOKENS] for t in paragraphs[: C_DOCS + HELDOUT_DOCS]]
    stats = collect(model, modules, docs[:C_DOCS], labels="empirical", dtype=torch.float64)
    C = {n: a.double() for n, a in stats.A.items()}
    sets = {"counterfact": read_requests(COUNTERFACT)[:n_requests], "stories": STORIES}
    out = {}
    for name, requests in sets.items():
        print(f"-- {name}: {len(requests)} requests", flush=True)
        out[name] = run_set(model, tok, modules, requests, C, docs[C_DOCS:], seed)
    return {"model": "stories260K", "seed": seed, "d_in": d_in, "blocks": BLOCKS,
            "lambda_8b_scaled": LAMBDA_8B * d_in / WIDTH_8B, "lambdas": list(LAMBDAS), "l2s": list(L2S),
            "settings": SETTINGS, "nullspace": NULLSPACE,
            "c_corpus": f"WikiText-2 valid, first {C_DOCS} paragraphs, {DOC_TOKENS} tokens each at most",
            "c_tokens": sum(len(d) - 1 for d in docs[:C_DOCS]),
            "heldout": f"the next {HELDOUT_DOCS} paragraphs", "sets": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memit-lambda.json"))
    a = ap.parse_args()
    missing = [p for p in (MODEL, COUNTERFACT, WIKITEXT) if not p.exists()]
    if missing:
        sys.exit(f"{', '.join(map(str, missing))} not present: this benchmark needs ../shared/models/stories260K "
                 "and ../shared/data")
    torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    results = {"version": __version__, "cpu": cpu_model(), "threads": a.threads, **run(a.requests, a.seed)}
    results.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, note=NOTE)
    print(f"-> {write_results(results, a.out)}")


if __name__ == "__main__":
    main()

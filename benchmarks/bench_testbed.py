"""CrispEdit against its baselines on the CounterFact/WikiText testbed (issue 4, §2), and on
stories260K (§3, from ``bench_stories``), into one results file.

    python benchmarks/build_testbed.py              # once: ~/.cache/crispedit/testbeds/...
    python benchmarks/bench_testbed.py [--testbed DIR]

Grid, 1,000 edits in one batch: CrispEdit with sampled labels, CrispEdit with empirical labels and
``nullspace`` at gamma 0.5/0.8/0.9/0.95/0.99, ``ft``, and CrispEdit (sampled) with
``adam-projected-step`` at 0.8; at 3,000 edits CrispEdit at 0.8 and ft (at every known prompt
when the testbed knows fewer than 3,000 but at least 2,000; none below). ``--diagnostics`` adds
CrispEdit at 0.8 and 0.9 with curvature from the WikiText documents plus 1,000 fact sentences
that are neither edited nor counted among the known unedited facts. Every run uses the SPEC §1.6
schedule (Adam lr 5e-4 unless ``--lr``, batch 32, up to 25 epochs, the same early stopping). The
edited requests are edit-pool records whose prompt the base model answers correctly by greedy
generation, in file order; the known unedited facts are the unedited pool's prompts and
rephrases that the base answers correctly.

Each run is cached under ``--cache`` by (testbed hash, method, labels, gamma, n, optimizer, lr,
seed), with its per-request rows, so an interrupted benchmark resumes. The committed results file
holds aggregates only (metrics, configuration, seeds, timings, version, input hashes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.corpus import read_documents  # noqa: E402
from crispedit.curvature import collect, load, save  # noqa: E402
from crispedit.editor import build_projectors, drift_report, edit, eigenbases  # noqa: E402
from crispedit.evaluate import known_facts_filter, measure, metric, prepare_reference  # noqa: E402
from crispedit.layers import find_modules  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.requests import EditRequest, edit_text, read_requests  # noqa: E402

SHARED_TESTBEDS = ROOT.parent / "shared" / "testbeds"
CACHE = Path.home() / ".cache" / "crispedit"
GAMMAS = (0.5, 0.8, 0.9, 0.95, 0.99)
HELDOUT_DOCS = 200
METRICS = ("reliability", "generalization", "locality_agreement", "locality_accuracy")


def default_testbed() -> Path:
    """A prebuilt testbed under ../shared/testbeds when there is one, else the builder's default output."""
    shared = sorted(p.parent for p in SHARED_TESTBEDS.glob("*/build.json")) if SHARED_TESTBEDS.exists() else []
    return shared[0] if shared else CACHE / "testbeds" / "counterfact-wikitext-s0"


def grid(n_small: int, n_large: int | None) -> list[dict]:
    """The runs: (method, labels, gamma, n, optimizer)."""
    runs = [dict(method="ft", labels="sampled", gamma=0.0, n=n_small, optimizer="adam")]
    for g in GAMMAS:
        runs += [dict(method="crispedit", labels="sampled", gamma=g, n=n_small, optimizer="adam"),
                 dict(method="crispedit", labels="empirical", gamma=g, n=n_small, optimizer="adam"),
                 dict(method="nullspace", labels="sampled", gamma=g, n=n_small, optimizer="adam")]
    runs.append(dict(method="crispedit", labels="sampled", gamma=0.8, n=n_small, optimizer="adam-projected-step"))
    if n_large:
        runs += [dict(method=m, labels="sampled", gamma=0.0 if m == "ft" else 0.8, n=n_large, optimizer="adam")
                 for m in ("crispedit", "ft")]
    return runs


def diagnostic_grid(n_small: int) -> list[dict]:
    """CrispEdit with curvature from the WikiText documents plus fact sentences that are neither
    edited nor counted as known unedited facts: does a corpus with facts in it protect facts?"""
    return [dict(method="crispedit", labels="sampled", gamma=g, n=n_small, optimizer="adam", corpus="wikitext+facts")
            for g in (0.8, 0.9)]


def family(r: dict) -> str:
    """A name for the curve a run lies on."""
    if r["method"] == "ft":
        return "ft"
    name = r["method"] + (f" ({r['labels']})" if r["method"] == "crispedit" else "")
    name += " projected-step" if r["optimizer"] != "adam" else ""
    return name + (f" [{r['corpus']}]" if "corpus" in r else "")


def cached(path: Path, compute):
    """``compute()``'s JSON, read from ``path`` when it exists, else computed and written atomically."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    write_results(value, path)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default=None, help="a directory written by build_testbed.py")
    ap.add_argument("--cache", default=str(CACHE / "bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "testbed.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "testbed.png"))
    ap.add_argument("--edits", type=int, nargs=2, default=[1000, 3000], metavar=("N", "N_LARGE"))
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diagnostics", action="store_true", help="also protect curvature of WikiText plus fact sentences")
    ap.add_argument("--skip-stories", action="store_true", help="leave out the stories260K part (§3)")
    a = ap.parse_args()
    testbed = Path(a.testbed) if a.testbed else default_testbed()
    if not (testbed / "build.json").exists():
        sys.exit(f"no testbed in {testbed}: build one with python benchmarks/build_testbed.py")
    torch.set_num_threads(a.threads)
    build = json.loads((testbed / "build.json").read_text())
    tb_hash = build["testbed_sha256"]
    cache = Path(a.cache) / tb_hash[:16]
    model, tok = load_model(str(testbed), "cpu", "float32")
    modules = find_modules(model, "auto")

    pool = read_requests(testbed / "edit.jsonl")
    known_ids = cached(cache / "known-edit-prompts.json", lambda: [
        r.case_id for r in known_facts_filter(model, tok, [EditRequest(r.prompt, r.ground_truth, case_id=r.case_id) for r in pool])])
    known_set = set(known_ids)
    usable = [r for r in pool if r.case_id in known_set]
    n_small, n_large = a.edits
    if n_small > len(usable):
        sys.exit(f"the testbed knows only {len(usable)} of its {len(pool)} edit-pool prompts, fewer than {n_small}")
    if n_large > len(usable):  # the large runs use every known prompt, if that is still at least 2n
        print(f"the testbed knows {len(usable)} edit-pool prompts, fewer than {n_large}", end=": ")
        n_large = len(usable) if len(usable) >= 2 * n_small else None
        print(f"large runs at {n_large} edits" if n_large else "no large runs")
    rephrases = [EditRequest(p, r.ground_truth, case_id=r.case_id) for r in usable[:n_small] for p in r.rephrase_prompts]
    rephrase_known = cached(cache / f"known-rephrases-{n_small}.json",
                            lambda: len(known_facts_filter(model, tok, rephrases)) / len(rephrases))
    unedited = read_requests(testbed / "unedited.jsonl")
    known_facts = [EditRequest(p, r.ground_truth, case_id=f"{r.case_id}/{i}")
                   for r in unedited for i, p in enumerate([r.prompt, *r.rephrase_prompts])]
    curvature_docs = read_documents([testbed / "curvature.txt"], tok, max_length=512)
    heldout = read_documents([testbed / "heldout.txt"], tok, max_length=512, max_documents=HELDOUT_DOCS)

    stats, stats_time = {}, {}
    for labels in ("sampled", "empirical"):
        path = cache / f"curvature-{labels}-s{a.seed}"
        if not path.exists():
            save(collect(model, modules, curvature_docs, labels=labels, seed=a.seed), path)
        stats[labels] = load(path, modules)
        stats_time[labels] = stats[labels].meta["time_s"]
    fact_docs = []
    if a.diagnostics:  # usable[n_small : 2 n_small]: known, never edited in the n_small runs, not in the unedited pool
        fact_docs = [tok(edit_text(r.prompt, r.ground_truth) + ".")["input_ids"] for r in usable[n_small : 2 * n_small]]
        path = cache / f"curvature-sampled+facts-s{a.seed}"
        if not path.exists():
            save(collect(model, modules, curvature_docs + fact_docs, labels="sampled", seed=a.seed), path)
        stats["sampled+facts"] = load(path, modules)
        stats_time["sampled+facts"] = stats["sampled+facts"].meta["time_s"]
    eig = {labels: eigenbases(s) for labels, s in stats.items()}
    base_weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    references: dict[int, object] = {}

    def run(spec: dict) -> dict:
        n = spec["n"]
        if n not in references:
            references[n] = prepare_reference(model, tok, usable[:n], "raw", heldout, curvature_docs, known_facts, modules=modules)
        ref = references[n]
        P = build_projectors(eig[spec["labels"] + ("+facts" if "corpus" in spec else "")], spec["method"], spec["gamma"])
        result = edit(model, tok, usable[:n], modules, P, optimizer=spec["optimizer"], lr=a.lr, epochs=a.epochs, seed=a.seed)
        drift = drift_report(result.deltas, modules, eig[spec["labels"]], P)  # predicted KL: WikiText-only curvature
        after = measure(model, tok, ref)
        with torch.no_grad():
            for name, m in modules.items():
                m.weight.copy_(base_weights[name])
        cap, base_cap = after["capability"], ref.before["capability"]
        row = dict(spec, steps=result.steps, epochs=result.epochs, final_loss=result.epoch_losses[-1],
                   edit_seconds=result.seconds, relative_change=drift["total"]["relative_change"],
                   heldout_kl=cap["heldout_kl"], predicted_kl=drift["total"]["predicted_kl"],
                   predicted_kl_outside=drift["total"]["predicted_kl_outside"], corpus_kl=cap["corpus_kl"],
                   heldout_perplexity_change=cap["heldout_perplexity_change"],
                   known_facts_accuracy=cap["known_facts_accuracy"], known_facts_base=base_cap["known_facts_accuracy"],
                   known_facts_count=cap["known_facts_count"])
        for m in METRICS:
            for p in ("generation", "teacher_forced"):
                row[f"{m}/{p}"] = metric(after, m, p)
                row[f"{m}/{p}/base"] = metric(ref.before, m, p)
        return {"row": row, "per_request": after["per_request"]}

    rows = []
    for spec in grid(n_small, n_large) + (diagnostic_grid(n_small) if a.diagnostics else []):
        key = json.dumps(dict(spec, testbed=tb_hash, lr=a.lr, epochs=a.epochs, seed=a.seed, version=__version__), sort_keys=True)
        path = cache / "runs" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
        t0 = time.perf_counter()
        r = cached(path, lambda: run(spec))["row"]
        rows.append(r)
        print(f"{family(r):<34} γ {r['gamma']:<4g} n {r['n']:<5d} reliab. {num(r['reliability/generation'])} "
              f"rephr. {num(r['generalization/generation'])} local. {num(r['locality_agreement/generation'])} "
              f"known {num(r['known_facts_accuracy'])} KL {r['heldout_kl']:.4f} (pred. {r['predicted_kl']:.4f}) "
              f"ppl {r['heldout_perplexity_change']:+.2%} steps {r['steps']} [{time.perf_counter() - t0:.0f} s]", flush=True)

    results = {
        "version": __version__, "seed": a.seed, "threads": a.threads, "testbed": {
            "sha256": tb_hash, "inputs_sha256": build["inputs_sha256"], "parameters": build["parameters"],
            "config": build["config"], "facts": build["facts"], "fact_accuracy_by_generation": build["fact_accuracy_by_generation"],
            "majority_baseline_by_template": build["majority_baseline_by_template"], "perplexity": build["perplexity"],
            "train_cpu_s": build["train_cpu_s"], "train_wall_s": build["train_wall_s"]},
        "edit_pool_known": len(usable), "edit_pool": len(pool), "edited_rephrases_known_by_base": rephrase_known, "known_unedited_facts": rows[0]["known_facts_count"],
        "known_unedited_offered": len(known_facts), "layers": list(modules),
        "curvature": {"documents": len(curvature_docs), "tokens": stats["sampled"].meta["tokens"], "seconds": stats_time,
                      "diagnostic_fact_sentences": len(fact_docs)},
        "heldout": {"documents": len(heldout), "tokens": sum(len(d) - 1 for d in heldout)},
        "schedule": {"optimizer": "adam", "lr": a.lr, "batch_size": 32, "epochs": a.epochs, "loss_threshold": 1e-2},
        "rows": rows, "matched_reliability": matched(rows, n_small),
    }
    if not a.skip_stories:
        from bench_stories import stories_benchmark

        results["stories260k"] = cached(Path(a.cache) / f"stories-s{a.seed}-{__version__}.json",
                                        lambda: stories_benchmark(a.seed, [5e-4, 2e-3]))
    print(table(rows))
    print(f"-> {write_results(results, a.out)}")
    plot(rows, Path(a.plot))
    print(f"-> {a.plot}")


def num(x: float | None, digits: int = 3) -> str:
    """A metric for a table; "-" where there was nothing to measure (no locality prompt, say)."""
    return "-" if x is None else f"{x:.{digits}f}"


def matched(rows: list[dict], n: int, level: float = 0.9) -> dict:
    """Per method family at ``n`` edits: the run with the least held-out KL among those reaching
    ``level`` generation reliability (None when none does)."""
    out = {}
    for r in rows:
        if r["n"] != n or r["reliability/generation"] < level:
            continue
        f = family(r)
        if f not in out or r["heldout_kl"] < out[f]["heldout_kl"]:
            out[f] = {k: r[k] for k in ("gamma", "reliability/generation", "generalization/generation",
                                         "locality_agreement/generation", "known_facts_accuracy", "known_facts_base",
                                         "heldout_kl", "predicted_kl", "heldout_perplexity_change")}
    return {"level": level, "best": out, "families_below_level": sorted({family(r) for r in rows if r["n"] == n} - set(out))}


def table(rows: list[dict]) -> str:
    """The README's markdown table."""
    head = ("| method | γ | n | steps | reliability | rephrase | locality | known facts | KL held-out (K-FAC pred.) | ppl change |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {family(r)} | {r['gamma']:g} | {r['n']} | {r['steps']} | {num(r['reliability/generation'])} "
                     f"({num(r['reliability/teacher_forced'])}) | {num(r['generalization/generation'])} "
                     f"({num(r['generalization/teacher_forced'])}) | {num(r['locality_agreement/generation'])} "
                     f"({num(r['locality_agreement/teacher_forced'])}) | {num(r['known_facts_accuracy'])} | "
                     f"{r['heldout_kl']:.4f} ({r['predicted_kl']:.4f}) | {r['heldout_perplexity_change']:+.2%} |")
    return "\n".join(lines)


def known_lost(r: dict) -> float:
    """Accuracy on the known unedited facts lost by the edit (NaN when the base knew none)."""
    if r["known_facts_accuracy"] is None:
        return float("nan")
    return r["known_facts_base"] - r["known_facts_accuracy"]


def plot(rows: list[dict], path: Path) -> None:
    """Edit success against capability drift (held-out KL; known-fact accuracy lost), per method across γ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    colours = {"crispedit (sampled)": "tab:blue", "crispedit (empirical)": "tab:purple", "nullspace": "tab:green",
               "ft": "tab:red", "crispedit (sampled) projected-step": "tab:cyan",
               "crispedit (sampled) [wikitext+facts]": "tab:orange"}
    n_small = min(r["n"] for r in rows)
    for ax, x, label in ((axes[0], lambda r: r["heldout_kl"], "mean KL(base ‖ edited) on held-out WikiText (nats/token)"),
                         (axes[1], known_lost, "known unedited facts lost (accuracy points)")):
        for f in colours:
            pts = sorted((r for r in rows if family(r) == f and r["n"] == n_small), key=lambda r: r["gamma"])
            if not pts:
                continue
            ax.plot([x(r) for r in pts], [r["reliability/generation"] for r in pts], "o-", color=colours[f], label=f, alpha=0.8)
            for r in pts:
                if f != "ft":
                    ax.annotate(f"{r['gamma']:g}", (x(r), r["reliability/generation"]), fontsize=7, color=colours[f])
        for r in rows:
            if r["n"] != n_small:
                ax.scatter(x(r), r["reliability/generation"], marker="s", color=colours.get(family(r), "grey"), s=40,
                           label=f"{family(r)} n={r['n']}")
        ax.set_xlabel(label)
        if ax is axes[0]:
            ax.set_xscale("log")
    axes[0].set_ylabel("edit reliability (greedy generation)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"CounterFact/WikiText testbed: {n_small} edits, γ ∈ {{{', '.join(f'{g:g}' for g in GAMMAS)}}}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()

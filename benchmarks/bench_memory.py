"""Memory of an edit, tensor by tensor (issue 11 §2): does a LLaMA-3-8B bf16 edit fit an A40 (48 GB)?

(a) The account of ``crispedit.plan`` at LLaMA-3-8B and Qwen2.5-7B shapes (configurations written here
    from their published values; meta-device models, nothing downloaded), with the vocabulary-sized
    arrays of the statistics pass and of ``text_drift`` as they were before they were sliced, and the
    peaks if the further cuts named in ``FURTHER`` were made.
(b) A CPU check at a scaled-down width: a random small LLaMA in bf16, a real ``EditSession`` batch edit
    of synthetic requests with evaluation, the peak resident size above the loaded model per phase
    (``/proc/self/status`` VmHWM after a reset), next to ``plan`` for the same configuration; and the
    bytes autograd saves in a forward (``saved_tensors_hooks``) next to the plan's activation estimate.

    python benchmarks/bench_memory.py [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import reset_peak, vm, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.plan import GB, plan  # noqa: E402

# Published configurations (hidden, intermediate, layers, heads, kv heads, vocabulary).
TARGETS = {
    "LLaMA-3-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False},
}
BUDGET_BEYOND_MODEL = 12e9  # the target on an A40: 48 GB less the model, the CUDA context and headroom

# Cuts outside the files of this benchmark's issue, and the parts of the plan each removes or shrinks:
# (phase, moment or "state", {part: factor}). Not made here: proposals, with what they would save.
FURTHER = {
    "editor.eigenbases: the float64 eigh of a large factor on the CPU (as before commit 594840f), only the "
    "float32 vectors moved to the device": ("eigendecomposition", "eigh", {"factor": 0.0, "eigh_scratch": 0.0}),
    "EditOptimizer: torch.optim.Adam(..., fused=True) on CUDA (no foreach scratch)":
        ("edit_step", "adam_step", {"adam_scratch": 0.0}),
    "run_edit: drop the optimiser state (masters, Adam moments) before the evaluation of a run that no "
    "ledger continues": ("evaluation", "state", {"masters": 0.0, "adam_moments": 0.0}),
    "collect: divide the sums in place (no normalised copy)": ("statistics", "normalising", {"normalised_copy": 0.0}),
    "run_edit --corpus: drop collect's factors (its `stats`, on the device) once the session holds its own sums":
        ("corpus", "corpus_extra", {"statistics_kept_by_run_edit": 0.0}),
    "run_edit --corpus: collect with batch_size 2 (activations of 2 × 512 tokens)":
        ("statistics", "batch", {"activations": 0.25, "logits": 0.25, "backward_vector": 0.25,
                                 "backward_scratch": 0.25}),
}


# ---------------------------------------------------------------------------------------------
# (a) the account at 8B shapes


def _before_cuts(p: dict) -> dict:
    """The two phases whose vocabulary-sized arrays were sliced, as the code held them before:
    statistics: logits, their float32 copy and p = softmax [B, T, V] (then p, cdf and the logits);
    text_drift: log q, log p, exp(log p), log p − log q and the product, all float32 [B, T, V]."""
    a, V = p["assumed"], p["dims"]["vocab"]
    b = 2 if p["dtype"] in ("bfloat16", "float16") else (4 if p["dtype"] == "float32" else 8)
    f32 = max(4, b)
    ph = p["memory"]["phases"]
    Ns = a["statistics_documents"] * a["document_tokens"]
    Nd = a["drift_documents"] * a["document_tokens"]
    batch = dict(ph["statistics"]["moments"]["batch"]["parts"])
    for k in ("logits", "backward_vector", "probability_slices"):
        batch.pop(k)
    batch["logits_float32_p_cdf"] = Ns * V * (b + 2 * f32) if b < 4 else Ns * V * 3 * f32
    stats = ph["statistics"]["state"] + max(sum(batch.values()), ph["statistics"]["moments"]["normalising"]["bytes"])
    drift = 5 * Nd * V * f32
    others = max(v["bytes"] for k, v in ph["evaluation"]["moments"].items() if not k.startswith("text_drift"))
    evaluation = ph["evaluation"]["state"] + max(drift, others)
    return {"statistics": {"peak": stats, "vocabulary_arrays": batch["logits_float32_p_cdf"]},
            "evaluation": {"peak": evaluation, "vocabulary_arrays": drift}}


def _with_further(p: dict) -> dict:
    """Phase peaks if the ``FURTHER`` cuts were made (each part scaled by its factor)."""
    out = {}
    for name, ph in p["memory"]["phases"].items():
        moments = {k: dict(v["parts"]) for k, v in ph["moments"].items()}
        state = ph["state"]
        for phase, moment, scale in FURTHER.values():
            if phase != name:
                continue
            for part, f in scale.items():
                if moment == "state":
                    state -= int(p["memory"]["state"][part] * (1 - f))
                else:
                    moments[moment][part] = int(moments[moment][part] * f)
        out[name] = state + max(sum(v.values()) for v in moments.values())
    return out


def account(tmp: Path) -> dict:
    rows = {}
    for name, cfg in TARGETS.items():
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(cfg))
        p = plan(str(path))
        p["model"] = name
        before = _before_cuts(p)
        further = _with_further(p)
        phases = p["memory"]["phases"]
        after = {k: v["peak"] for k, v in phases.items()}
        before_all = {**after, **{k: v["peak"] for k, v in before.items()}}
        run = lambda peaks: max(v for k, v in peaks.items() if k != "statistics")  # noqa: E731
        kept = p["memory"]["corpus_extra"]["statistics_kept_by_run_edit"]
        rows[name] = {"plan": p, "before_cuts": before, "with_further_cuts": further,
                      # edit --curvature: no statistics pass in the run
                      "batch_run_with_curvature": {"before": run(before_all), "after": run(after),
                                                   "with_further_cuts": run(further)},
                      # edit --corpus: the statistics pass, then the run with collect's factors kept on the device
                      "batch_run_with_corpus": {"before": max(before_all["statistics"], run(before_all) + kept),
                                                "after": max(after["statistics"], run(after) + kept),
                                                "with_further_cuts": max(further.values())}}
    return rows


def print_account(rows: dict) -> None:
    for name, r in rows.items():
        p = r["plan"]
        mem = p["memory"]
        print(f"\n{name} ({p['dtype']}): model {mem['model_weights'] / GB:.2f} GB; editing "
              f"{len(p['modules'])} × {'/'.join(sorted({f'{o}x{i}' for o, i in p['modules'].values()}))}")
        print(f"  {'part':<44}{'GB':>8}")
        for k, v in mem["state"].items():
            print(f"  state: {k.replace('_', ' '):<37}{v / GB:8.3f}")
        print(f"  {'state total':<44}{mem['state_total'] / GB:8.3f}")
        print(f"  {'phase peak beyond the model':<44}{'before':>8}{'after':>8}{'+further':>9}")
        for k, ph in mem["phases"].items():
            before = r["before_cuts"].get(k, {}).get("peak", ph["peak"])
            further = r["with_further_cuts"][k]
            print(f"  {k.replace('_', ' '):<44}{before / GB:8.3f}{ph['peak'] / GB:8.3f}{further / GB:9.3f}")
        for label, key in (("batch run, --curvature", "batch_run_with_curvature"),
                           ("batch run, --corpus (statistics in the run)", "batch_run_with_corpus")):
            c = r[key]
            print(f"  {label:<44}{c['before'] / GB:8.3f}{c['after'] / GB:8.3f}{c['with_further_cuts'] / GB:9.3f}")


# ---------------------------------------------------------------------------------------------
# (b) a CPU check at a scaled-down width

SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 896,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192,
         "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
         "bos_token_id": 1, "eos_token_id": 2}


def _joined(tok, texts: list[str], tokens: int, count: int) -> list[list[int]]:
    """``count`` documents of about ``tokens`` tokens: consecutive texts joined."""
    docs, cur = [], []
    for t in texts:
        cur.extend(tok(t)["input_ids"] if not cur else tok(t, add_special_tokens=False)["input_ids"])
        if len(cur) >= tokens:
            docs.append(cur[:tokens])
            cur = []
            if len(docs) == count:
                break
    return docs


def saved_bytes(model, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs, the model's
    parameters excluded (a frozen weight, or its transpose, saved for an input gradient costs nothing)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def settle() -> None:
    """Collect garbage and give the C heap's free memory back (glibc ``malloc_trim``), so that a phase's
    peak is not inflated by memory an earlier phase freed but the allocator kept."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_check(tmp: Path, requests_n: int, epochs: int) -> dict:
    from transformers import AutoModelForCausalLM

    from crispedit.curvature import KFACHooks, collect
    from crispedit.demo import MODEL_DIR, demo_requests
    from crispedit.editor import _batch, tokenize_requests
    from crispedit.evaluate import measure, prepare_reference
    from crispedit.layers import find_modules
    from crispedit.model import load_tokenizer, resolve_dtype
    from crispedit.options import MethodOptions
    from crispedit.running import frozen, pad_batch, pad_id
    from crispedit.session import EditSession
    from crispedit.world import build_world

    dtype = "bfloat16"
    config_path = tmp / "small" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(SMALL))
    tok = load_tokenizer(str(MODEL_DIR))  # the demo's word-level tokenizer (560 ids, inside the 8192 vocabulary)
    world = build_world()
    requests, _ = demo_requests(requests_n, 0)
    corpus = _joined(tok, world.train_documents, 480, 16)
    heldout = _joined(tok, world.heldout_narrative, 480, 16)
    from transformers import AutoConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMALL), dtype=resolve_dtype(dtype)).eval()
    modules = find_modules(model, "auto")
    items = tokenize_requests(tok, requests)
    prompts = [r.prompt for r in requests] + [p for r in requests for p in r.rephrase_prompts] + \
        [p for r in requests for p, _ in r.locality]
    assumed = {"edit_tokens": max(len(x) for x, _ in items), "document_tokens": max(len(d) for d in corpus + heldout),
               "prompt_tokens": max(len(tok(p)["input_ids"]) + 2 for p in prompts), "corpus_documents": len(corpus)}
    p = plan(str(config_path), dtype=dtype, requests=len(requests), device="cpu", assumed=assumed)
    ph, host = p["memory"]["phases"], p["memory"]["host"]

    # autograd's saved tensors in one forward, against the activation estimates
    a = p["assumed"]
    ids, attn, labels = _batch(items[: a["batch_size"]], pad_id(tok), "cpu")
    Ne = ids.numel()
    with frozen(model, [m.weight for m in modules.values()]):
        edit_saved = saved_bytes(model, lambda: model(input_ids=ids, attention_mask=attn, use_cache=False).logits)
    docs = corpus[: a["statistics_documents"]]
    sids, sattn, rows = pad_batch(docs, [range(len(d) - 1) for d in docs], "cpu")
    hooks = KFACHooks(modules, torch.float32)
    hooks.rows = rows
    with frozen(model), hooks, torch.enable_grad():
        stats_saved = saved_bytes(model, lambda: model(input_ids=sids, attention_mask=sattn, use_cache=False).logits)
    scale = Ne / (a["batch_size"] * a["edit_tokens"])  # the plan's batch is padded to edit_tokens; this one to its own
    predicted_edit = ph["edit_step"]["moments"]["forward_backward"]["parts"]["activations"] * scale
    predicted_stats = ph["statistics"]["moments"]["batch"]["parts"]["activations"] * sids.numel() / (
        a["statistics_documents"] * a["document_tokens"])
    saved = {"edit_forward": {"measured": edit_saved, "planned": int(predicted_edit), "tokens": Ne},
             "statistics_forward": {"measured": stats_saved, "planned": int(predicted_stats), "tokens": sids.numel()}}
    del hooks

    # the run, phase by phase: the peak resident size above the loaded model
    options = MethodOptions(method="crispedit", gamma=0.8, lr=2e-3, epochs=epochs, batch_size=a["batch_size"],
                            loss_threshold=0.0)
    settle()
    base_rss = reset_peak()
    measured, seconds = {}, {}

    resident = {}

    def phase(name, fn):
        settle()
        resident[name] = (reset_peak() - base_rss) * 2**20
        start = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - start
        measured[name] = (vm("VmHWM") - base_rss) * 2**20
        return out

    stats = phase("statistics", lambda: collect(model, modules, corpus, labels="sampled", seed=0))
    session = phase("session_start", lambda: EditSession.start(model, tok, modules, options, stats))

    def reference():
        with session.at_base():
            ref = prepare_reference(model, tok, requests, "raw", heldout, corpus, [])
        ref.base_weights = session.base
        return ref

    ref = phase("reference", reference)
    record = phase("edit", lambda: session.edit(requests))  # ends with session.drift()
    phase("measure", lambda: measure(model, tok, ref))
    rss_end = (vm("VmRSS") - base_rss) * 2**20

    # what the plan says for each phase, with the host-side tensors a CPU run holds in the same memory
    st = p["memory"]["state"]
    kept = host["statistics_as_loaded"] + host["statistics_sums"]  # collect's factors (kept) and the session's sums
    before_adam = p["memory"]["state_total"] - st["adam_moments"]
    planned_start = {"statistics": 0, "session_start": host["statistics_as_loaded"], "reference": kept + before_adam,
                     "edit": kept + before_adam, "measure": kept + p["memory"]["state_total"]}
    planned = {
        "statistics": ph["statistics"]["peak"],
        "session_start": kept + max(ph["eigendecomposition"]["peak"], before_adam),
        "reference": kept + before_adam + max(m["bytes"] for m in ph["evaluation"]["moments"].values()),
        "edit": kept + max(ph["projector_build"]["peak"], ph["edit_step"]["peak"], ph["drift_report"]["peak"]),
        "measure": kept + ph["evaluation"]["peak"],
    }
    rows = {k: {"resident_at_start": resident[k], "planned_at_start": planned_start[k], "peak": measured[k],
                "planned_peak": planned[k], "ratio": measured[k] / planned[k],
                "rise": measured[k] - resident[k], "planned_rise": planned[k] - planned_start[k],
                "seconds": seconds[k]} for k in measured}
    return {"config": SMALL, "dtype": dtype, "requests": len(requests), "epochs": epochs, "steps": record["steps"],
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "assumed": assumed, "modules": list(modules), "phases": rows, "saved_for_backward": saved,
            "rss_after_run_above_model": rss_end, "plan": p,
            "peak": {"measured": max(measured.values()), "planned": max(planned.values()),
                     "ratio": max(measured.values()) / max(planned.values())}}


def print_cpu(c: dict) -> None:
    mb = 2**20
    print(f"\nCPU check: LLaMA {c['config']['hidden_size']}/{c['config']['intermediate_size']}/"
          f"{c['config']['num_hidden_layers']} layers/vocab {c['config']['vocab_size']}, {c['dtype']}, "
          f"{c['requests']} requests, {c['epochs']} epochs ({c['steps']} steps), MALLOC_MMAP_THRESHOLD_="
          f"{c['malloc_mmap_threshold']}; MiB of resident memory above the loaded model")
    print(f"  {'phase':<15}{'at start':>10}{'planned':>9}{'peak':>9}{'planned':>9}{'ratio':>7}"
          f"{'rise':>8}{'planned':>9}{'s':>6}")
    for k, r in c["phases"].items():
        print(f"  {k:<15}{r['resident_at_start'] / mb:10.1f}{r['planned_at_start'] / mb:9.1f}{r['peak'] / mb:9.1f}"
              f"{r['planned_peak'] / mb:9.1f}{r['ratio']:7.2f}{r['rise'] / mb:8.1f}{r['planned_rise'] / mb:9.1f}"
              f"{r['seconds']:6.1f}")
    pk = c["peak"]
    print(f"  {'peak':<15}{'':>19}{pk['measured'] / mb:9.1f}{pk['planned'] / mb:9.1f}{pk['ratio']:7.2f}")
    for k, r in c["saved_for_backward"].items():
        print(f"  saved for backward, {k} ({r['tokens']} tokens): measured {r['measured'] / mb:.1f} MiB, "
              f"estimated {r['planned'] / mb:.1f} MiB (ratio {r['measured'] / r['planned']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's dynamic mmap threshold (freed tensors may stay resident)")
    a = ap.parse_args()
    if not a.default_malloc and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # every tensor of 64 KiB or more is its own mapping, unmapped when freed: the resident size then
        # follows the live tensors (as CUDA's caching allocator reuses what is freed), not glibc's heap
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = account(Path(tmp))
        print_account(rows)
        cpu = cpu_check(Path(tmp), a.requests, a.epochs)
        print_cpu(cpu)
    results = {"version": __version__, "torch": torch.__version__, "threads": a.threads,
               "budget_beyond_model": BUDGET_BEYOND_MODEL, "further_cuts": {k: list(v[:2]) for k, v in FURTHER.items()},
               "targets": rows, "cpu_check": cpu}
    write_results(results, a.out)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()

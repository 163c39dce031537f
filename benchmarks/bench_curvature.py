"""Cost of the K-FAC statistics pass against a plain training step (issue 2, §6).

For each model: the whole statistics pass over the same batches for 5 layers in the default
`sampled` mode (label sampling and accumulation included) divided by forward + `loss.backward()`
with the HF labelled loss and only the 5 edited weights requiring grad. Minimum of REPS
interleaved runs, wall and CPU time; beside it the ratio that a matmul flop count predicts (and what
it predicts for LLaMA-3-8B shapes); one projection per layer divided by one forward+backward step;
peak resident memory of each phase, measured in a fresh process.

    python benchmarks/bench_curvature.py [--reps 5] [--out benchmarks/results/curvature.json]

Reads WikiText-2 and stories260K from ../shared when present (else synthetic token ids and the
small model only). Writes the results JSON and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import reset_peak, timed, vm, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.curvature import collect  # noqa: E402
from crispedit.layers import find_modules  # noqa: E402
from crispedit.projector import KroneckerProjector  # noqa: E402

DOCS, DOC_LEN, BATCH = 16, 256, 8


def small_llama():
    """A small LLaMA-architecture model with a realistic 32k vocabulary (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def load_model(name: str):
    if name == "small-llama":
        return small_llama()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SHARED / "models" / "stories260K").eval()


def documents() -> tuple[list[list[int]], str]:
    """DOCS chunks of DOC_LEN tokens of WikiText-2 (stories260K's tokenizer), else synthetic ids."""
    text_path = SHARED / "data" / "wikitext-2" / "valid.txt"
    if text_path.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K")
        ids = tok(text_path.read_text()[:60_000])["input_ids"]
        return [ids[i * DOC_LEN : (i + 1) * DOC_LEN] for i in range(DOCS)], "WikiText-2 valid (stories260K tokenizer)"
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (DOCS, DOC_LEN), generator=g).tolist(), "synthetic token ids (../shared absent)"


def baseline_pass(model, modules, docs) -> None:
    """Forward + loss.backward() with the HF labelled loss, only the edited weights requiring grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    for lo in range(0, len(docs), BATCH):
        ids = torch.tensor(docs[lo : lo + BATCH])
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for m in modules.values():
        m.weight.grad = None
        m.weight.requires_grad_(False)


def stats_pass(model, modules, docs):
    return collect(model, modules, docs, labels="sampled", batch_size=BATCH)


def matmul_flops_per_token(d, d_q, d_kv, d_ff, L, V, T, edited: list[int], d_in, d_out) -> dict:
    """Per-token matmul flops of the baseline step and of the statistics pass (2 flops per MAC).

    Forward: all blocks and the LM head. Backward (both): input gradients from the logits down to
    the output of the first edited layer (1x forward for weight matmuls, 2x for the two attention
    products). Baseline adds the weight gradients of the edited layers (2·d_in·d_out each);
    statistics add A (2·d_in²) and G (2·d_out²) per edited layer instead.
    """
    proj = 2 * (d * d_q + 2 * d * d_kv + d_q * d)
    attn = 2 * 2 * T * d_q  # QKᵀ and AV, full T×T as HF computes them
    mlp = 2 * 3 * d * d_ff
    head = 2 * d * V
    forward = L * (proj + attn + mlp) + head
    first = min(edited)
    backward = head + (L - 1 - first) * (proj + 2 * attn + mlp)
    baseline = forward + backward + len(edited) * 2 * d_in * d_out
    stats = forward + backward + len(edited) * 2 * (d_in**2 + d_out**2)
    return {"baseline": baseline, "statistics": stats, "ratio": stats / baseline}


def model_flops(model, modules) -> dict:
    c = model.config
    d_q = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    d_kv = c.num_key_value_heads * (d_q // c.num_attention_heads)
    edited = sorted(int(n.split(".")[2]) for n in modules)
    return matmul_flops_per_token(c.hidden_size, d_q, d_kv, c.intermediate_size, c.num_hidden_layers,
                                  c.vocab_size, DOC_LEN, edited, c.intermediate_size, c.hidden_size)


def peak_rss_mib(model_name: str, phase: str) -> dict:
    """Resident memory before one pass of ``phase`` and its peak during it, in a fresh process (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--child", model_name, phase], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(model_name: str, phase: str) -> None:
    model = load_model(model_name)
    modules = find_modules(model, "auto")
    docs, _ = documents()
    before = reset_peak()
    (baseline_pass if phase == "baseline" else stats_pass)(model, modules, docs)
    print(json.dumps({"before": before, "peak": vm("VmHWM"), "peak_increase": vm("VmHWM") - before}))


def bench_model(name: str, docs, reps: int) -> dict:
    model = load_model(name)
    modules = find_modules(model, "auto")
    assert len(modules) == 5
    stats_pass(model, modules, docs[:BATCH])  # warm-up
    baseline_pass(model, modules, docs[:BATCH])
    base_t, stat_t = [], []
    for _ in range(reps):  # interleaved, so both see the same machine load
        base_t.append(timed(lambda: baseline_pass(model, modules, docs))[:2])
        stat_t.append(timed(lambda: stats_pass(model, modules, docs))[:2])
    b_wall, b_cpu = min(t[0] for t in base_t), min(t[1] for t in base_t)
    s_wall, s_cpu = min(t[0] for t in stat_t), min(t[1] for t in stat_t)
    stats = stats_pass(model, modules, docs)
    step = b_wall / (len(docs) / BATCH)  # one forward+backward of a batch
    projection = {}
    for n in modules:
        P = KroneckerProjector.from_factors(stats.A[n], stats.G[n], 0.8)
        X = torch.randn_like(modules[n].weight)
        times = []
        for _ in range(20):
            w = time.perf_counter()
            P.project(X)
            times.append(time.perf_counter() - w)
        projection[n] = min(times)
    proj = max(projection.values())
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": list(modules),
        "tokens_per_pass": sum(len(d) - 1 for d in docs),
        "baseline_s": {"wall": b_wall, "cpu": b_cpu},
        "statistics_s": {"wall": s_wall, "cpu": s_cpu},
        "ratio": {"wall": s_wall / b_wall, "cpu": s_cpu / b_cpu},
        "ratio_all_reps_wall": [s[0] / b[0] for s, b in zip(stat_t, base_t)],
        "flop_prediction": model_flops(model, modules),
        "projection_s_per_layer_max": proj,
        "projection_over_step": proj / step,
        "peak_rss_mib": {"baseline": peak_rss_mib(name, "baseline"), "statistics": peak_rss_mib(name, "statistics")},
        "factor_bytes": sum(stats.A[n].numel() * 4 + stats.G[n].numel() * 4 for n in modules),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curvature.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        child(*a.child)
        return
    docs, source = documents()
    names = ["small-llama"] + (["stories260K"] if (SHARED / "models" / "stories260K").exists() else [])
    results = {
        "version": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_before": os.getloadavg(),
        "reps": a.reps,
        "corpus": source,
        "documents": len(docs),
        "doc_len": DOC_LEN,
        "batch_size": BATCH,
        "models": [bench_model(n, docs, a.reps) for n in names],
        "llama3_8b_flop_prediction": matmul_flops_per_token(4096, 4096, 1024, 14336, 32, 128256, 512, [19, 20, 21, 22, 23], 14336, 4096),
        "gpu": "not measured: no GPU was lent to this session",
        "loadavg_after": os.getloadavg(),
    }
    out = write_results(results, a.out)
    for m in results["models"]:
        print(f"{m['model']:>12}: statistics / (forward + backward) = {m['ratio']['wall']:.2f} wall, "
              f"{m['ratio']['cpu']:.2f} CPU (flop count predicts {m['flop_prediction']['ratio']:.2f}); "
              f"projection / step = {m['projection_over_step']:.4f}; peak RSS increase "
              f"{m['peak_rss_mib']['statistics']['peak_increase']:.0f} MiB vs {m['peak_rss_mib']['baseline']['peak_increase']:.0f} MiB")
    print(f"LLaMA-3-8B shapes, layers 19-23, 512 tokens: flop count predicts {results['llama3_8b_flop_prediction']['ratio']:.3f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

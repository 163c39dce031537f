"""GPU benchmark of crispedit at LLaMA-3-8B's configuration (randomly initialised, bf16, no download).

Phases (each a function, selectable, resumable; results written after every phase):

- ``stats``: ``curvature.collect`` over 100 documents × 512 random token ids (not text), sampled
  labels, batch 8, on ``mlp.down_proj`` of layers 19–23.
- ``eigh``: ``eigh_factor`` of one layer's A (14336²) and G (4096²) in float64 and float32, the
  float32 check (``eigh_errors`` against ``eigh_tolerance``) and whether its CPU fallback would fire.
- ``projection``: one projection per call in each form (dense, corner, factors) and rotation
  precision (float32, tf32, bfloat16) at gamma 0.5 / 0.8 / 0.9, with the real eigenbases of the
  statistics above, next to the counted flops (``KroneckerProjector.flops(T)``).
- ``step``: one edit step (forward + backward of 32 requests of 20 tokens, projection of the five
  gradients, Adam on the float32 masters) through ``EditOptimizer`` + ``run_epochs``, and its parts.
- ``edit``: 3,000 synthetic requests in one batch through ``EditSession`` (gamma 0.8, ``--epochs``).

The model is random: its curvature spectra (and so the removed corner, the form the projector picks
and the cost of the corner and factor forms) differ from a trained LLaMA-3-8B's; the dense form's
cost does not depend on the spectra. Requests are random words of an in-memory word-level tokenizer
(word ``w{i}`` is token ``i``); the edit loss of a random model never reaches the threshold, so every
epoch runs: the time, not the quality, is the point.

    python benchmarks/bench_gpu.py                         # all phases, benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --phases step,edit --force --epochs 25
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --dry-run   # every phase on the CPU, tiny model

Without CUDA (and without ``--dry-run``) it says so and exits 0. Time is CUDA-event time with a
synchronisation before and after (it includes host work between the events); memory is
``torch.cuda.max_memory_allocated`` during the call (the model's 16 GB included), with what was
allocated when the call began beside it. The dry run reports wall time and the process's peak RSS.

Expected time of a full run on an H100 / H200 (nominal dense rates: bf16 990 TFLOP/s, plain fp32
67 TFLOP/s, tf32 495; HBM 3.35 TB/s on the H100, 4.8 on the H200); each phase's derivation is in a
comment above its function: model build ~15 s, stats ~5–10 s, eigh ~20–50 s, eigenbases of the
five layers (shared by projection, step and edit) ~60–170 s, projection ~10–15 s, step ~5 s, edit
~35 s + ~45 s per epoch (3 epochs by default: ~3 min). About 5–8 minutes in all; the eigh figures
are the least certain.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics as pystats
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import reset_peak, vm, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.curvature import KFACStatistics, collect  # noqa: E402
from crispedit.editor import (EditOptimizer, _batch, build_projectors, edit_loss, eigenbases,  # noqa: E402
                              run_epochs, tokenize_requests)
from crispedit.layers import find_modules  # noqa: E402
from crispedit.options import MethodOptions  # noqa: E402
from crispedit.projector import (PROJECTION_DTYPES, KroneckerProjector, eigh_errors, eigh_factor,  # noqa: E402
                                 eigh_tolerance)
from crispedit.requests import EditRequest  # noqa: E402
from crispedit.running import frozen, full_precision, pad_id  # noqa: E402
from crispedit.session import EditSession, Sums  # noqa: E402

PHASES = ("stats", "eigh", "projection", "step", "edit")
OUT = ROOT / "benchmarks" / "results" / "gpu.json"
CACHE = Path(tempfile.gettempdir()) / "crispedit-bench-gpu-eigh"
GIB = 2**30

# LLaMA-3-8B (Meta-Llama-3-8B config.json), built from the config: no weights are downloaded.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LAYERS = [19, 20, 21, 22, 23]  # the paper's layers for LLaMA-3-8B (layers.PAPER_LAYERS)
TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
TINY_LAYERS = [1, 2]

GAMMAS = (0.5, 0.8, 0.9)
GAMMA_EDIT = 0.8  # MethodOptions' default
LR = 5e-4  # MethodOptions' default
FORMS = ("dense", "corner", "factors")
PROMPT_WORDS, TARGET_WORDS = 15, 4  # + BOS: 20 tokens per request, about a CounterFact request in LLaMA-3's tokenizer
FIRST_WORD = 3  # ids 0-2 are <unk>, <s>, </s>


@dataclasses.dataclass(frozen=True)
class Sizes:
    documents: int = 100
    document_tokens: int = 512
    stats_batch: int = 8
    step_requests: int = 32  # the paper's batch
    edit_requests: int = 3000
    epochs: int = 3  # 25 is MethodOptions' maximum; 3 keeps a full run near 6 minutes (see the docstring)
    reps: int = 5


DRY_SIZES = Sizes(documents=16, document_tokens=64, edit_requests=96, epochs=2, reps=2)


# ---------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass
class Measured:
    seconds: float  # CUDA-event time (wall time on the CPU)
    wall_s: float
    peak_gib: float  # max_memory_allocated during the call (CPU: peak RSS of the process)
    start_gib: float  # memory_allocated when the call began (CPU: RSS)

    def record(self) -> dict:
        return {"time_s": round(self.seconds, 4), "wall_s": round(self.wall_s, 4),
                "peak_memory_gib": round(self.peak_gib, 3), "allocated_before_gib": round(self.start_gib, 3)}


def measure(fn: Callable, device: torch.device):
    """``(Measured, fn())``: CUDA events around ``fn`` with a synchronisation before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        wall = time.perf_counter()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - wall
        return Measured(start.elapsed_time(end) / 1e3, wall, torch.cuda.max_memory_allocated(device) / GIB,
                        before / GIB), out
    try:
        before = reset_peak() / 1024
    except OSError:  # no /proc/self/clear_refs: the peak is the process's since it began
        before = vm("VmRSS") / 1024
    wall = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - wall
    return Measured(wall, wall, vm("VmHWM") / 1024, before), out


def repeat(fn: Callable, device: torch.device, reps: int) -> dict:
    """One warm-up call, then ``reps`` timed calls: min and median seconds, and the largest peak."""
    measure(fn, device)
    runs = [measure(fn, device)[0] for _ in range(reps)]
    times = [r.seconds for r in runs]
    return {"min_s": min(times), "median_s": pystats.median(times), "reps": reps,
            "peak_memory_gib": round(max(r.peak_gib for r in runs), 3)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# inputs: model, tokenizer, documents, requests


def build_model(config: dict, device: torch.device):
    """A randomly initialised LLaMA in bf16, initialised on ``device`` (8B parameters on the CPU
    first would take minutes and 32 GB)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.bfloat16)
    return model.eval()


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer built in memory: word ``w{i}`` is token ``i`` (3 ≤ i < vocab);
    0-2 are <unk>, <s> (prepended to every text, as LLaMA-3 prepends its BOS) and </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(FIRST_WORD, vocab)}}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_documents(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` documents of ``length`` random token ids (not text)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_WORD, vocab, (n, length), generator=g).tolist()


def synthetic_requests(n: int, vocab: int, seed: int) -> list[EditRequest]:
    """``n`` requests of random words: a 15-word prompt and a 4-word target (20 tokens with BOS)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(FIRST_WORD, vocab, (n, PROMPT_WORDS + TARGET_WORDS), generator=g).tolist()
    words = [[f"w{i}" for i in row] for row in rows]
    return [EditRequest(" ".join(w[:PROMPT_WORDS]), " ".join(w[PROMPT_WORDS:]), case_id=k) for k, w in enumerate(words)]


class DeviceEighSession(EditSession):
    """``EditSession`` with its eigendecompositions on the device of the edited matrices.

    ``EditSession`` keeps the protected sums on the CPU (``Sums.of``), so its ``eigh`` of the
    factors runs there, in float64: minutes for five 14336² factors. This subclass moves the
    factors to the matrices' device first and otherwise runs the session's own code
    (``eigenbases`` / ``eigh_factor``, float64); ``--session-eigh cpu`` measures the session as is."""

    def _eigen(self, stats: KFACStatistics, cache=None):
        dev = next(iter(self.modules.values())).weight.device
        moved = KFACStatistics({n: v.to(dev) for n, v in stats.A.items()}, {n: v.to(dev) for n, v in stats.G.items()},
                               stats.tokens, stats.meta)
        return super()._eigen(moved, cache)


# ---------------------------------------------------------------------------------------------
# the bench: shared state, dependencies computed once per process


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, config: dict, layers: list[int], sizes: Sizes):
        self.args, self.device, self.config, self.layers, self.sizes = args, device, config, layers, sizes
        self.vocab = config["vocab_size"]
        self.cache_dir = Path(args.cache_dir)
        self.dependencies: dict[str, dict] = {}  # what a phase needed and this process computed first
        import transformers  # noqa: F401  (its import is not the model's build)

        m, self.model = measure(lambda: build_model(config, device), device)
        self.dependencies["model_build"] = m.record()
        self.modules = find_modules(self.model, layers)
        self.first = next(iter(self.modules))
        m, self.tok = measure(lambda: word_tokenizer(self.vocab), device)
        self.dependencies["tokenizer_build"] = m.record()
        self._stats: KFACStatistics | None = None
        self._eig = None

    def collect_statistics(self) -> tuple[Measured, KFACStatistics]:
        s = self.sizes
        docs = random_documents(s.documents, s.document_tokens, self.vocab)
        m, stats = measure(lambda: collect(self.model, self.modules, docs, labels="sampled", batch_size=s.stats_batch),
                           self.device)
        self._stats = stats
        return m, stats

    def statistics(self) -> KFACStatistics:
        if self._stats is None:
            m, _ = self.collect_statistics()
            self.dependencies["stats"] = m.record()
        return self._stats

    def eigenbases(self):
        """Eigenbases of the five layers, float32 vectors on the device, from exactly the factors the
        session computes (``Sums.of`` then ``_factors``), through the product's eigen cache: a
        session started with ``eigen_cache`` afterwards finds them there."""
        if self._eig is None:
            stats = self.statistics()
            factors = EditSession._factors(Sums.of(stats))
            on_dev = KFACStatistics({n: v.to(self.device) for n, v in factors.A.items()},
                                    {n: v.to(self.device) for n, v in factors.G.items()}, factors.tokens, {})
            before = cache_files(self.cache_dir)
            devices = {n: self.device for n in self.modules}
            m, self._eig = measure(lambda: eigenbases(on_dev, devices, torch.float32, self.cache_dir), self.device)
            del on_dev, factors
            self.dependencies["eigenbases"] = {**m.record(), "factors": 2 * len(self.modules),
                                               "computed": cache_files(self.cache_dir) - before,
                                               "note": "eigh_factor's default (float64 up to 16384 rows) on the "
                                                       "device, through the eigen cache (files written)"}
        return self._eig

    def save_weights(self) -> dict[str, torch.Tensor]:
        return {n: m.weight.detach().clone() for n, m in self.modules.items()}

    @torch.no_grad()
    def restore_weights(self, saved: dict[str, torch.Tensor]) -> None:
        for n, m in self.modules.items():
            m.weight.copy_(saved[n])


def cache_files(directory: Path) -> int:
    return len(list(directory.glob("eigh-*.safetensors"))) if directory.exists() else 0


def matmul_params(config: dict) -> int:
    """Parameters that take part in matmuls per token: the decoder blocks and the LM head."""
    h, f, L, V = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * f) + V * h


# ---------------------------------------------------------------------------------------------
# phases
#
# stats. 100 × 512 = 51,200 positions. Forward 2 · 7.5e9 · 51,200 = 7.7e14 bf16 flops; backward of the
# activations only, from the logits to layer 19 (weights frozen): LM head + 12 blocks ≈ 3.2e14; the
# hooks' A sums 2 · 51,100 · 14336² · 5 = 1.05e14 and G sums 8.6e12 in full fp32. At ~600 TFLOP/s
# bf16 and ~50 fp32: ~1.8 s + ~2.3 s, plus the softmax / cumsum / sampling over [8, 512, 128256]
# (2 GB float32 per pass, ~10 passes per batch, 13 batches: ~0.1 s). Estimate ~5–10 s; peak ~30 GB
# (model 16 GB, A and G sums 4.4 GB, logits / probabilities / CDF of one batch ~6 GB, activations).


def phase_stats(b: Bench) -> dict:
    m, stats = b.collect_statistics()
    tokens = next(iter(stats.tokens.values()))
    fwd = 2 * matmul_params(b.config) * b.sizes.documents * b.sizes.document_tokens
    return {**m.record(), "documents": b.sizes.documents, "document_tokens": b.sizes.document_tokens,
            "labelled_tokens": tokens, "batch_size": b.sizes.stats_batch, "labels": "sampled",
            "tokens_per_s": round(tokens / m.seconds, 1), "forward_flops_estimate": fwd,
            "inputs": "random token ids (not text)",
            "modules": {n: list(stats.G[n].shape) + list(stats.A[n].shape) for n in stats.names}}


# eigh. cuSOLVER syevd: the tridiagonal reduction is 4/3 n³ flops, half of them in memory-bound symv
# (≈ n³/3 elements read: n = 14336 → 9.8e11, 3.9 TB in fp32, 7.9 TB in fp64: 1.2 s / 2.4 s at
# 3.35 TB/s), the rest (syr2k, divide and conquer, back-transformation ≈ 4 n³ = 1.2e13) at ~50
# TFLOP/s fp32/fp64: 0.25 s. That floor is ~1.5 s (fp32) / ~3 s (fp64) for A; cuSOLVER runs well
# above it for n this size: estimate A 5–15 s (fp32), 10–30 s (fp64); G (4096², 41× fewer n³) < 1 s.
# The float32 check is two 14336³ fp32 matmuls (1.2e13 flops): ~0.25 s. Estimate ~20–50 s.


def phase_eigh(b: Bench) -> dict:
    stats = b.statistics()
    out: dict = {"layer": b.first, "note": "eigh_factor: symmetrise, eigh, sort, clamp; its float32 time includes "
                                          "the check (eigh_errors), float32_check times the check alone; a failed "
                                          "check's fallback (float64 on the CPU) is not run"}
    for key, M in (("A", stats.A[b.first]), ("G", stats.G[b.first])):
        n = M.shape[0]
        row: dict = {"dim": n}
        m64, e64 = measure(lambda: eigh_factor(M, f"{b.first}.{key}", torch.float64), b.device)
        row["float64"] = m64.record()
        with warnings.catch_warnings():
            # the fallback would recompute on the CPU (minutes at 14336²): raise instead, and say so
            warnings.filterwarnings("error", message=r".*eigh is off.*", category=RuntimeWarning)
            try:
                m32, e32 = measure(lambda: eigh_factor(M, f"{b.first}.{key}", torch.float32), b.device)
                row["float32"] = {**m32.record(), "fallback": False}
            except RuntimeWarning as w:
                e32 = None
                row["float32"] = {"fallback": True, "message": str(w)}
        if e32 is not None:
            S = (M.float() + M.float().T) / 2
            mc, (residual, orthogonality) = measure(lambda: eigh_errors(S, e32.values, e32.vectors), b.device)
            tol = eigh_tolerance(n, torch.float32)
            top = float(e64.values[0])
            row["float32_check"] = {**mc.record(), "residual": residual, "orthogonality": orthogonality,
                                    "tolerance": tol, "passes": residual <= tol and orthogonality <= tol}
            row["float32_vs_float64_eigenvalues"] = float((e32.values.double() - e64.values).abs().max() / top)
            del S
        row["eigenvalue_range"] = [float(e64.values[-1]), float(e64.values[0])]
        out[key] = row
    return out


# projection. Dense (four rotations) at 4096 × 14336: 2·(2·4096·14336² + 2·4096²·14336) = 4.3e12
# flops: ~65–90 ms in fp32 (67 TFLOP/s nominal), ~10 ms in tf32, ~5 ms in bf16. The corner and
# factor forms cost what the staircase makes them cost (counted flops in the results); the random
# model's flat spectra make the removed corner large. 3 gammas × 3 precisions × 3 forms × (1 + reps)
# calls: ~54 fp32 calls of ≤ 0.1 s and ~108 faster ones, plus 3 energy rules: estimate ~10–15 s.


def phase_projection(b: Bench) -> dict:
    eig = b.eigenbases()
    eA, eG = eig[b.first]
    d_out, d_in = eG.vectors.shape[0], eA.vectors.shape[0]
    T = b.sizes.step_requests * (1 + PROMPT_WORDS + TARGET_WORDS)  # positions of one mini-batch gradient
    g_ = torch.Generator(device=b.device).manual_seed(0)
    g = torch.randn(T, d_out, generator=g_, device=b.device)
    a = torch.randn(T, d_in, generator=g_, device=b.device)
    with full_precision():
        X = g.T @ a
    out: dict = {"layer": b.first, "shape": [d_out, d_in], "T": T,
                 "gradient": "X = gᵀa of random g, a (time does not depend on the values)",
                 "eigenbases": "real, of the random model's statistics (its spectra differ from a trained model's)",
                 "gammas": {}}
    for gamma in GAMMAS:
        mb, P0 = measure(lambda: KroneckerProjector.from_eigen(eA, eG, gamma, dtype=torch.float32), b.device)
        row: dict = {"build": mb.record(), "r_A": P0.r_A, "r_G": P0.r_G, "removed": P0.threshold.removed,
                     "removed_share": P0.threshold.removed_share}
        if P0.is_identity:
            row["note"] = "nothing removed: the projection is the identity"
            out["gammas"][str(gamma)] = row
            continue
        flops = P0.flops(T)
        row.update(cheapest_form_X=P0.form(), cheapest_form_factors=P0.form(T), flops=flops, timings={})
        for precision in PROJECTION_DTYPES:
            P = dataclasses.replace(P0, projection_dtype=precision)
            calls = {"dense": lambda P=P: P.project(X, form="dense"),
                     "corner": lambda P=P: P.project(X, form="corner"),
                     "factors": lambda P=P: P.project_factors(g, a, X=X, form="factors")}
            for form in FORMS:
                t = repeat(calls[form], b.device, b.sizes.reps)
                t["tflops_per_s"] = round(flops[form] / t["min_s"] / 1e12, 3)
                row["timings"][f"{precision}/{form}"] = t
        out["gammas"][str(gamma)] = row
    return out


# step. 32 requests × 20 tokens = 640 positions. Forward 2 · 7.5e9 · 640 = 9.6e12 bf16 flops,
# backward of the activations from the logits to layer 19 ≈ 4.3e12, weight gradients of the five
# matrices 3.8e11: ~1.4e13 at ~400 TFLOP/s (small batch) = 35 ms, plus ~1,500 kernel launches: ~50–
# 80 ms. Projection of five gradients: dense 5 · 4.3e12 = 2.2e13 fp32 flops = ~0.35 s at ~60 TFLOP/s
# (corner / factors when the staircase is small). Adam on 5 · 58.7M float32 masters: ~8 GB of
# traffic, ~5 ms. Estimate ~0.45 s per step; 1 warm-up + reps steps + the parts: ~5 s.


def phase_step(b: Bench) -> dict:
    eig = b.eigenbases()
    precision = b.args.projection_dtype
    projectors = build_projectors(eig, "crispedit", GAMMA_EDIT, torch.float32, precision)
    requests = synthetic_requests(b.sizes.step_requests, b.vocab, seed=1)
    saved = b.save_weights()
    state = EditOptimizer(b.modules, "adam", LR)
    seeds = iter(range(10**6))

    def step() -> float:
        steps, losses = run_epochs(b.model, b.tok, requests, projectors, state, batch_size=b.sizes.step_requests,
                                   epochs=1, loss_threshold=0.0, seed=next(seeds))
        assert steps == 1, steps
        return losses[0]

    try:
        full = repeat(step, b.device, b.sizes.reps)
        # the parts of one step, timed on their own
        ids, attn, labels = _batch(tokenize_requests(b.tok, requests), pad_id(b.tok), b.device)

        def forward_backward() -> dict[str, torch.Tensor]:
            with frozen(b.model, state.weights):
                edit_loss(b.model, ids, attn, labels).backward()
                return {n: m.weight.grad.detach().to(torch.float32) for n, m in b.modules.items()}

        fb = repeat(forward_backward, b.device, b.sizes.reps)
        grads = forward_backward()
        proj = repeat(lambda: {n: projectors[n].project(grads[n]) for n in grads}, b.device, b.sizes.reps)
        projected = {n: projectors[n].project(grads[n]) for n in grads}

        def adam() -> None:
            for n, w in state.masters.items():
                w.grad = projected[n]
            state.opt.step()

        opt = repeat(adam, b.device, b.sizes.reps)
    finally:
        b.restore_weights(saved)
    T = int(attn.sum())
    out = {"time_s": round(full["min_s"], 4), "peak_memory_gib": full["peak_memory_gib"], "step": full,
           "forward_backward": fb, "projection": proj, "adam": opt,
           "rest_s": full["min_s"] - fb["min_s"] - proj["min_s"] - opt["min_s"],
           "requests": b.sizes.step_requests, "tokens": T, "gamma": GAMMA_EDIT, "projection_dtype": precision,
           "forms": {n: P.form() for n, P in projectors.items()},
           "projection_flops": sum(P.flops()[P.form()] for P in projectors.values()),
           "forward_flops_estimate": 2 * matmul_params(b.config) * T,
           "note": "step: one run_epochs call (1 epoch, 1 batch, loss_threshold 0) on EditOptimizer; rest_s: "
                   "tokenising, batching, grad upcast, master write-back (step minus the timed parts)"}
    return out


# edit. 3000 requests / 32 = 94 steps per epoch at ~0.45 s: ~45 s per epoch (25 epochs: ~18 min,
# hence --epochs 3 by default). Session start: the statistics to the CPU (4.4 GB), the factors,
# SHA-256 of the base weights and (eigen cache) of the factors, cached eigenbases loaded: ~10–15 s
# (+ the eigenbases, ~60–170 s, when the cache is cold). The 3000 edit texts get K-FAC statistics
# (375 batches of 8 × 20 tokens, launch-bound: ~15–20 s; inside session.edit, or afterwards where the
# session defers them), and the drift report takes ~1 s. Estimate ~35 s + 45 s per epoch.


def phase_edit(b: Bench) -> dict:
    stats = b.statistics()
    mode = b.args.session_eigh
    requests = synthetic_requests(b.sizes.edit_requests, b.vocab, seed=2)
    options = MethodOptions(gamma=GAMMA_EDIT, epochs=b.sizes.epochs,
                            projection_dtype=b.args.projection_dtype)
    cls = EditSession if mode == "cpu" else DeviceEighSession
    cache = str(b.cache_dir) if mode == "cache" else None
    before = cache_files(b.cache_dir)
    saved = b.save_weights()
    try:
        ms, session = measure(lambda: cls.start(b.model, b.tok, b.modules, options, stats, eigen_cache=cache), b.device)
        computed = cache_files(b.cache_dir) - before if cache else None
        me, record = measure(lambda: session.edit(requests), b.device)
        flush = None
        if getattr(session, "pending", None):  # statistics of the chunk's edit texts, taken lazily
            mf, _ = measure(session.flush_statistics, b.device)
            flush = {**mf.record(), "tokens": record.get("statistics_tokens")}
        session.restore_base()
    finally:
        b.restore_weights(saved)
    steps = record["steps"]
    out = {**me.record(), "start": {**ms.record(), "session_eigh": mode, "eigendecompositions_computed": computed},
           "requests": len(requests), "batch_size": options.batch_size, "epochs_max": options.epochs,
           "gamma": GAMMA_EDIT, "projection_dtype": options.projection_dtype, "steps": steps,
           "epochs": record["epochs"], "epoch_losses": record["epoch_losses"], "final_loss": record["final_loss"],
           "seconds": record["seconds"], "seconds_per_step": record["seconds"]["edit"] / steps if steps else None,
           "statistics_tokens": record.get("statistics_tokens"), "edit_statistics": flush,
           "predicted_kl": record["drift"].get("total", {}).get("predicted_kl"),
           "forms": {n: P.form() for n, P in session.projectors.items()},
           "note": "time_s: session.edit (rebuild + epochs + drift report, and the edits' statistics where the "
                   "session takes them at once; edit_statistics: where it defers them, taken after the timing); "
                   "a random model's loss never reaches the threshold, so every epoch runs"}
    return out


PHASE_FUNCTIONS = {"stats": phase_stats, "eigh": phase_eigh, "projection": phase_projection,
                   "step": phase_step, "edit": phase_edit}


# ---------------------------------------------------------------------------------------------
# results


def device_info(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "crispedit": __version__, "commit": git_commit()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / GIB, 1), multiprocessors=p.multi_processor_count,
                    memory_measure="torch.cuda.max_memory_allocated", time_measure="torch.cuda.Event")
    else:
        info.update(name="cpu (dry run)", threads=torch.get_num_threads(), memory_measure="peak RSS (VmHWM)",
                    time_measure="time.perf_counter")
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_results(path: Path, config: dict, device: dict, force: bool) -> dict:
    """The results so far, when they were measured on this configuration and device; else a new dict
    (with ``--force``) or an error."""
    fresh = {"benchmark": "bench_gpu", "config": config, "device": device, "phases": {}, "runs": []}
    if not path.exists():
        return fresh
    old = json.loads(path.read_text())
    if old.get("config") == config and old.get("device", {}).get("name") == device["name"]:
        return old
    if force:
        return fresh
    raise SystemExit(f"bench_gpu: error: {path} holds results of another configuration or device "
                     f"({old.get('device', {}).get('name')}); pass --force to start it afresh, or another --out")


def print_table(results: dict) -> None:
    phases = results["phases"]
    dev = results["device"]
    print(f"\n{dev['name']} | torch {dev['torch']} | CUDA {dev['cuda']} | crispedit {dev['crispedit']}")
    print(f"{'phase':<12}{'time s':>10}{'peak GiB':>10}  detail")
    for name in PHASES:
        r = phases.get(name)
        if r is None:
            print(f"{name:<12}{'-':>10}{'-':>10}  not run")
            continue
        detail = ""
        if name == "stats":
            detail = f"{r['labelled_tokens']} tokens, {r['tokens_per_s']:.0f} tokens/s"
        elif name == "step":
            detail = (f"fwd+bwd {r['forward_backward']['min_s']:.3f} s, projection {r['projection']['min_s']:.3f} s, "
                      f"adam {r['adam']['min_s']:.4f} s ({r['projection_dtype']}, "
                      f"forms {sorted(set(r['forms'].values()))})")
        elif name == "edit":
            s = r["seconds"]
            detail = (f"{r['requests']} requests, {r['steps']} steps in {r['epochs']} epochs, "
                      f"{r['seconds_per_step'] or 0:.3f} s/step; start {r['start']['time_s']:.1f} s, "
                      f"edits' statistics {(r['edit_statistics'] or {}).get('time_s', s['statistics']):.1f} s")
        if name == "eigh":
            total = sum(r[k][p]["time_s"] for k in ("A", "G") for p in ("float64", "float32") if "time_s" in r[k][p])
            print(f"{name:<12}{total:>10.2f}{max(r[k]['float64']['peak_memory_gib'] for k in ('A', 'G')):>10.2f}  "
                  f"{r['layer']}")
            for k in ("A", "G"):
                row = r[k]
                f32 = row["float32"]
                check = row.get("float32_check", {})
                print(f"{'':<12}{k} {row['dim']}²: float64 {row['float64']['time_s']:.2f} s, float32 "
                      + (f"{f32['time_s']:.2f} s, check {check.get('time_s', 0):.3f} s "
                         f"(residual {check.get('residual', 0):.1e}, "
                         f"orthogonality {check.get('orthogonality', 0):.1e}, "
                         f"tolerance {check.get('tolerance', 0):.1e})" if not f32["fallback"]
                         else f"check FAILED, its CPU float64 fallback not run: {f32['message']}"))
            continue
        if name == "projection":
            print(f"{name:<12}{'':>10}{'':>10}  {r['layer']} {r['shape'][0]}×{r['shape'][1]}, T = {r['T']}; "
                  "min ms / counted GFLOP / TFLOP/s")
            for gamma, row in r["gammas"].items():
                if "timings" not in row:
                    print(f"{'':<12}gamma {gamma}: {row.get('note')}")
                    continue
                print(f"{'':<12}gamma {gamma}: r_G × r_A = {row['r_G']} × {row['r_A']}, removed share "
                      f"{row['removed_share']:.3f}, cheapest {row['cheapest_form_X']} / {row['cheapest_form_factors']}")
                for key, t in row["timings"].items():
                    form = key.split("/")[1]
                    print(f"{'':<14}{key:<20}{t['min_s'] * 1e3:>9.2f} ms{row['flops'][form] / 1e9:>10.3g} GF"
                          f"{t['tflops_per_s']:>9.2f} TF/s{t['peak_memory_gib']:>8.2f} GiB")
            continue
        print(f"{name:<12}{r['time_s']:>10.2f}{r['peak_memory_gib']:>10.2f}  {detail}")
    for run in results.get("runs", [])[-1:]:
        deps = ", ".join(f"{k} {v['time_s']:.1f} s" for k, v in run.get("dependencies", {}).items())
        print(f"last run: {run['phases']} (dependencies: {deps or 'none'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--force", action="store_true", help="rerun phases already in the results file")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU with a tiny model")
    parser.add_argument("--out", help=f"results file (default {OUT.relative_to(ROOT)}; dry run: a temporary file)")
    parser.add_argument("--epochs", type=int, help=f"edit phase: maximum epochs (default {Sizes.epochs}; 25 at most)")
    parser.add_argument("--reps", type=int, help=f"timed repetitions of the projection and step (default {Sizes.reps})")
    parser.add_argument("--projection-dtype", default="float32", choices=PROJECTION_DTYPES,
                        help="rotation precision in the step and edit phases")
    parser.add_argument("--session-eigh", default="cache", choices=("cache", "gpu", "cpu"),
                        help="edit phase: the session's eigendecompositions through the eigen cache (filled on the "
                             "GPU by earlier phases), on the GPU without it, or as EditSession does them (CPU float64)")
    parser.add_argument("--cache-dir", help=f"eigen cache (default {CACHE}; dry run: a temporary directory)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (dry run: 1)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown phase {unknown[0]!r}; choose from {', '.join(PHASES)}")
    if args.epochs is not None and not 1 <= args.epochs <= 25:
        parser.error(f"--epochs must lie in [1, 25], got {args.epochs}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")

    if args.dry_run:
        device, config, layers, sizes = torch.device("cpu"), TINY, TINY_LAYERS, DRY_SIZES
        torch.set_num_threads(args.threads or 1)
        scratch = Path(tempfile.mkdtemp(prefix="crispedit-bench-gpu-dry-"))
        out = Path(args.out) if args.out else scratch / "gpu.json"
        args.cache_dir = args.cache_dir or str(scratch / "eigh")
    else:
        if not torch.cuda.is_available():
            print(f"bench_gpu: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing "
                  "measured. Run it on a GPU, or with --dry-run for the CPU smoke run.")
            return 0
        device, config, layers, sizes = torch.device("cuda", torch.cuda.current_device()), LLAMA3_8B, LAYERS, Sizes()
        if args.threads:
            torch.set_num_threads(args.threads)
        out = Path(args.out) if args.out else OUT
        args.cache_dir = args.cache_dir or str(CACHE)
    if args.reps is not None:
        sizes = dataclasses.replace(sizes, reps=args.reps)
    if args.epochs is not None:
        sizes = dataclasses.replace(sizes, epochs=args.epochs)

    full_config = {"model": config, "dtype": "bfloat16", "layers": layers, "dry_run": args.dry_run}
    info = device_info(device)
    results = load_results(out, full_config, info, args.force)
    todo = [p for p in PHASES if p in phases and (args.force or p not in results["phases"])]
    skipped = [p for p in phases if p not in todo]
    if skipped:
        print(f"bench_gpu: already in {out}, skipped (--force reruns): {', '.join(skipped)}")
    if todo:
        print(f"bench_gpu: {info['name']}, phases {', '.join(todo)} -> {out}", flush=True)
        bench = Bench(args, device, config, layers, sizes)
        run = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "phases": todo, "sizes": dataclasses.asdict(sizes), "dependencies": bench.dependencies}
        results["runs"].append(run)
        results["device"] = info
        results["notes"] = [
            "randomly initialised model of LLaMA-3-8B's configuration (bf16): its curvature spectra, removed "
            "corners and chosen forms differ from a trained model's; dense-form and model costs do not",
            "statistics over random token ids; requests are random words of an in-memory word-level tokenizer",
            f"edit phase: {sizes.epochs} epochs (MethodOptions allows 25); its loss never reaches the threshold, "
            "so time scales with the epochs",
            "EditSession computes its eigendecompositions on the CPU in float64 (the sums live there); "
            "--session-eigh cache/gpu move them to the GPU (see DeviceEighSession)",
        ]
        for name in todo:
            print(f"  {name} ...", flush=True)
            results["phases"][name] = {**PHASE_FUNCTIONS[name](bench), "sizes": dataclasses.asdict(sizes)}
            free(device)  # the phase's tensors went with its frame
            write_results(results, out)
            r = results["phases"][name]
            print(f"  {name}: {r['time_s']:.2f} s" if "time_s" in r else f"  {name}: done", flush=True)
        write_results(results, out)
    print_table(results)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

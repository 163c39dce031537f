"""K-FAC statistics of the capability loss.

For an edited linear map ``z = W a`` the Gauss–Newton block of the token-mean capability loss is
approximated by ``A ⊗ G`` with, over the ``N`` labelled positions ``s`` of the corpus,

    A = (1/N) Σ_s a_s a_sᵀ            G = (1/N) Σ_s g_s g_sᵀ,   g_s = ∂ loss / ∂ z_s

where the loss is the *summed* cross-entropy of the labels. Label modes:

- ``sampled`` (default): at each labelled position ``t`` a label ``y ~ p_θ0(·| x_{≤t})``, drawn by
  inverse CDF from uniforms of a generator seeded by (seed, hash of the document's ids), so labels
  do not depend on batching, padding, order or sharding. ``mc_samples = k`` gives ``G`` as the mean
  over ``k`` draws. A Monte-Carlo estimate of the GNH / true Fisher.
- ``empirical``: the observed next token (empirical Fisher; what the authors' code does).
- ``exact``: the expectation of ``sampled``: for every labelled ``t`` and every vocabulary entry
  ``c`` backpropagate ``√p_t(c) (p_t − e_c)`` placed at ``t`` only and sum ``g_s g_sᵀ`` over all
  labelled ``s`` (``V × N`` backward vectors, batched by replicating documents).

Only the hooked layer outputs need gradients: all parameters are frozen during collection and the
first hooked output becomes a leaf, so no weight gradient is formed and backward stops there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import __version__
from .corpus import fingerprint
from .distributed import DistContext, shard
from .layers import is_conv1d, weight_shape
from .options import LABEL_MODES
from .running import Forward, check_resident, frozen, full_precision, hf_forward, input_device, pad_batch

FILE_NAME = "curvature.safetensors"
FORMAT = "crispedit.kfac/1"
# exact mode: refuse more than this many backward vectors (V × N) unless raised explicitly.
EXACT_LIMIT = 2_000_000
# data-parallel: each rank's record in the reduced buffer: its labelled-token count and 48 bits of
# its corpus fingerprint as three 16-bit integers (exact in float32; a count over 2**24 is compared
# after the same rounding on both sides).
RECORD = 4
# sampled/empirical labels: positions whose float32 probabilities (softmax, cumulative sum) exist at
# once; the batch-wide vocabulary-sized arrays are the logits and the backward vector (model dtype).
SLICE_POSITIONS = 512

class StatisticsError(ValueError):
    """Statistics that cannot be computed, saved, loaded or merged as asked."""


@dataclass
class KFACStatistics:
    """Per edited module: ``A`` (d_in × d_in) and ``G`` (d_out × d_out), divided by ``tokens``."""

    A: dict[str, Tensor]
    G: dict[str, Tensor]
    tokens: dict[str, int]
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.A)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (d_out, d_in)}``."""
        return {n: (self.G[n].shape[0], self.A[n].shape[0]) for n in self.A}

    def summary(self) -> dict[str, dict]:
        return {
            n: {"tokens": self.tokens[n], "trace_A": float(self.A[n].trace()), "trace_G": float(self.G[n].trace())}
            for n in self.A
        }


# ---------------------------------------------------------------------------------------------
# collection


class KFACHooks:
    """Forward hooks that add ``a aᵀ`` of the rows in ``self.rows`` to ``A_sum`` and, through a
    tensor hook on the layer output, ``g gᵀ`` (scaled by ``g_scale``) to ``G_sum``.

    The sums of the modules on one device are views of one flat buffer (``buffers[device]``), so
    a data-parallel run reduces all of them with one ``all_reduce`` and no copy; ``extra`` slots at
    the start of the first module's buffer (``self.extra``) travel with them.
    """

    def __init__(self, modules: dict[str, nn.Module], dtype: torch.dtype, extra: int = 0):
        self.modules = modules
        self.dtype = dtype
        first = next(iter(modules.values())).weight.device
        numel = {first: extra}
        for m in modules.values():
            d_out, d_in = weight_shape(m)
            numel[m.weight.device] = numel.get(m.weight.device, 0) + d_in * d_in + d_out * d_out
        self.buffers = {dev: torch.zeros(n, dtype=dtype, device=dev) for dev, n in numel.items()}
        self.extra = self.buffers[first][:extra]
        offset = {dev: 0 for dev in numel}
        offset[first] = extra

        def take(dev: torch.device, d: int) -> Tensor:
            view = self.buffers[dev][offset[dev] : offset[dev] + d * d].view(d, d)
            offset[dev] += d * d
            return view

        self.A_sum: dict[str, Tensor] = {}
        self.G_sum: dict[str, Tensor] = {}
        for name, m in modules.items():
            d_out, d_in = weight_shape(m)
            self.A_sum[name] = take(m.weight.device, d_in)
            self.G_sum[name] = take(m.weight.device, d_out)
        self.rows: Tensor | None = None  # bool [B, T]: positions that carry a label
        self.collect_a = True
        self.g_scale = 1.0
        self._handles: list = []

    def __enter__(self) -> "KFACHooks":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor):
            # under a device_map, the sums live with the weight; ``args`` are the inputs as called
            # (accelerate's hook moves them to the module's device inside the call, not here)
            rows = self.rows.to(out.device)
            if self.collect_a:
                x = args[0].detach()
                a = x[rows.to(x.device)].to(self.A_sum[name].device, self.dtype)
                self.A_sum[name].addmm_(a.T, a)
            if torch.is_grad_enabled():
                if not out.requires_grad:  # first hooked layer: start the graph here
                    out = out.detach().requires_grad_(True)
                out.register_hook(lambda grad: self._grad(name, grad, rows))
                return out
            return None

        return hook

    def _grad(self, name: str, grad: Tensor, rows: Tensor) -> None:
        g = grad.detach()[rows].to(self.G_sum[name].device, self.dtype)
        self.G_sum[name].addmm_(g.T, g, alpha=self.g_scale)


def document_seed(seed: int, ids: Sequence[int]) -> int:
    """Seed of a document's label generator: a hash of (seed, token ids)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(array("q", ids).tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def document_uniforms(seed: int, ids: Sequence[int], mc_samples: int) -> Tensor:
    """``[mc_samples, len(ids)]`` float64 uniforms; column ``t`` draws the label of position ``t``."""
    gen = torch.Generator().manual_seed(document_seed(seed, ids))
    return torch.rand(mc_samples, len(ids), generator=gen, dtype=torch.float64)


def _check_positions(docs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> None:
    for i, (d, pos) in enumerate(zip(docs, positions)):
        for t in pos:
            if not 0 <= t < len(d) - 1:
                raise StatisticsError(f"document {i}: labelled position {t} has no next token (length {len(d)})")


def collect(
    model: nn.Module,
    modules: dict[str, nn.Module],
    documents: Sequence[Sequence[int]],
    labels: str = "sampled",
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    label_positions: Sequence[Sequence[int]] | None = None,
    forward: Forward | None = None,
    exact_limit: int = EXACT_LIMIT,
    exact_batch: int = 64,
    progress: bool = False,
    parallel: DistContext | None = None,
) -> KFACStatistics:
    """One pass over ``documents`` accumulating ``A`` and ``G`` for every module in ``modules``.

    ``label_positions[i]`` are the positions of document ``i`` that carry a label (default: all
    but the last). ``forward(ids, attention_mask) -> logits`` defaults to the HF call. Returns the
    factors divided by the number of labelled positions.

    Data-parallel (``parallel``, an initialised process group): every rank passes the whole
    corpus and runs its token-balanced shard (``distributed.shard``); one ``all_reduce`` (SUM, in
    ``dtype``, on the device of the sums) of a flat buffer holding every sum and each rank's count
    gives every rank the global sums, which it divides by the global count ``N``. Sampled labels
    are seeded per document, so the factors are those of one process up to the order of float
    additions; the fingerprint, documents and tokens are the corpus's. A rank may have no document.
    """
    if labels not in LABEL_MODES:
        raise StatisticsError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if mc_samples < 1:
        raise StatisticsError(f"--mc-samples must be at least 1, got {mc_samples}")
    if dtype not in (torch.float32, torch.float64):
        raise StatisticsError(f"statistics accumulate in float32 or float64, not {dtype}")
    if not documents:
        raise StatisticsError("the corpus has no document")
    check_resident(modules)
    positions = [list(range(len(d) - 1)) for d in documents] if label_positions is None else label_positions
    _check_positions(documents, positions)
    N = sum(len(p) for p in positions)
    if N == 0:
        raise StatisticsError("the corpus has no labelled position (every document is shorter than two tokens)")
    world, rank = (1, 0) if parallel is None else (parallel.world_size, parallel.rank)
    if world > 1 and not torch.distributed.is_initialized():
        raise StatisticsError(f"rank {rank} of {world}: the process group is not initialised (see distributed.init_from_env)")
    forward = forward or hf_forward(model)
    device = input_device(model)
    if labels == "exact":
        vocab = _vocab_size(model, forward, documents[0], device)
        if vocab * N > exact_limit:
            raise StatisticsError(
                f"--labels exact needs V × N = {vocab} × {N} = {vocab * N:,} backward passes, over the limit"
                f" of {exact_limit:,}; use --labels sampled (its Monte-Carlo estimate) or fewer tokens"
            )

    fp = fingerprint(documents)
    shards = shard([len(d) for d in documents], world)
    order = shards[rank]  # longest first: less padding
    bar = _progress(len(order), progress and rank == 0)
    seen = 0
    start = time.perf_counter()
    extra = world * RECORD if world > 1 else 0
    with frozen(model), full_precision(), KFACHooks(modules, dtype, extra) as hooks:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            docs = [documents[i] for i in idx]
            pos = [positions[i] for i in idx]
            ids, attn, rows = pad_batch(docs, pos, device)
            if labels == "exact":
                _exact_batch(hooks, forward, ids, attn, rows, exact_batch)
            else:
                u = None
                if labels == "sampled":
                    u = torch.zeros(mc_samples, *ids.shape, dtype=torch.float64)
                    for b, d in enumerate(docs):
                        u[:, b, : len(d)] = document_uniforms(seed, d, mc_samples)
                    u = u.to(device)
                _sampled_batch(hooks, forward, ids, attn, rows, u, mc_samples)
            seen += sum(len(p) for p in pos)
            bar.update(len(idx))
            bar.set_postfix(tokens=seen)
        bar.close()
        if world > 1:
            _all_reduce(hooks, parallel, seen, [sum(len(positions[i]) for i in s) for s in shards], fp)
    elapsed = time.perf_counter() - start

    A = {n: s / N for n, s in hooks.A_sum.items()}
    G = {n: s / N for n, s in hooks.G_sum.items()}
    for n in modules:
        for key, M in (("A", A[n]), ("G", G[n])):
            if not torch.isfinite(M).all():
                raise StatisticsError(f"{n}.{key}: NaN or inf in the statistics (overflow in the model's dtype?)")
    cfg = getattr(model, "config", None)
    meta = {
        "format": FORMAT,
        "version": __version__,
        "model": getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "corpus_fingerprint": fp,
        "labels": labels,
        "mc_samples": mc_samples if labels == "sampled" else None,
        "seed": seed if labels == "sampled" else None,
        "documents": len(documents),
        "tokens": N,
        "world_size": world,
        "dtype": str(dtype).removeprefix("torch."),
        "model_dtype": str(next(iter(modules.values())).weight.dtype).removeprefix("torch."),
        "weights_sha256": weights_fingerprint(modules),
        "layers": {n: list(weight_shape(m)) for n, m in modules.items()},
        "conv1d": [n for n, m in modules.items() if is_conv1d(m)],
        "time_s": elapsed,
    }
    return KFACStatistics(A, G, {n: N for n in modules}, meta)


def _rank_record(tokens: int, corpus_fingerprint: str) -> list[float]:
    bits = int(corpus_fingerprint[:12], 16)
    return [float(tokens), *(float((bits >> shift) & 0xFFFF) for shift in (32, 16, 0))]


def _all_reduce(hooks: KFACHooks, parallel: DistContext, seen: int, shard_tokens: list[int], fp: str) -> None:
    """Sum every rank's buffers in place (one ``all_reduce`` per device holding sums: one unless
    the model is spread over devices), then check from the ranks' records that every rank read
    the same corpus (fingerprint ``fp``) and counted exactly its shard (``shard_tokens[rank]``)."""
    W = parallel.world_size
    records = hooks.extra.view(W, RECORD)
    records[parallel.rank] = torch.tensor(_rank_record(seen, fp), dtype=records.dtype)
    for buf in hooks.buffers.values():
        torch.distributed.all_reduce(buf)
    expected = torch.tensor([_rank_record(t, fp) for t in shard_tokens], dtype=records.dtype)
    got = records.cpu()
    for r in range(W):
        if not torch.equal(got[r], expected[r]):
            why = (f"{int(got[r, 0]):,} labelled tokens in its shard, expected {int(expected[r, 0]):,}"
                   if got[r, 0] != expected[r, 0] else "another corpus fingerprint")
            raise StatisticsError(
                f"rank {r} read another corpus than rank {parallel.rank} ({why}); every rank must read the same documents"
            )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="doc", desc="curvature", disable=not enabled)


def _vocab_size(model: nn.Module, forward: Forward, doc: Sequence[int], device) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    ids = torch.tensor([list(doc)], device=device)
    with torch.no_grad():
        return forward(ids, torch.ones_like(ids)).shape[-1]


def _probs(logits: Tensor) -> Tensor:
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


def _sampled_batch(hooks: KFACHooks, forward: Forward, ids, attn, rows, u: Tensor | None, k: int,
                   slice_positions: int = SLICE_POSITIONS) -> None:
    """``sampled`` (``u`` given, ``k`` draws) or ``empirical`` (``u is None``) for one batch.

    The backward vector at the logits is ``p − e_y`` at labelled positions and 0 elsewhere, in the
    logits' dtype and on their device (under a ``device_map`` not necessarily the inputs'). Nothing of
    vocabulary size in float32 spans the batch: ``p = softmax`` and its cumulative sum exist for
    ``slice_positions`` positions at a time (the draws of a slice, then its rows of the backward
    vector); the batch-wide arrays are the logits and the backward vector, both in the model's dtype.
    Each row is computed exactly as on the whole batch (softmax, cumsum and the
    inverse-CDF draw are per position), so the labels and the vector do not depend on the slicing.
    """
    hooks.rows, hooks.collect_a = rows, True
    with torch.enable_grad():
        logits = forward(ids, attn)
    B, T, V = logits.shape
    with torch.no_grad():
        flat = logits.detach().reshape(B * T, V)
        keep = rows.to(flat.device).reshape(B * T, 1)
        slices = [slice(lo, lo + slice_positions) for lo in range(0, B * T, slice_positions)]
        if u is None:
            draws = torch.roll(ids, -1, dims=1).to(flat.device).reshape(1, B * T)  # observed next token
        else:
            draws = torch.empty(k, B * T, dtype=torch.long, device=flat.device)
            uniforms = u.to(flat.device).reshape(k, B * T)
            for s in slices:
                cdf = _probs(flat[s]).cumsum(-1)
                for j in range(k):
                    draws[j, s] = _inverse_cdf(cdf, uniforms[j, s])
                del cdf
        hooks.g_scale = 1.0 / len(draws)
        v = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        rows_of_v = v.view(B * T, V)
        for j, y in enumerate(draws):
            for s in slices:
                p = _probs(flat[s])
                mask = keep[s].to(p.dtype)
                p.mul_(mask).scatter_add_(-1, y[s].unsqueeze(-1), -mask)
                rows_of_v[s] = p
                del p
            with torch.enable_grad():
                logits.backward(v, retain_graph=j < len(draws) - 1)


def _inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """Labels ``[B, T]`` from the cumulative distribution ``[B, T, V]`` and uniforms ``[B, T]``."""
    x = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _exact_batch(hooks: KFACHooks, forward: Forward, ids, attn, rows, chunk: int) -> None:
    """``exact``: backpropagate ``√p_t(c)(p_t − e_c)`` at position ``t`` only, for every labelled
    ``t`` and vocabulary entry ``c``; ``chunk`` of these run at once on replicated documents."""
    hooks.rows, hooks.collect_a, hooks.g_scale = rows, True, 1.0
    with torch.no_grad():
        logits = forward(ids, attn)
        p = _probs(logits[rows.to(logits.device)])  # [N, V] on the logits' device; A is collected here
        del logits
    hooks.collect_a = False
    b_of, t_of = rows.to(p.device).nonzero(as_tuple=True)  # labelled (b, t), in the order of p's rows
    N, V = p.shape
    jobs_n = torch.arange(N, device=p.device).repeat_interleave(V)
    jobs_c = torch.arange(V, device=p.device).repeat(N)
    for lo in range(0, N * V, chunk):
        n, c = jobs_n[lo : lo + chunk], jobs_c[lo : lo + chunk]
        b = b_of[n].to(ids.device)  # the replicated documents go where the inputs go
        hooks.rows = rows[b]
        R = torch.arange(len(n), device=p.device)
        with torch.enable_grad():
            logits = forward(ids[b], attn[b])
            v = p[n].clone()
            v[R, c] -= 1
            v *= p[n, c].sqrt().unsqueeze(-1)
            vec = torch.zeros_like(logits)
            vec[R.to(vec.device), t_of[n].to(vec.device)] = v.to(vec.device, vec.dtype)
            logits.backward(vec)


# ---------------------------------------------------------------------------------------------
# storage


def save(stats: KFACStatistics, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/curvature.safetensors`` atomically (temporary name, then rename).

    Tensors ``NAME.A``, ``NAME.G`` (already divided by the token count) and ``NAME.tokens``;
    metadata key ``crispedit`` holds the JSON of ``stats.meta``.
    """
    out = Path(out)
    path = out / FILE_NAME if out.suffix != ".safetensors" else out
    if path.exists() and not overwrite:
        raise StatisticsError(f"--out {path}: exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for n in stats.A:
        tensors[f"{n}.A"] = stats.A[n].detach().cpu().contiguous()
        tensors[f"{n}.G"] = stats.G[n].detach().cpu().contiguous()
        tensors[f"{n}.tokens"] = torch.tensor([stats.tokens[n]], dtype=torch.int64)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"crispedit": json.dumps(stats.meta, sort_keys=True)})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StatisticsError(f"--out {path}: could not write the statistics ({e.strerror or e})") from None
    return path


def load(path: str | Path, modules: dict[str, nn.Module] | None = None) -> KFACStatistics:
    """Read statistics written by ``save``; with ``modules``, refuse names or shapes that differ."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.exists():
        raise StatisticsError(f"--curvature {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("crispedit")
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # aligned memory: BLAS rounds as on collect()'s
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise StatisticsError(f"--curvature {path}: not a readable safetensors file ({e})") from None
    if meta_raw is None:
        raise StatisticsError(f"--curvature {path}: no crispedit metadata; not a curvature file")
    meta = json.loads(meta_raw)
    if meta.get("format") != FORMAT:
        raise StatisticsError(f"--curvature {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    names = [k[: -len(".A")] for k in tensors if k.endswith(".A")]
    try:
        stats = KFACStatistics(
            {n: tensors[f"{n}.A"] for n in names},
            {n: tensors[f"{n}.G"] for n in names},
            {n: int(tensors[f"{n}.tokens"][0]) for n in names},
            meta,
        )
    except KeyError as e:
        raise StatisticsError(f"--curvature {path}: tensor {e.args[0]} missing") from None
    if modules is not None:
        check_matches(stats, modules, str(path))
    return stats


def check_matches(stats: KFACStatistics, modules: dict[str, nn.Module], source: str = "statistics") -> None:
    """Refuse statistics whose module names or shapes differ from ``modules``."""
    missing = [n for n in modules if n not in stats.A]
    if missing:
        raise StatisticsError(
            f"{source}: no statistics for {', '.join(missing)} (the file has {', '.join(stats.names) or 'none'});"
            " it was computed for other layers or another model"
        )
    for n, m in modules.items():
        d_out, d_in = weight_shape(m)
        got = (stats.G[n].shape[0], stats.A[n].shape[0])
        if got != (d_out, d_in):
            raise StatisticsError(
                f"{source}: {n} has statistics for a {got[0]}×{got[1]} matrix, the model's is {d_out}×{d_in};"
                " it was computed for another model"
            )


FINGERPRINT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # widest first


def weights_fingerprint(modules: dict[str, nn.Module]) -> dict[str, str]:
    """SHA-256 of the edited matrices the statistics were taken at (``saving.weights_hash``), in their
    own dtype and cast to every narrower one: a float32 checkpoint loaded in bf16 or fp16 later is the
    same checkpoint (its weights are exactly those casts), another fine-tune of the same shapes is not."""
    from .saving import weights_hash

    own = next(iter(modules.values())).weight.dtype
    narrower = FINGERPRINT_DTYPES[FINGERPRINT_DTYPES.index(own):] if own in FINGERPRINT_DTYPES else (own,)
    return {str(dt).removeprefix("torch."): weights_hash({n: m.weight.to(dt) for n, m in modules.items()})
            for dt in narrower}


def same_weights(recorded: dict | str | None, modules: dict[str, nn.Module]) -> bool:
    """Whether ``modules`` are the weights a fingerprint was recorded at, compared in the narrower of
    the two dtypes (a fingerprint without dtypes, from an older file, is compared as it is)."""
    from .saving import weights_hash

    if not recorded:
        return True
    own = next(iter(modules.values())).weight.dtype
    if isinstance(recorded, str):
        return recorded == weights_hash({n: m.weight for n, m in modules.items()})
    name = str(own).removeprefix("torch.")
    if name in recorded:
        return recorded[name] == weights_hash({n: m.weight for n, m in modules.items()})
    for dt in FINGERPRINT_DTYPES:  # the statistics came from a narrower dtype: cast the model's weights down
        key = str(dt).removeprefix("torch.")
        if key in recorded:
            return recorded[key] == weights_hash({n: m.weight.to(dt) for n, m in modules.items()})
    return False


def check_fingerprint(stats: KFACStatistics, modules: dict[str, nn.Module], source: str = "--curvature") -> None:
    """Refuse statistics taken on another checkpoint of the same shapes (another fine-tune, say)."""
    if not same_weights(stats.meta.get("weights_sha256"), modules):
        raise StatisticsError(f"{source}: computed on other weights of these matrices ({stats.meta.get('model')}; "
                              "another checkpoint of the same shapes?); pass --allow-other-checkpoint to use it anyway")


def merge(a: KFACStatistics, b: KFACStatistics, allow_mixed_labels: bool = False) -> KFACStatistics:
    """Statistics of the union of two corpora: the token-weighted means of the factors. Each merged
    factor is exactly that of the union corpus; their Kronecker product ``A ⊗ G`` is *not* the
    token-weighted sum of the parts' own products (``Σ_s w_s A_s ⊗ G_s``): K-FAC's approximation,
    made once more across the parts."""
    if set(a.A) != set(b.A):
        raise StatisticsError(f"cannot merge statistics of different modules: {sorted(a.A)} vs {sorted(b.A)}")
    if a.shapes() != b.shapes():
        raise StatisticsError("cannot merge statistics of different shapes (another model?)")
    fa, fb = a.meta.get("weights_sha256"), b.meta.get("weights_sha256")
    fa, fb = ({"?": fa} if isinstance(fa, str) else fa), ({"?": fb} if isinstance(fb, str) else fb)
    common = set(fa or {}) & set(fb or {})
    if fa and fb and (not common or any(fa[k] != fb[k] for k in common)):
        raise StatisticsError(f"cannot merge statistics of two models ({a.meta.get('model')} and {b.meta.get('model')}: "
                              "the edited matrices differ)")
    if a.meta.get("corpus_fingerprint") and a.meta.get("corpus_fingerprint") == b.meta.get("corpus_fingerprint"):
        raise StatisticsError("cannot merge statistics of the same corpus twice (the same file, or a copy of it)")
    if a.meta.get("labels") != b.meta.get("labels") and not allow_mixed_labels:
        raise StatisticsError(f"cannot merge {a.meta.get('labels')} with {b.meta.get('labels')} labels")
    A, G, tokens = {}, {}, {}
    for n in a.A:
        na, nb = a.tokens[n], b.tokens[n]
        dt = torch.promote_types(a.A[n].dtype, b.A[n].dtype)
        A[n] = (a.A[n].to(dt) * na + b.A[n].to(dt) * nb) / (na + nb)
        G[n] = (a.G[n].to(dt) * na + b.G[n].to(dt) * nb) / (na + nb)
        tokens[n] = na + nb
    parts = sorted(a.meta.get("corpus_parts", [a.meta.get("corpus_fingerprint")]) + b.meta.get("corpus_parts", [b.meta.get("corpus_fingerprint")]))
    meta = dict(a.meta)
    meta.update(
        tokens=a.meta.get("tokens", 0) + b.meta.get("tokens", 0),
        documents=a.meta.get("documents", 0) + b.meta.get("documents", 0),
        corpus_parts=parts,
        corpus_fingerprint=hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest(),
        labels=a.meta.get("labels") if a.meta.get("labels") == b.meta.get("labels") else "mixed",
        time_s=a.meta.get("time_s", 0.0) + b.meta.get("time_s", 0.0),
    )
    return KFACStatistics(A, G, tokens, meta)

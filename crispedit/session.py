"""One editing history of one model: batch editing, chunk after chunk, with what protects earlier edits.

An ``EditSession`` holds everything a history needs:

- the base weights of the edited matrices (kept in memory; a ledger keeps only their SHA-256 and the
  cumulative ΔW, from which they are recovered bit for bit);
- the *protected statistics* as raw K-FAC sums with token counts per source: ``capability`` (the
  corpus), ``protect:NAME`` (texts or facts a user wants kept) and ``edits`` (every edited chunk);
- the capability eigenbases *at the base*, which predict the drift (``½ tr(ΔWᵀ G ΔW A)``, nats per
  token of KL on capability text) and define the budget;
- the projectors of the current protected factors, the optimiser state (float32 masters, Adam
  moments) and the history of chunks.

``session.edit(requests)`` edits one chunk (the editing loop with the current projectors, or MEMIT /
AlphaEdit); afterwards the chunk's edit texts (``prompt + " " + target``, the prompt *not* masked)
get K-FAC statistics at the current weights and join the protected set (``--protect-edits merge``),
so later chunks do not undo them. The projectors are rebuilt before the next chunk, and Adam's first
moment is projected onto the new subspace; Adam's state persists across chunks.

The protected factors of a matrix are

    A = (Σ_s w_s A_sum_s) / (Σ_s w_s N_s),      G = (Σ_s w_s G_sum_s) / (Σ_s w_s N_s),

with ``w = 1`` for the capability corpus and ``w = edit_weight`` for edits and protect-sets. Where an
approximation is made: each factor is exactly that of the weighted union of the sources, but the
curvature ``A ⊗ G`` of the union is *not* the weighted sum of the sources' own Kronecker products
``Σ_s A_s ⊗ G_s`` (the cross terms ``A_s ⊗ G_t`` appear); K-FAC makes the same approximation within
one corpus.

``protect_edits = "mix"`` is the authors' variant: before every chunk the protected statistics are
recomputed at the current weights from the capability documents and a random sample of all edits
so far (``mix_sample``), plus the protect-sets. ``refresh_drift`` recomputes every source at the
current weights whenever an edited matrix has moved that far (relative Frobenius norm) from where the
statistics were taken. ``budget`` keeps the predicted drift of the cumulative update within ``eps``
(see ``budget.py``); when a chunk ends with the budget binding and its loss not learnt, the budget
is spent and the session refuses further chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .budget import BudgetError, CapabilityBudget
from .curvature import KFACStatistics, collect
from .editor import (EditOptimizer, KeepAll, build_projectors, check_finite, drift_report, eigenbases, master_dtype,
                     run_epochs)
from .layers import is_conv1d
from .options import CLOSED_FORM_METHODS, MethodOptions
from .projector import Eigen, KroneckerProjector
from .requests import EditRequest, edit_text
from .running import check_resident, swapped_weights
from .saving import delta_dtype, weights_hash

if TYPE_CHECKING:
    from .memit import Targets

CAPABILITY = "capability"
EDITS = "edits"


class SessionError(ValueError):
    """A session that cannot do what was asked (options that contradict, a spent budget, ...)."""


@dataclass
class Sums:
    """Raw K-FAC sums of one source: ``A_sum = Σ a aᵀ``, ``G_sum = Σ g gᵀ`` per matrix, over ``tokens``."""

    A: dict[str, Tensor]
    G: dict[str, Tensor]
    tokens: int

    @classmethod
    def of(cls, stats: KFACStatistics, names=None) -> "Sums":
        """From normalised statistics (factors divided by the token count), kept on the CPU; ``names``:
        only these matrices (a statistics file may hold more layers than are edited)."""
        names = list(stats.A) if names is None else list(names)
        n = stats.tokens[names[0]]
        return cls({k: (stats.A[k] * n).cpu() for k in names}, {k: (stats.G[k] * n).cpu() for k in names}, n)

    def __add__(self, other: "Sums") -> "Sums":
        return Sums({k: v + other.A[k] for k, v in self.A.items()}, {k: v + other.G[k] for k, v in self.G.items()},
                    self.tokens + other.tokens)


class _LazyDeltas(dict):
    """The cumulative ΔW of one matrix at a time (the drift report never holds them all)."""

    def __init__(self, session: "EditSession"):
        super().__init__()
        self.session = session

    def __getitem__(self, n: str) -> Tensor:
        m = self.session.modules[n]
        dt = delta_dtype(m.weight.dtype)
        return m.weight.detach().to(dt) - self.session.base[n].to(dt)


def _collect_sums(model: nn.Module, modules: dict[str, nn.Module], documents: Sequence[Sequence[int]],
                  options: MethodOptions) -> Sums:
    """K-FAC sums of ``documents`` (every position labelled) at the model's current weights."""
    return Sums.of(collect(model, modules, documents, labels=options.labels, seed=options.seed))


def edit_documents(tokenizer, requests: Sequence[EditRequest]) -> list[list[int]]:
    """The token ids of ``prompt + " " + target`` per request: the texts whose behaviour an edit fixes."""
    return [tokenizer(edit_text(r.prompt, r.target_new))["input_ids"] for r in requests]


def requests_hash(requests: Sequence[EditRequest]) -> str:
    return hashlib.sha256(json.dumps([r.to_json() for r in requests], sort_keys=True).encode()).hexdigest()


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index`` (chunk 0, the batch edit, uses ``seed`` itself)."""
    return seed + 7919 * index


class EditSession:
    """An editing history of ``model`` (edited in place); see the module docstring.

    ``EditSession.start(...)`` begins a history from capability statistics; ``ledger.load`` continues
    one. The constructor takes the protected sources at the base as raw sums and computes nothing but
    the capability eigenbases (and the budget's set-up)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        modules: dict[str, nn.Module],
        options: MethodOptions,
        base_sources: dict[str, Sums],
        capability_documents: Sequence[Sequence[int]] = (),
        protect_documents: dict[str, Sequence[Sequence[int]]] | None = None,
        capability_meta: dict | None = None,
        progress: bool = False,
        eigen_cache: str | None = None,
    ):
        self.model, self.tokenizer, self.modules, self.options, self.progress = model, tokenizer, modules, options, progress
        o = options
        check_resident(modules)  # an offloaded matrix (device_map) cannot be edited in place, by any method
        if o.method != "ft" and CAPABILITY not in base_sources:
            raise SessionError(f"--method {o.method} needs capability statistics (--curvature or --corpus)")
        if o.refresh_drift is not None and not capability_documents:
            raise SessionError("--refresh-drift recomputes the statistics: give the capability corpus (--corpus)")
        if o.protect_edits == "mix" and not capability_documents and o.method not in CLOSED_FORM_METHODS:
            raise SessionError("--protect-edits mix recomputes the statistics: give the capability corpus (--corpus)")
        self.conv = {n: is_conv1d(m) for n, m in modules.items()}
        self.base = {n: m.weight.detach().clone() for n, m in modules.items()}
        self.base_hash = weights_hash(self.base)
        self.capability_documents = [list(d) for d in capability_documents]
        self.protect_documents = {name: [list(d) for d in docs] for name, docs in (protect_documents or {}).items()}
        self.capability_meta = dict(capability_meta or {})
        self.base_sources = dict(base_sources)  # the protected sources at the base weights
        self.sources: dict[str, Sums] = dict(self.base_sources)
        cap = self.base_capability
        self.cap_eig = self._eigen(self._factors(cap), eigen_cache) if cap is not None else None
        self.state = EditOptimizer(modules, o.optimizer, o.lr) if o.method not in CLOSED_FORM_METHODS else None
        self.budget = None
        if o.budget is not None:
            if self.cap_eig is None:
                raise BudgetError("--budget needs capability statistics (--curvature or --corpus)")
            bases = {n: (A.vectors.float(), A.values.float(), G.vectors.float(), G.values.float())
                     for n, (A, G) in self.cap_eig.items()}
            self.budget = CapabilityBudget(o.budget, bases, self.base, self.conv)
        self.projectors: dict[str, KroneckerProjector] | None = None
        self.eig: dict[str, tuple[Eigen, Eigen]] | None = None
        self.stale = True  # the protected statistics changed since the projectors were built
        self.chunks_since_rebuild = 0
        self.stats_weights: dict[str, Tensor] = self.base  # where the statistics were last taken (refresh)
        self.requests: list[tuple[int, EditRequest]] = []  # every edited request with its chunk
        self.history: list[dict] = []
        self.budget_spent = False
        self.pending: list[EditRequest] = []  # the last chunk, whose statistics are not taken yet
        self.preserved: dict[str, Tensor] | None = None  # AlphaEdit: Σ k kᵀ of edited keys
        self.null_bases: dict[str, Tensor] | None = None  # AlphaEdit: null-space bases of C
        self.targets: Targets | None = None  # MEMIT / AlphaEdit: the last chunk's target values (not in a ledger)
        self.ledger_dir: str | None = None  # where save() / load() last put or found this history
        self._record: dict | None = None

    @classmethod
    def start(
        cls,
        model: nn.Module,
        tokenizer,
        modules: dict[str, nn.Module],
        options: MethodOptions | None = None,
        capability: KFACStatistics | None = None,
        capability_documents: Sequence[Sequence[int]] = (),
        protect: dict[str, Sequence[Sequence[int]]] | None = None,
        progress: bool = False,
        eigen_cache: str | None = None,
    ) -> "EditSession":
        """A new history from ``model``'s current weights: capability statistics (``collect`` or a
        curvature file), the corpus they came from (for refresh and ``mix``), and protect-sets
        (name -> documents), whose statistics are taken here. ``eigen_cache``: a directory for the
        capability eigendecompositions (the statistics' own, keyed by their hash)."""
        options = options or MethodOptions()
        base_sources = {CAPABILITY: Sums.of(capability, modules)} if capability is not None else {}
        for name, docs in (protect or {}).items():
            base_sources[f"protect:{name}"] = _collect_sums(model, modules, docs, options)
        return cls(model, tokenizer, modules, options, base_sources, capability_documents, protect,
                   capability.meta if capability is not None else None, progress, eigen_cache)

    # -----------------------------------------------------------------------------------------
    # statistics and projectors

    @property
    def base_capability(self) -> Sums | None:
        return self.base_sources.get(CAPABILITY)

    def _sums(self, documents: Sequence[Sequence[int]]) -> Sums:
        return _collect_sums(self.model, self.modules, documents, self.options)

    def _weight(self, source: str) -> float:
        return 1.0 if source == CAPABILITY else self.options.edit_weight

    def protected_factors(self, sources: dict[str, Sums] | None = None) -> KFACStatistics:
        """``A = Σ w_s A_sum_s / Σ w_s N_s`` (and ``G``) over the protected sources."""
        sources = self.sources if sources is None else sources
        N = sum(self._weight(s) * v.tokens for s, v in sources.items())
        A, G = {}, {}
        for n in self.modules:
            A[n] = sum(self._weight(s) * v.A[n] for s, v in sources.items()) / N
            G[n] = sum(self._weight(s) * v.G[n] for s, v in sources.items()) / N
        return KFACStatistics(A, G, {n: int(N) for n in self.modules}, {})

    def _eigen(self, stats: KFACStatistics, cache=None) -> dict[str, tuple[Eigen, Eigen]]:
        """Eigenbases on each matrix's device, eigenvectors in the masters' precision."""
        dtype = master_dtype(next(iter(self.modules.values())).weight.dtype)
        return eigenbases(stats, {n: m.weight.device for n, m in self.modules.items()}, dtype, cache)

    @staticmethod
    def _factors(sums: Sums) -> KFACStatistics:
        return KFACStatistics({n: v / sums.tokens for n, v in sums.A.items()},
                              {n: v / sums.tokens for n, v in sums.G.items()}, {n: sums.tokens for n in sums.A}, {})

    def _mix_sources(self, index: int) -> dict[str, Sums]:
        """The authors' variant: capability documents and a sample of all edits so far, at the current weights."""
        past = [r for _, r in self.requests]
        rng = random.Random(f"{self.options.seed}-mix-{index}")
        sample = rng.sample(past, min(self.options.mix_sample, len(past)))
        sources = {CAPABILITY: self._sums(self.capability_documents)}
        if sample:
            sources[EDITS] = self._sums(edit_documents(self.tokenizer, sample))
        sources.update({s: v for s, v in self.sources.items() if s.startswith("protect:")})
        return sources

    def rebuild(self, force: bool = False) -> float:
        """Rebuild the eigenbases and projectors from the protected statistics when they changed (every
        ``rebuild_every`` chunks unless ``force``), and project Adam's first moment onto the new
        subspace. Returns the seconds spent."""
        o = self.options
        if o.method in CLOSED_FORM_METHODS:
            return 0.0
        self.flush_statistics()
        if self.projectors is not None and not (self.stale and (force or self.chunks_since_rebuild >= o.rebuild_every)):
            return 0.0
        start = time.perf_counter()
        if o.method == "ft":
            eig = self.cap_eig
        elif o.protect_edits == "mix" and self.requests:
            eig = self._eigen(self.protected_factors(self._mix_sources(len(self.history))))
        elif set(self.sources) == {CAPABILITY} and self.sources[CAPABILITY] is self.base_capability:
            eig = self.cap_eig  # nothing joined the capability corpus yet
        else:
            eig = self._eigen(self.protected_factors())
        self.eig = eig
        if eig is None:  # ft without capability statistics
            self.projectors = {n: KeepAll() for n in self.modules}
        else:
            self.projectors = self._projectors(eig)
        if self.state is not None:
            self.state.reproject(self.projectors)
        self.stale, self.chunks_since_rebuild = False, 0
        return time.perf_counter() - start

    def _projectors(self, eig: dict[str, tuple[Eigen, Eigen]]) -> dict[str, KroneckerProjector]:
        """Projectors in the masters' precision (float32, or float64 for a float64 model)."""
        dtype = master_dtype(next(iter(self.modules.values())).weight.dtype)
        o = self.options
        return build_projectors(eig, o.method, o.effective_gamma(), dtype, o.projection_dtype)

    def flush_statistics(self) -> None:
        """Add the K-FAC sums of the last chunk's edit texts (``prompt + " " + target``, every position
        labelled) to the protected ``edits`` source. They are taken lazily — at the start of the next
        chunk, or when a ledger is saved — at the weights the chunk left, which nothing changes in
        between; a batch edit that is never continued never pays for them. The tokens and seconds are
        recorded on that chunk's record (``statistics_tokens``, ``seconds.statistics``)."""
        if not self.pending:
            return
        start = time.perf_counter()
        chunk = self._sums(edit_documents(self.tokenizer, self.pending))
        self.sources[EDITS] = self.sources[EDITS] + chunk if EDITS in self.sources else chunk
        self.pending = []
        if self.history:
            self.history[-1]["statistics_tokens"] = chunk.tokens
            self.history[-1]["seconds"]["statistics"] = time.perf_counter() - start

    def refresh(self, where: str) -> None:
        """Recompute every source at the current weights (the optional refresh step) and rebuild."""
        start = time.perf_counter()
        self.pending = []  # the edits' sums are recomputed below, this chunk's included
        drift = self.drift_since_statistics()
        if self.capability_documents:
            self.sources[CAPABILITY] = self._sums(self.capability_documents)
        for name, docs in self.protect_documents.items():
            self.sources[f"protect:{name}"] = self._sums(docs)
        if self.options.protect_edits == "merge" and self.requests:
            self.sources[EDITS] = self._sums(edit_documents(self.tokenizer, [r for _, r in self.requests]))
        self.stats_weights = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        self.stale = True
        self.rebuild(force=True)
        event = {"at": where, "drift": drift, "seconds": time.perf_counter() - start}
        if self._record is not None:
            self._record["refreshes"].append(event)

    def drift_since_statistics(self) -> float:
        """Largest ‖W − W_stats‖ / ‖W_stats‖ over the edited matrices (W_stats: where the statistics were taken)."""
        worst = 0.0
        for n, m in self.modules.items():
            ref = self.stats_weights[n].float()
            worst = max(worst, float((m.weight.detach().float() - ref).norm() / ref.norm()))
        return worst

    def _maybe_refresh(self, where: str) -> None:
        limit = self.options.refresh_drift
        if limit is not None and self.drift_since_statistics() > limit:
            self.refresh(where)

    # -----------------------------------------------------------------------------------------
    # editing

    def edit(self, requests: Sequence[EditRequest], name: str | None = None, targets: Targets | None = None) -> dict:
        """Edit one chunk; returns its record (also appended to ``history``). ``targets`` (MEMIT /
        AlphaEdit): the ``memit.Targets`` another session optimised for the same requests at the same
        weights (its ``targets`` attribute), used instead of optimising them again."""
        o = self.options
        if self.budget_spent:
            raise SessionError(f"the capability budget of {o.budget:g} nats/token is spent (chunk "
                               f"{len(self.history)}); no further chunk is edited")
        if not requests:
            raise SessionError("no request to edit")
        if targets is not None and o.method not in CLOSED_FORM_METHODS:
            raise SessionError(f"target values are for memit and alphaedit, not --method {o.method}")
        index = len(self.history)
        record = {"chunk": index + 1, "name": name, "requests": len(requests), "requests_sha256": requests_hash(requests),
                  "refreshes": [], "seconds": {"statistics": 0.0}}  # set when this chunk's statistics are taken
        self.flush_statistics()  # the previous chunk's
        self._record = record
        start = time.perf_counter()
        record["seconds"]["rebuild"] = self.rebuild()
        if o.method in CLOSED_FORM_METHODS:
            self._closed_form(requests, index, record, targets)
        else:
            self._gradient(requests, index, record)
        record["seconds"]["edit"] = time.perf_counter() - start - record["seconds"]["rebuild"]
        self.requests.extend((index, r) for r in requests)
        protects = o.method in ("crispedit", "nullspace") and o.protect_edits != "none"  # ft has no projector
        if protects and o.protect_edits == "merge":
            self.pending = list(requests)  # their statistics: taken before anything moves the weights again
        if protects:
            self.stale = True
        self.chunks_since_rebuild += 1
        self._maybe_refresh(f"after chunk {index + 1}")
        record["drift"] = self.drift()
        if self.budget is not None:
            predicted = record["drift"]["total"]["predicted_kl"]
            bound = self.budget.last_mu > 0
            spent = bound and record.get("final_loss", 0.0) >= o.loss_threshold
            record["budget"] = {"eps": o.budget, "predicted": predicted, "used": predicted / o.budget,
                                "projections": self.budget.projections, "binding": bound, "spent": spent}
            self.budget_spent = spent
        self.history.append(record)
        self._record = None
        return record

    def _gradient(self, requests: Sequence[EditRequest], index: int, record: dict) -> None:
        o = self.options
        def after_epoch(epoch: int) -> dict[str, KroneckerProjector]:
            self._maybe_refresh(f"chunk {index + 1}, epoch {epoch + 1}")
            return self.projectors

        projections_before = self.budget.projections if self.budget is not None else 0
        steps, losses = run_epochs(self.model, self.tokenizer, requests, self.projectors, self.state, o.batch_size, o.epochs,
                                   o.loss_threshold, chunk_seed(o.seed, index), self.progress, self.budget,
                                   after_epoch if o.refresh_drift else None)
        record.update(steps=steps, epochs=len(losses), epoch_losses=losses, final_loss=losses[-1])
        if self.budget is not None:
            record["budget_projections"] = self.budget.projections - projections_before

    def _closed_form(self, requests: Sequence[EditRequest], index: int, record: dict, targets) -> None:
        from .memit import MemitConfig, apply_closed_form

        o = self.options
        cfg = MemitConfig(v_num_grad_steps=o.v_num_grad_steps, v_lr=o.v_lr, v_weight_decay=o.v_weight_decay,
                          kl_factor=o.kl_factor, clamp_norm_factor=o.clamp_norm_factor,
                          mom2_update_weight=o.mom2_update_weight, nullspace_threshold=o.nullspace_threshold,
                          nullspace_relative=o.nullspace_relative, L2=o.l2)
        C = {n: (self.base_capability.A[n] / self.base_capability.tokens).to(m.weight.device)
             for n, m in self.modules.items()}
        result = apply_closed_form(self.model, self.tokenizer, self.modules, requests, C, cfg, o.method,
                                   preserved=self.preserved, null_bases=self.null_bases,
                                   seed=chunk_seed(o.seed, index), progress=self.progress, targets=targets)
        self.targets = result.targets
        if o.method == "alphaedit":
            self.preserved, self.null_bases = result.preserved, result.null_bases
        check_finite(self.modules)
        probs = [loss["prob"] for loss in result.targets.losses]
        record.update(steps=int(sum(result.targets.steps)),  # target-optimisation steps over all requests
                      target_probability=sum(probs) / len(probs),  # mean P(target) at z: how well the targets fit
                      layers=result.layers, residual_after=result.residual_after,
                      seconds_targets=result.seconds_targets)

    def edit_all(self, requests: Sequence[EditRequest], chunk_size: int | None = None,
                 on_chunk: Callable[["EditSession", dict], None] | None = None, name: str | None = None) -> list[dict]:
        """Edit ``requests`` in chunks of ``chunk_size`` (all at once when None), in order; ``on_chunk``
        runs after each (saving a ledger, scoring the history). Stops when the budget is spent."""
        size = chunk_size or len(requests)
        records = []
        for lo in range(0, len(requests), size):
            if self.budget_spent:
                break
            records.append(self.edit(requests[lo : lo + size], name))
            if on_chunk is not None:
                on_chunk(self, records[-1])
        return records

    # -----------------------------------------------------------------------------------------
    # what the history did

    def deltas(self) -> dict[str, Tensor]:
        """The cumulative ΔW since the base per matrix, in the delta dtype (exact)."""
        out = {}
        for n, m in self.modules.items():
            dt = delta_dtype(m.weight.dtype)
            out[n] = m.weight.detach().to(dt) - self.base[n].to(dt)
        return out

    def drift(self) -> dict[str, dict]:
        """``drift_report`` of the cumulative update: ‖ΔW‖/‖W‖, predicted KL with the capability factors at
        the base, and the part outside the current projectors' subspace."""
        if self.cap_eig is None:
            return {}
        projectors = self.projectors or {n: KeepAll() for n in self.modules}
        return drift_report(_LazyDeltas(self), self.modules, self.cap_eig, projectors)

    # -----------------------------------------------------------------------------------------
    # the pipeline: what an edit is scored against, the chunks with their scores and ledger, the scores

    def reference(self, requests: Sequence[EditRequest], template: str = "raw", heldout=(), corpus=(), known_facts=(),
                  batch_size: int = 64):
        """What an edit is scored against (``evaluate.prepare_reference``), measured once on the base
        weights (swapped in: no copy)."""
        from .evaluate import prepare_reference

        with self.at_base():
            ref = prepare_reference(self.model, self.tokenizer, requests, template, heldout, corpus, known_facts,
                                    batch_size=batch_size, progress=self.progress)
        ref.base_weights = self.base
        return ref

    def run(self, files: Sequence[Sequence[EditRequest]], chunk_size: int | None = None, names: Sequence[str] | None = None,
            probe=None, eval_every: int = 1, ledger_dir: str | None = None, model_id: str | None = None,
            log: Callable[[dict, int], None] | None = None) -> list[dict]:
        """Edit request lists in order, each in chunks of ``chunk_size`` (a chunk never spans two lists);
        after every chunk score the history with ``probe`` (``history.HistoryProbe``; every
        ``eval_every`` chunks and after the last), save the ledger to ``ledger_dir`` and call
        ``log(record, total chunks)``. Stops when the budget is spent."""
        total = len(self.history) + sum(-(-len(f) // (chunk_size or len(f))) for f in files if f)

        def after_chunk(session: "EditSession", record: dict) -> None:
            if probe is not None and (record["chunk"] % eval_every == 0 or record["chunk"] == total):
                record["metrics"] = probe.score(session)
            if ledger_dir is not None:
                session.save(ledger_dir, model_id)
            if log is not None:
                log(record, total)

        records = []
        for i, f in enumerate(files):
            if f and not self.budget_spent:
                records += self.edit_all(f, chunk_size, after_chunk, names[i] if names else None)
        return records

    def measure(self, ref, batch_size: int = 64) -> dict:
        """``evaluate.measure`` of the model as it is now, against ``ref`` (the base: these weights swapped in)."""
        from .evaluate import measure

        ref.base_weights = self.base
        return measure(self.model, self.tokenizer, ref, batch_size=batch_size, progress=self.progress)

    # -----------------------------------------------------------------------------------------
    # on disk (crispedit/ledger.py)

    def save(self, directory: str, model_id: str | None = None, snapshot_every: int | None = None) -> None:
        """Write this history's ledger to ``directory`` (a new one, or its own): after every chunk."""
        from . import ledger

        ledger.save(self, directory, model_id, snapshot_every)
        self.ledger_dir = str(directory)

    @classmethod
    def load(cls, directory: str, model: nn.Module, tokenizer, modules: dict[str, nn.Module] | None = None,
             progress: bool = False, chunk: int | None = None) -> "EditSession":
        """The history of a ledger on ``model`` (at the ledger's base, or as the ledger left it), bit for
        bit; ``modules`` default to the ledger's; ``chunk``: the state after that chunk (a snapshot)."""
        from . import ledger
        from .layers import modules_by_name

        if modules is None:
            modules = modules_by_name(model, list(ledger.read(directory)["modules"]))
        session = ledger.load(directory, model, tokenizer, modules, progress, chunk)
        session.ledger_dir = str(directory)
        return session

    def revert(self, to: int) -> None:
        """Go back to the state after chunk ``to`` (0: the base) of this session's ledger, exactly: from
        a snapshot, or by replaying the chunks after the nearest earlier one (the same bits). The
        chunks after ``to`` stay listed in the ledger under ``reverted``."""
        from . import ledger

        directory = self.ledger_dir
        if directory is None:
            raise SessionError("revert works on a ledger: save the session first (session.save(DIR))")
        info = ledger.read(directory)
        n = len(info["chunks"])
        if not 0 <= to <= n:
            raise SessionError(f"--to {to}: the ledger {directory} has chunks 0..{n}")
        self.restore_base()
        if str(to) in info["snapshots"] or to == n:
            ledger.revert(directory, to)
            fresh = EditSession.load(directory, self.model, self.tokenizer, self.modules, self.progress)
        else:
            fresh = EditSession.replayed(directory, self.model, self.tokenizer, to, self.modules, self.progress)
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def replayed(cls, directory: str, model: nn.Module, tokenizer, to: int, modules: dict[str, nn.Module] | None = None,
                 progress: bool = False) -> "EditSession":
        """The state after chunk ``to`` of a ledger without a snapshot of it, on ``model`` at the
        ledger's base: the nearest earlier snapshot (or the base) loaded and the chunks after it edited
        again, which gives the same bits; the ledger then records ``to`` as its current state, the
        later chunks under ``reverted``."""
        from . import ledger

        info = ledger.read(directory)
        j = ledger.nearest_snapshot(info, to)
        session = cls.load(directory, model, tokenizer, modules, progress, chunk=j)
        requests = ledger.read_requests(Path(directory) / info["current"]["requests"], Path(directory))
        for k in range(j, to):
            session.edit([r for c, r in requests if c == k], info["chunks"][k].get("name"))
            session.history[-1]["metrics"] = info["chunks"][k].get("metrics")
        ledger.replace_history(directory, session, to)
        return session

    @contextlib.contextmanager
    def at_base(self):
        """The model with its base weights swapped in (no copy), for base answers and KL."""
        with swapped_weights(self.model, self.base):
            yield

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put the base weights back (the session is finished with; its history stays readable)."""
        for n, m in self.modules.items():
            m.weight.copy_(self.base[n])
        if self.state is not None:
            self.state.sync_from_model()



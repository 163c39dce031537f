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
import dataclasses
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

from . import __version__, ledger
from .budget import BudgetError, CapabilityBudget
from .curvature import KFACStatistics, collect
from .editor import (EditOptimizer, KeepAll, build_projectors, check_finite, drift_report, eigenbases, master_dtype,
                     run_epochs)
from .layers import is_conv1d
from .ledger import LedgerError
from .options import CLOSED_FORM_METHODS, MethodOptions
from .prefix import PrefixCache, first_block
from .projector import Eigen, KroneckerProjector
from .requests import EditRequest, edit_text, normalised
from .running import check_resident, swapped_weights
from .saving import delta_dtype, edit_manifest, shifted, weights_hash

if TYPE_CHECKING:
    from .memit import Targets

CAPABILITY = "capability"
EDITS = "edits"
CHUNK_SETTINGS = ("lr", "epochs", "batch_size", "loss_threshold", "budget")  # may change between chunks; each records its own


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


def ledger_state_bytes(session: "EditSession") -> int:
    """What one state file of ``session``'s ledger takes once the history is under way (at the start
    the optimiser state and the edits' sums do not exist yet): ``ledger.state_file_bytes``."""
    o = session.options
    shapes = [tuple(m.weight.shape) for m in session.modules.values()]
    dtype = next(iter(session.modules.values())).weight.dtype
    keeps_sums = o.method in ("crispedit", "nullspace") and o.protect_edits == "merge"
    return sum(ledger.state_file_bytes(shapes, dtype, session.state is not None, keeps_sums).values())


def _check_ledger_model(info: dict, modules: dict[str, nn.Module], directory: Path) -> None:
    """Refuse a model whose edited matrices are not the ledger's (other layers, shapes, dtype)."""
    got = {n: list(m.weight.shape) for n, m in modules.items()}
    if got != info["modules"]:
        raise LedgerError(f"ledger {directory}: edits {', '.join(info['modules'])}; this run edits {', '.join(got)} "
                          "(another model, or other --layers)")
    dtype = str(next(iter(modules.values())).weight.dtype).removeprefix("torch.")
    if dtype != info["model_dtype"]:
        raise LedgerError(f"ledger {directory}: made with a {info['model_dtype']} model; this one is {dtype} "
                          f"(use --dtype {info['model_dtype']})")


def _to_base(info: dict, modules: dict[str, nn.Module], directory: Path) -> None:
    """Put ``modules`` at the ledger's base: they are the base already, or the ledger's current edit."""
    current = weights_hash({n: m.weight for n, m in modules.items()})
    if current == info["base_weights_sha256"]:
        return
    if current != info["current"]["edited_weights_sha256"]:
        raise LedgerError(f"ledger {directory}: the model's edited matrices are neither the ledger's base nor its "
                          "current edit (another checkpoint?)")
    deltas, _ = ledger.current_delta(directory)
    with torch.no_grad():
        for n, m in modules.items():
            m.weight.copy_(shifted(m.weight, deltas[n], -1))


class EditSession:
    """An editing history of ``model`` (edited in place); see the module docstring.

    ``EditSession.start(...)`` begins a history from capability statistics; ``EditSession.load`` continues
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
        self.prefix: PrefixCache | None = None  # the rehearsal check's states below the first edited block
        o = options
        check_resident(modules)  # an offloaded matrix (device_map) cannot be edited in place, by any method
        if o.method != "ft" and CAPABILITY not in base_sources:
            raise SessionError(f"--method {o.method} needs capability statistics (--curvature or --corpus)")
        if o.refresh_drift is not None and not capability_documents:
            raise SessionError("--refresh-drift recomputes the statistics: give the capability corpus (--corpus)")
        if o.rehearses() and o.method in CLOSED_FORM_METHODS:
            raise SessionError(f"--rehearse re-edits forgotten edits with the gradient methods, not --method {o.method}")
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
        self.ledger_commit: str | None = None  # the commit of that ledger this session continues
        self._model_id: str | None = None  # the model as the ledger records it
        self._base_changed = False  # a protect-set was added: the ledger's base file is written again
        self.evaluation: dict | None = None  # the evaluation files a ledger remembers (the CLI's)
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

    def source_weights(self, sources: dict[str, Sums] | None = None) -> dict[str, float]:
        """``w_s`` per protected source: 1 for the capability corpus, ``edit_weight`` for edits and
        protect-sets; with a ``capability_share`` floor ``c``, the capability weight rises to
        ``c / (1 − c) · Σ_{s≠cap} w_s N_s / N_cap`` when its share would fall below ``c``."""
        sources = self.sources if sources is None else sources
        w = {s: 1.0 if s == CAPABILITY else self.options.edit_weight for s in sources}
        floor = self.options.capability_share
        if floor is not None and CAPABILITY in sources and sources[CAPABILITY].tokens > 0:
            others = sum(w[s] * v.tokens for s, v in sources.items() if s != CAPABILITY)
            w[CAPABILITY] = max(1.0, floor / (1 - floor) * others / sources[CAPABILITY].tokens)
        return w

    def capability_share(self, sources: dict[str, Sums] | None = None, floored: bool = False) -> float | None:
        """``N_cap / (N_cap + Σ w_s N_s)``: the capability corpus's share of the protected statistics
        (``floored``: after the ``capability_share`` floor)."""
        sources = self.sources if sources is None else sources
        if CAPABILITY not in sources:
            return None
        w = self.source_weights(sources)
        if not floored:
            w[CAPABILITY] = 1.0
        total = sum(w[s] * v.tokens for s, v in sources.items())
        return w[CAPABILITY] * sources[CAPABILITY].tokens / total if total else None

    def protected_factors(self, sources: dict[str, Sums] | None = None) -> KFACStatistics:
        """``A = Σ w_s A_sum_s / Σ w_s N_s`` (and ``G``) over the protected sources (``source_weights``)."""
        sources = self.sources if sources is None else sources
        w = self.source_weights(sources)
        N = sum(w[s] * v.tokens for s, v in sources.items())
        A, G = {}, {}
        for n in self.modules:
            A[n] = sum(w[s] * v.A[n] for s, v in sources.items()) / N
            G[n] = sum(w[s] * v.G[n] for s, v in sources.items()) / N
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
        used = self.sources
        if o.method == "ft":
            eig = self.cap_eig
        elif o.protect_edits == "mix" and self.requests:
            used = self._mix_sources(len(self.history))
            eig = self._eigen(self.protected_factors(used))
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
        if self._record is not None and o.method != "ft":
            self._record["capability_share"] = self.capability_share(used)
            self._record["capability_share_floored"] = self.capability_share(used, floored=True)
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
                  "updates": len(self.updates(requests)), "refreshes": [],
                  "settings": {k: getattr(o, k) for k in CHUNK_SETTINGS},
                  "seconds": {"statistics": 0.0}}  # set when this chunk's statistics are taken
        self.flush_statistics()  # the previous chunk's
        self._record = record
        start = time.perf_counter()
        rehearsed = self._rehearsal(record) if o.rehearses() and self.requests else []
        record["seconds"]["rehearsal_check"] = time.perf_counter() - start
        record["seconds"]["rebuild"] = self.rebuild()
        if o.method in CLOSED_FORM_METHODS:
            self._closed_form(requests, index, record, targets)
        else:
            self._gradient(list(requests) + rehearsed, index, record)
        record["seconds"]["edit"] = (time.perf_counter() - start - record["seconds"]["rebuild"]
                                     - record["seconds"]["rehearsal_check"])
        self.requests.extend((index, r) for r in requests)  # rehearsed requests are there already, once
        protects = o.method in ("crispedit", "nullspace") and o.protect_edits != "none"  # ft has no projector
        if protects and o.protect_edits == "merge":
            self.pending = list(requests)  # their statistics: taken before anything moves the weights again
        if protects:
            self.stale = True
        self.chunks_since_rebuild += 1
        self._maybe_refresh(f"after chunk {index + 1}")
        record["drift"] = self.drift()
        moved = {n: d["relative_change"] for n, d in record["drift"].items() if n != "total" and d["relative_change"] > o.warn_change}
        if moved:
            n = max(moved, key=moved.get)
            record["warnings"] = [f"{n} has moved {moved[n]:.3g} of its norm since the base (|dW|/|W| above "
                                  f"--warn-change {o.warn_change:g}; {len(moved)} matrix(es) over)"]
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

    def set_options(self, **changes) -> None:
        """Options that may change between chunks (a resumed ledger's ``--lr``, ``--epochs``, ...,
        a raised ``--budget``): each chunk records the values it was edited with."""
        self.options = dataclasses.replace(self.options, **changes)
        if self.state is not None:
            for group in self.state.opt.param_groups:
                group["lr"] = self.options.lr
        if self.budget is not None and self.options.budget is not None and self.options.budget != self.budget.eps:
            if self.options.budget > self.budget.eps:
                self.budget_spent = False
            self.budget.eps = self.options.budget

    def add_protect(self, name: str, documents: Sequence[Sequence[int]]) -> None:
        """A protect-set added to a history under way: its K-FAC sums at the base weights join the
        protected sources (and the ledger's base file)."""
        with self.at_base():
            sums = self._sums(documents)
        self.protect_documents[name] = [list(d) for d in documents]
        self.base_sources[f"protect:{name}"] = self.sources[f"protect:{name}"] = sums
        self.stale, self._base_changed = True, True

    def _rehearsal(self, record: dict) -> list[EditRequest]:
        """Check every earlier edit still in force at the current weights (teacher-forced: every
        target token the argmax; one batched forward over the history's prompts and targets), and
        pick the forgotten ones to edit again with this chunk (``rehearse``: all or at most N, in
        ``rehearse_order``). Records on this chunk ``checked``, ``forgotten``, ``rehearsed``, and on
        the previous chunk how many of the edits it rehearsed hold now (``recovered``)."""
        from .evaluate import teacher_forced, token_accuracy

        o = self.options
        latest: dict[str, tuple[int, EditRequest]] = {}
        for i, (_, r) in enumerate(self.requests):  # an edit updated later (same prompt) is not checked
            latest[normalised(r.prompt)] = (i, r)
        past = sorted(latest.values(), key=lambda x: x[0])
        if self.prefix is None:  # the blocks below the first edited one never change: run them once per edit
            self.prefix = PrefixCache(self.model, first_block(self.model, list(self.modules)))
        with torch.no_grad():
            pairs = teacher_forced(self.model, self.tokenizer, [r.prompt for _, r in past], [r.target_new for _, r in past],
                                   prefix=self.prefix)
        held = [token_accuracy(pred, gold) for pred, gold in pairs]
        forgotten = [k for k, h in enumerate(held) if h < 1.0]
        if o.rehearse_order == "most-forgotten":
            forgotten.sort(key=lambda k: (held[k], k))
        limit = len(forgotten) if o.rehearse == "all" else int(o.rehearse)
        picked = [past[k][1] for k in forgotten[:limit]]
        if self.history and self.history[-1].get("rehearsal"):
            before = set(self.history[-1]["rehearsal"]["ids"])
            ok = {past[k][1].identity() for k, h in enumerate(held) if h == 1.0}
            self.history[-1]["rehearsal"]["recovered"] = len(before & ok)
        record["rehearsal"] = {"checked": len(past), "forgotten": len(forgotten), "rehearsed": len(picked),
                               "recovered": None, "ids": [r.identity() for r in picked]}
        return picked

    def updates(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests whose prompt an earlier chunk edited towards another target (an update of that edit)."""
        earlier = {normalised(r.prompt): normalised(r.target_new) for _, r in self.requests}
        return [r for r in requests if earlier.get(normalised(r.prompt), normalised(r.target_new)) != normalised(r.target_new)]

    def committed(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests this history has edited already (the same ``EditRequest.identity``)."""
        done = {r.identity() for _, r in self.requests}
        return [r for r in requests if r.identity() in done]

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
                          kl_factor=o.kl_factor, clamp_norm_factor=o.clamp_norm_factor, prefix_count=o.prefix_count,
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
    # on disk (crispedit/ledger.py writes and reads; the session says what and rebuilds itself)

    def describe(self, model_id: str | None) -> dict:
        """The identity of this history: what a model must match to continue it."""
        cfg = getattr(self.model, "config", None)
        return {
            "version": __version__, "model": model_id or getattr(cfg, "_name_or_path", None),
            "model_revision": getattr(cfg, "_commit_hash", None), "model_type": getattr(cfg, "model_type", None),
            "model_dtype": str(next(iter(self.modules.values())).weight.dtype).removeprefix("torch."),
            "modules": {n: list(m.weight.shape) for n, m in self.modules.items()},
            "base_weights_sha256": self.base_hash, "options": dataclasses.asdict(self.options),
            "capability": self.capability_meta, "protect": sorted(self.protect_documents),
        }

    def base_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """The part of a history fixed at its start: the protected sources at the base, and the documents."""
        tensors, meta = {}, {"sources": {}}
        for source, sums in self.base_sources.items():
            meta["sources"][source] = sums.tokens
            tensors.update(ledger.sums_tensors(f"sums.{source}", sums.A, sums.G))
        tensors.update(ledger.documents_tensors("capability", self.capability_documents))
        for name, docs in self.protect_documents.items():
            tensors.update(ledger.documents_tensors(f"protect:{name}", docs))
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def state_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Everything that changes as this history edits: tensors, and the JSON that goes with them.
        The pending chunk's statistics are taken first (the state holds them)."""
        self.flush_statistics()
        tensors = {f"delta.{n}": d for n, d in self.deltas().items()}
        for n, m in self.modules.items():  # a float64 model: no wider dtype makes W0 + ΔW exact, keep W itself
            if tensors[f"delta.{n}"].dtype == m.weight.dtype:
                tensors[f"weights.{n}"] = m.weight
        meta: dict = {"sources": {}, "stale": self.stale, "chunks_since_rebuild": self.chunks_since_rebuild,
                      "budget_spent": self.budget_spent,
                      "budget_projections": self.budget.projections if self.budget is not None else 0}
        for source, sums in self.sources.items():
            if sums is self.base_sources.get(source):
                meta["sources"][source] = "base"
            else:
                meta["sources"][source] = sums.tokens
                tensors.update(ledger.sums_tensors(f"sums.{source}", sums.A, sums.G))
        if self.state is not None:
            opt, meta["optimizer"] = self.state.state_tensors()
            tensors.update({f"opt.{k}": v for k, v in opt.items()})
        if self.stats_weights is not self.base:
            tensors.update({f"stats-weights.{n}": w for n, w in self.stats_weights.items()})
        if self.preserved is not None:
            tensors.update({f"preserved.{n}": v for n, v in self.preserved.items()})
        # the eigenbases the next chunk uses without rebuilding: a deferred rebuild, or current projectors
        # (after a refresh, say) — rebuilt on load they would re-project Adam's moment once more
        deferred = self.stale and self.chunks_since_rebuild < self.options.rebuild_every
        current = not self.stale and self.projectors is not None
        if self.eig is not None and (deferred or current):
            if self.eig is self.cap_eig:
                meta["eig"] = "capability"
            else:
                meta["eig"] = "saved"
                for n, (eA, eG) in self.eig.items():
                    tensors.update({f"eig.{n}.A.values": eA.values, f"eig.{n}.A.vectors": eA.vectors,
                                    f"eig.{n}.G.values": eG.values, f"eig.{n}.G.vectors": eG.vectors})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def restore_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Set this session (made at the base) to the state ``state_tensors`` described, bit for bit."""
        names = list(self.modules)
        dev = {n: m.weight.device for n, m in self.modules.items()}
        with torch.no_grad():
            for n, m in self.modules.items():
                w = tensors.get(f"weights.{n}")
                m.weight.copy_(shifted(self.base[n], tensors[f"delta.{n}"], +1) if w is None else w)
        self.sources = {s: self.base_sources[s] if tokens == "base" else Sums(*ledger.sums_from(tensors, f"sums.{s}", names), tokens)
                        for s, tokens in meta["sources"].items()}
        if self.state is not None:
            self.state.load_state({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"])
        if f"stats-weights.{names[0]}" in tensors:
            self.stats_weights = {n: tensors[f"stats-weights.{n}"].to(dev[n]) for n in names}
        if f"preserved.{names[0]}" in tensors:
            self.preserved = {n: tensors[f"preserved.{n}"].to(dev[n]) for n in names}
        self.stale, self.chunks_since_rebuild = meta["stale"], meta["chunks_since_rebuild"]
        self.budget_spent = meta["budget_spent"]
        if self.budget is not None:
            self.budget.projections = meta.get("budget_projections", 0)
        kind = meta.get("eig", "saved" if f"eig.{names[0]}.A.values" in tensors else None)
        if kind == "capability":
            self.eig = self.cap_eig
        elif kind == "saved":
            self.eig = {n: (Eigen(tensors[f"eig.{n}.A.values"].to(dev[n]), tensors[f"eig.{n}.A.vectors"].to(dev[n])),
                            Eigen(tensors[f"eig.{n}.G.values"].to(dev[n]), tensors[f"eig.{n}.G.vectors"].to(dev[n])))
                        for n in names}
        if self.eig is not None:
            self.projectors = self._projectors(self.eig)

    def save(self, directory: str | Path, model_id: str | None = None, snapshot_every: int | None = None,
             evaluation: dict | None = None, revert_to: int | None = None, discard: bool = False) -> dict:
        """Commit this history's state to the ledger in ``directory`` (a new one, or the one it was
        loaded from or last saved to: another history there is refused). ``snapshot_every``: keep the
        state of every that many chunks (default: the ledger's, else every chunk when a state is under
        256 MiB, else none). ``evaluation``: the evaluation files to remember. Returns ``ledger.json``."""
        directory = Path(directory).expanduser()
        owner = self.ledger_commit if self.ledger_dir is not None and Path(self.ledger_dir).resolve() == directory.resolve() else None
        if snapshot_every is None and owner is None:
            snapshot_every = ledger.auto_snapshot_every(ledger_state_bytes(self))
        new_base = owner is None or self._base_changed
        state = self.state_tensors()
        deltas = self.deltas()
        identity = self.describe(model_id if model_id is not None else self._model_id)
        manifest = edit_manifest(self.modules, deltas, {"base_model": identity["model"], "ledger": True,
                                                        "chunks": len(self.history), "options": identity["options"]},
                                 self.base_hash)
        info = ledger.commit(directory, owner=owner, identity=identity, history=self.history, state=state,
                             requests=ledger.requests_text(self.requests),
                             edited_sha256=weights_hash({n: m.weight for n, m in self.modules.items()}),
                             base=self.base_tensors() if new_base else None, snapshot_every=snapshot_every,
                             delta=(deltas, manifest), revert_to=revert_to, discard=discard,
                             extra={"evaluation": evaluation or self.evaluation} if (evaluation or self.evaluation) else None)
        self.ledger_dir, self.ledger_commit, self._model_id, self._base_changed = str(directory), info["commit"], identity["model"], False
        self.evaluation = info.get("evaluation")
        return info

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, tokenizer, modules: dict[str, nn.Module] | None = None,
             progress: bool = False, chunk: int | None = None) -> "EditSession":
        """The history of a ledger on ``model`` (at the ledger's base, or as the ledger left it), bit for
        bit; ``modules`` default to the ledger's; ``chunk``: the kept state after that chunk (a
        snapshot; 0 is the start) instead of the current one. Every file read is checked against its
        SHA-256."""
        from .layers import modules_by_name

        directory = Path(directory).expanduser()
        info = ledger.read(directory)
        if modules is None:
            modules = modules_by_name(model, list(info["modules"]))
        _check_ledger_model(info, modules, directory)
        _to_base(info, modules, directory)
        base = ledger.read_base(directory, info)
        names = list(modules)
        base_sources = {s: Sums(*ledger.sums_from(base, f"sums.{s}", names), t) for s, t in info["base"]["sources"].items()}
        protect = {name: ledger.documents_from(base, f"protect:{name}") for name in info.get("protect", [])}
        session = cls(model, tokenizer, modules, ledger.options_of(info), base_sources,
                      ledger.documents_from(base, "capability"), protect, info.get("capability"), progress,
                      eigen_cache=str(directory))
        if session.base_hash != info["base_weights_sha256"]:
            raise LedgerError(f"ledger {directory}: the base weights do not hash to the ledger's (another checkpoint?)")
        session.ledger_dir, session.ledger_commit, session._model_id = str(directory), info["commit"], info["model"]
        session.evaluation = info.get("evaluation")
        if chunk == 0:
            session.requests = []
            return session
        entry = ledger.entry_at(info, chunk, directory)
        tensors, session.requests = ledger.read_state(directory, entry)
        session.restore_state(tensors, entry["state_meta"])
        session.history = list(info["chunks"][: len(info["chunks"]) if chunk is None else chunk])
        if weights_hash({n: m.weight for n, m in modules.items()}) != entry["edited_weights_sha256"]:
            raise LedgerError(f"ledger {directory}: {entry['state']} does not give the weights it recorded (corrupted?)")
        return session

    def revert(self, to: int, discard: bool = False) -> None:
        """Go to the state after chunk ``to`` (0: the base) of this session's ledger, exactly: from a
        kept state (a snapshot, or a reverted chunk's), or by replaying the chunks after the nearest
        earlier snapshot (the same bits). The chunks after ``to`` stay in the ledger as a reverted
        branch that ``revert`` can bring back (``discard``: their states are removed)."""
        directory = self.ledger_dir
        if directory is None:
            raise SessionError("revert works on a ledger: save the session first (session.save(DIR))")
        info = ledger.read(directory)
        n = len(info["chunks"])
        kept = ledger.restorable(info)
        if not 0 <= to <= n and to not in kept:
            more = f" (and the reverted {', '.join(map(str, kept))})" if kept else ""
            raise SessionError(f"--to {to}: the ledger {directory} has chunks 0..{n}{more}")
        self.restore_base()
        if to > n or str(to) in info["snapshots"] or to == n:
            ledger.revert(directory, to, discard)
            fresh = EditSession.load(directory, self.model, self.tokenizer, self.modules, self.progress)
        else:
            fresh = EditSession.replayed(directory, self.model, self.tokenizer, to, self.modules, self.progress, discard)
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def replayed(cls, directory: str | Path, model: nn.Module, tokenizer, to: int,
                 modules: dict[str, nn.Module] | None = None, progress: bool = False,
                 discard: bool = False) -> "EditSession":
        """The state after chunk ``to`` of a ledger without a snapshot of it, on ``model`` at the
        ledger's base: the nearest earlier snapshot (or the base) loaded and the chunks after it edited
        again, which gives the same bits; committed as the ledger's current state, the later chunks a
        reverted branch."""
        info = ledger.read(directory)
        j = ledger.nearest_snapshot(info, to)
        session = cls.load(directory, model, tokenizer, modules, progress, chunk=j)
        requests = ledger.read_requests(directory, info["current"])
        for k in range(j, to):
            session.set_options(**info["chunks"][k].get("settings", {}))
            session.edit([r for c, r in requests if c == k], info["chunks"][k].get("name"))
            session.history[-1]["metrics"] = info["chunks"][k].get("metrics")
        session.set_options(**{k: info["options"][k] for k in CHUNK_SETTINGS})  # the ledger's, for what comes next
        session.save(directory, revert_to=to, discard=discard)
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



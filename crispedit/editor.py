"""The CrispEdit editing loop, batch mode, and its baselines from the same code path.

Only the selected matrices train. Each request becomes ``prompt + " " + target``; prompt tokens
(BOS included) and padding carry no loss; the loss is the mean over all target tokens of the
mini-batch. Each mini-batch gradient of each edited matrix is projected onto the low-curvature
subspace *before* the optimiser step:

- ``adam``: project the gradient, then Adam (its per-coordinate scaling moves the step out of
  the subspace a little; the report measures how much);
- ``sgd``: project the gradient, plain SGD (the step stays in the subspace);
- ``adam-projected-step``: project the gradient, and Adam's step again before it is applied.

Methods: ``crispedit`` (projector of ``A ⊗ G`` at gamma), ``ft`` (gamma = 0: plain fine-tuning
of the same layers) and ``nullspace`` (``G = I``: the input-covariance null space of Adam-NSCL;
AlphaEdit's closed-form update is a different algorithm and is not implemented here).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .curvature import KFACStatistics
from .layers import is_conv1d
from .projector import Eigen, KroneckerProjector, eigh_factor, quadratic_form
from .requests import EditRequest, edit_text
from .running import check_resident, frozen, input_device, pad_id
from .options import GRADIENT_METHODS as METHODS
from .options import OPTIMIZERS
from .saving import delta_dtype



class EditError(ValueError):
    """Options or inputs the editor cannot use."""


@dataclass
class EditResult:
    deltas: dict[str, Tensor]  # ΔW per matrix, stored orientation, in the delta dtype
    steps: int  # optimiser steps taken (skipped batches not counted)
    epochs: int
    epoch_losses: list[float]
    seconds: float


def eigenbases(stats: KFACStatistics, devices: dict[str, torch.device] | None = None,
               vectors_dtype: torch.dtype | None = None, cache: str | Path | None = None) -> dict[str, tuple[Eigen, Eigen]]:
    """``(eigh(A), eigh(G))`` per edited matrix, on the device where the matrix lives.

    ``vectors_dtype``: keep the eigenvectors in this dtype (float32 halves the memory of float64
    eigenvectors; the eigendecomposition itself runs in float64 up to 16,384 rows). ``cache``: a
    directory where each decomposition is kept under the SHA-256 of the factor it came from, so that a
    second edit with the same statistics skips ``eigh`` (minutes for a 14,336-row factor on a CPU)."""
    out = {}
    for n in stats.names:
        dev = devices[n] if devices else stats.A[n].device
        pair = []
        for key, M in (("A", stats.A[n]), ("G", stats.G[n])):  # eigh where the matrix lives (a GPU, say)
            e = _cached_eigh(M.to(dev), f"{n}.{key}", Path(cache) if cache else None, vectors_dtype)
            # row-major whatever eigh returned (column-major): a basis read back from a ledger or the
            # cache has this layout, and matmuls of another layout may round differently
            vectors = e.vectors.to(dev, vectors_dtype or e.vectors.dtype).contiguous()
            pair.append(Eigen(e.values.to(dev), vectors))
        out[n] = (pair[0], pair[1])
    return out


EIGEN_CACHE_FORMAT = "crispedit.eigh/2"


def _cached_eigh(M: Tensor, name: str, cache: Path | None, vectors_dtype: torch.dtype | None = None) -> Eigen:
    """``eigh_factor(M)``, kept in ``cache`` with the eigenvectors in ``vectors_dtype`` (the dtype they
    are used in: float32 halves a float64 cache; the cast is the one ``eigenbases`` makes anyway)."""
    if cache is None:
        return eigh_factor(M, name)
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    h = hashlib.sha256(f"{EIGEN_CACHE_FORMAT}|{M.dtype}|{tuple(M.shape)}|{vectors_dtype}".encode())
    h.update(M.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    path = cache / f"eigh-{h.hexdigest()[:32]}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                # clone: fresh aligned memory, so that matmuls round as with a basis computed here
                return Eigen(f.get_tensor("values").to(M.device).clone(), f.get_tensor("vectors").to(M.device).clone())
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    e = eigh_factor(M, name)
    e = Eigen(e.values, e.vectors.to(vectors_dtype or e.vectors.dtype))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"values": e.values.cpu().contiguous(), "vectors": e.vectors.cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only statistics directory: no cache, same result
    return e


def build_projectors(eig: dict[str, tuple[Eigen, Eigen]], method: str, gamma: float,
                     dtype: torch.dtype = torch.float32, projection_dtype: str = "float32") -> dict[str, KroneckerProjector]:
    """One projector per edited matrix: ``crispedit`` (A ⊗ G at gamma), ``ft`` (gamma 0) or
    ``nullspace`` (G = I, energy rule over the eigenvalues of A); eigenvectors kept in ``dtype``,
    rotations in ``projection_dtype`` (float32, tf32 or bfloat16)."""
    if method not in METHODS:
        raise EditError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    g = 0.0 if method == "ft" else gamma
    return {n: KroneckerProjector.from_eigen(eA, eG, g, method == "nullspace", dtype, projection_dtype)
            for n, (eA, eG) in eig.items()}


def tokenize_requests(tokenizer, requests: Sequence[EditRequest]) -> list[tuple[list[int], int]]:
    """``(ids of prompt + " " + target, number of prompt tokens)`` per request; the prompt's
    length is measured by tokenising the prompt alone."""
    out = []
    for r in requests:
        n_prompt = len(tokenizer(r.prompt)["input_ids"])
        ids = tokenizer(edit_text(r.prompt, r.target_new))["input_ids"]
        if len(ids) <= n_prompt:
            raise EditError(f"request {r.case_id}: target {r.target_new!r} tokenises to nothing after the prompt")
        out.append((ids, n_prompt))
    return out


def _batch(items: Sequence[tuple[list[int], int]], pad: int, device) -> tuple[Tensor, Tensor, Tensor]:
    T = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), T), pad, dtype=torch.long)
    attn = torch.zeros(len(items), T, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for b, (x, n_prompt) in enumerate(items):
        ids[b, : len(x)] = torch.tensor(x)
        attn[b, : len(x)] = 1
        labels[b, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
    return ids.to(device), attn.to(device), labels.to(device)


def edit_loss(model: nn.Module, ids: Tensor, attn: Tensor, labels: Tensor) -> Tensor:
    """Mean negative log-likelihood over all target tokens of the batch (right padding); under a
    ``device_map`` the labels go where the logits are (the last block's device, not the inputs')."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    target = labels[:, 1:].to(logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _project(P: KroneckerProjector, X: Tensor, conv: bool) -> Tensor:
    """Project a weight-shaped tensor; GPT-2's Conv1D stores ``Wᵀ``."""
    return P.project(X.T).T if conv else P.project(X)


class KeepAll:
    """The projector of plain fine-tuning when there is no curvature at all: keeps every direction."""

    is_identity = True
    dtype = torch.float64

    def project(self, X: Tensor) -> Tensor:
        return X

    def summary(self) -> dict:
        return {"gamma": 0.0, "removed": 0, "removed_share": 0.0}


def master_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Optimiser arithmetic never runs below float32: bf16/fp16 weights get float32 masters."""
    return torch.promote_types(weight_dtype, torch.float32)


class EditOptimizer:
    """Master copies of the edited matrices and the optimiser over them.

    A float32 or float64 model is its own master. A bf16 or fp16 model gets float32 masters: the
    gradient (computed through the model's own weights) is upcast, projected and fed to Adam (or
    SGD) on the master, whose moments are float32 too; the model's weights are then the master
    rounded to their dtype. Without masters, steps of ~5e-4 on bf16 weights whose rounding step is
    ~1e-4 are partly rounded away (and leave the subspace), and Adam's eps underflows in fp16.
    The state persists across chunks of a sequential edit.
    """

    def __init__(self, modules: dict[str, nn.Module], optimizer: str = "adam", lr: float = 5e-4):
        if optimizer not in OPTIMIZERS:
            raise EditError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        check_resident(modules)
        self.modules = modules
        self.kind = optimizer
        self.conv = {n: is_conv1d(m) for n, m in modules.items()}
        self.masters: dict[str, Tensor] = {}
        for n, m in modules.items():
            w = m.weight
            self.masters[n] = w if w.dtype == master_dtype(w.dtype) else w.detach().to(master_dtype(w.dtype)).clone()
        params = list(self.masters.values())
        if optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
        else:
            self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @property
    def weights(self) -> list[Tensor]:
        """The model's own edited weights (they carry the gradients)."""
        return [m.weight for m in self.modules.values()]

    @torch.no_grad()
    def step(self, projectors: dict[str, KroneckerProjector],
             constrain: Callable[[dict[str, Tensor], dict[str, Tensor]], None] | None = None,
             factors: "GradientFactors | None" = None) -> None:
        """Project each gradient, step, optionally project the step (``adam-projected-step``) and
        apply ``constrain(masters, weights)`` (a capability budget; ``weights``: the model's, not yet
        written), then write the masters back.
        ``factors`` (the layer inputs and output gradients of the batch) let a projector form the
        gradient's eigen-coordinates from them when counted flops say that is cheaper."""
        for n, m in self.modules.items():
            master = self.masters[n]
            grad, P = m.weight.grad.to(master.dtype), projectors[n]
            pair = factors.pairs.get(n) if factors is not None else None
            if pair is not None and not P.is_identity and P.form(pair[0].numel() // pair[0].shape[-1]) == "factors":
                X = grad.T if self.conv[n] else grad
                out = P.project_factors(pair[0], pair[1], X=X)
                master.grad = out.T if self.conv[n] else out
            else:
                master.grad = _project(P, grad, self.conv[n])
            if master is not m.weight:
                m.weight.grad = None
        before = {n: w.clone() for n, w in self.masters.items()} if self.kind == "adam-projected-step" else None
        self.opt.step()
        if before is not None:
            for n, w in self.masters.items():
                w.copy_(before[n] + _project(projectors[n], w - before[n], self.conv[n]))
        if constrain is not None:  # a budget; the model's weights are still those of the step before
            constrain(self.masters, {n: m.weight.detach() for n, m in self.modules.items()})
        for n, m in self.modules.items():
            if self.masters[n] is not m.weight:
                m.weight.copy_(self.masters[n])
            self.masters[n].grad = None

    @torch.no_grad()
    def reproject(self, projectors: dict[str, KroneckerProjector]) -> None:
        """Project Adam's first moment onto a new subspace (after the projectors are rebuilt)."""
        for n, w in self.masters.items():
            state = self.opt.state.get(w)
            if state and "exp_avg" in state:
                state["exp_avg"].copy_(_project(projectors[n], state["exp_avg"], self.conv[n]))

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Masters := the model's weights (after the weights were set from outside, e.g. a revert)."""
        for n, m in self.modules.items():
            if self.masters[n] is not m.weight:
                self.masters[n].copy_(m.weight)

    def state_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """The optimiser state as tensors (masters of bf16/fp16 models, Adam moments) and JSON (steps)."""
        tensors, meta = {}, {"kind": self.kind, "steps": {}}
        for n, w in self.masters.items():
            if w is not self.modules[n].weight:
                tensors[f"{n}.master"] = w.detach()
            for key, value in self.opt.state.get(w, {}).items():
                if key == "step":
                    meta["steps"][n] = float(value)
                elif isinstance(value, Tensor):
                    tensors[f"{n}.{key}"] = value.detach()
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore what ``state_tensors`` returned, bit for bit."""
        if meta.get("kind") != self.kind:
            raise EditError(f"optimiser state of {meta.get('kind')!r}, expected {self.kind!r}")
        for n, w in self.masters.items():
            if w is not self.modules[n].weight:
                w.copy_(tensors[f"{n}.master"])
            if n in meta.get("steps", {}):
                state = self.opt.state[w]
                state["step"] = torch.tensor(meta["steps"][n], dtype=torch.float32)
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = tensors[f"{n}.{key}"].to(w.device, w.dtype).clone()


class GradientFactors:
    """Hooks that keep, for the last forward and backward, each edited matrix's inputs ``a``
    (``[..., d_in]``) and output gradients ``g`` (``[..., d_out]``): its weight gradient is ``gᵀ a``.
    Nothing is copied (autograd keeps ``a`` anyway)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.pairs: dict[str, tuple[Tensor, Tensor]] = {}
        self._inputs: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "GradientFactors":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.pairs.clear()
        self._inputs.clear()

    def _hook(self, name: str):
        def hook(module, args, out):
            if not torch.is_grad_enabled() or not out.requires_grad:
                return
            self._inputs[name] = args[0].detach().to(out.device)  # as called: accelerate moves them inside the call
            self.pairs.pop(name, None)

            def on_grad(grad):
                self.pairs[name] = (grad.detach(), self._inputs[name])

            out.register_hook(on_grad)

        return hook


def run_epochs(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    projectors: dict[str, KroneckerProjector],
    state: EditOptimizer,
    batch_size: int = 32,
    epochs: int = 25,
    loss_threshold: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    constrain: Callable[[dict[str, Tensor], dict[str, Tensor]], None] | None = None,
    after_epoch: Callable[[int], dict[str, KroneckerProjector]] | None = None,
) -> tuple[int, list[float]]:
    """The editing loop over ``requests`` with the optimiser ``state``: returns (steps, epoch losses).

    Up to ``epochs`` passes, reshuffled each epoch by a generator seeded with ``seed``; a batch whose
    loss is below ``loss_threshold`` is skipped, and the loop stops when an epoch's mean loss (skipped
    batches included) is below it. ``after_epoch(epoch)`` runs after each epoch that does not stop
    the loop and returns the projectors to go on with (a curvature refresh may rebuild them). A NaN
    or infinite loss is an error."""
    from tqdm.auto import tqdm

    if set(projectors) != set(state.modules):
        raise EditError(f"projectors for {sorted(projectors)} but editing {sorted(state.modules)}")
    if not requests:
        raise EditError("no request to edit")
    items = tokenize_requests(tokenizer, requests)
    device, pad = input_device(model), pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    batches = -(-len(items) // batch_size)
    if constrain is not None and hasattr(constrain, "begin"):
        constrain.begin()  # a budget re-anchors at the chunk's start (a resumed ledger continues bit for bit)
    steps, epoch_losses = 0, []
    # eval mode: no dropout, so the edit is a deterministic function of the seed
    with frozen(model, state.weights), GradientFactors(state.modules) as factors, \
            tqdm(total=epochs * batches, unit="step", desc="edit", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(items), generator=gen).tolist()
            losses = []
            for lo in range(0, len(order), batch_size):
                ids, attn, labels = _batch([items[i] for i in order[lo : lo + batch_size]], pad, device)
                loss = edit_loss(model, ids, attn, labels)
                value = loss.item()
                if not math.isfinite(value):
                    raise EditError(f"the edit loss became {value} at step {steps + 1} (epoch {epoch + 1}): the learning "
                                    "rate is too high for this model, or its dtype overflows; nothing was saved")
                losses.append(value)
                bar.update(1)
                if value < loss_threshold:
                    continue  # already learnt
                loss.backward()
                state.step(projectors, constrain, factors)
                steps += 1
                bar.set_postfix(loss=f"{value:.4f}", epoch=epoch + 1)
            epoch_losses.append(sum(losses) / len(losses))
            if epoch_losses[-1] < loss_threshold:
                break
            if after_epoch is not None and epoch + 1 < epochs:
                projectors = after_epoch(epoch)
        bar.total = bar.n
    check_finite(state.modules)
    return steps, epoch_losses


def check_finite(modules: dict[str, nn.Module]) -> None:
    """Refuse a model whose edited matrices hold NaN or inf (nothing broken is ever saved)."""
    for n, m in modules.items():
        if not torch.isfinite(m.weight).all():
            raise EditError(f"{n}: the edited weights contain NaN or inf; nothing was saved")


def edit(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    modules: dict[str, nn.Module],
    projectors: dict[str, KroneckerProjector],
    optimizer: str = "adam",
    lr: float = 5e-4,
    batch_size: int = 32,
    epochs: int = 25,
    loss_threshold: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
) -> EditResult:
    """Edit ``model`` in place, in one batch from its current weights; returns ΔW per matrix (in
    the delta dtype: float64 for float32 models, float32 for bf16/fp16) and what the run did."""
    state = EditOptimizer(modules, optimizer, lr)
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    start = time.perf_counter()
    steps, losses = run_epochs(model, tokenizer, requests, projectors, state, batch_size, epochs, loss_threshold,
                               seed, progress)
    deltas = {n: m.weight.detach().to(delta_dtype(m.weight.dtype)) - base[n].to(delta_dtype(m.weight.dtype))
              for n, m in modules.items()}
    return EditResult(deltas, steps, len(losses), losses, time.perf_counter() - start)


def drift_report(deltas: dict[str, Tensor], modules: dict[str, nn.Module], eig: dict[str, tuple[Eigen, Eigen]],
                 projectors: dict[str, KroneckerProjector]) -> dict[str, dict]:
    """Per matrix and summed: ‖ΔW‖/‖W‖, the K-FAC predicted drift ½ tr(ΔWᵀ G ΔW A) with the
    capability factors (whatever the method), and the part of it outside the method's kept
    subspace, ½ q(ΔW − P ΔW). ``modules`` hold the edited weights. One matrix at a time, in the
    eigenvectors' precision with float64 norms and sums (no float64 copy of the matrices)."""
    rows: dict[str, dict] = {}
    sq_delta = sq_base = 0.0
    for n, m in modules.items():
        conv = is_conv1d(m)
        eA, eG = eig[n]
        P = projectors[n]
        dtype = eA.vectors.dtype
        D = deltas[n].to(m.weight.device, dtype)
        D = D.T if conv else D
        W = m.weight.detach().T if conv else m.weight.detach()
        d2 = float(torch.linalg.vector_norm(D, dtype=torch.float64)) ** 2
        w0 = float(torch.linalg.vector_norm(W.to(dtype) - D, dtype=torch.float64)) ** 2
        outside = 0.0 if P.is_identity else quadratic_form(D - P.project(D), eA, eG)
        rows[n] = {"relative_change": (d2 / w0) ** 0.5, "predicted_kl": quadratic_form(D, eA, eG),
                   "predicted_kl_outside": outside}
        sq_delta += d2
        sq_base += w0
        del D, W
    rows["total"] = {"relative_change": (sq_delta / sq_base) ** 0.5,
                     "predicted_kl": sum(r["predicted_kl"] for r in rows.values()),
                     "predicted_kl_outside": sum(r["predicted_kl_outside"] for r in rows.values())}
    return rows

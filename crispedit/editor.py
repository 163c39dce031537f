"""The CrispEdit editing loop, batch mode (SPEC §1.6), and its baselines from the same code path.

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

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .curvature import KFACStatistics
from .layers import is_conv1d
from .projector import Eigen, KroneckerProjector, eigh_factor, quadratic_form
from .requests import EditRequest, edit_text
from .running import frozen, input_device, pad_id

METHODS = ("crispedit", "ft", "nullspace")
OPTIMIZERS = ("adam", "sgd", "adam-projected-step")


class EditError(ValueError):
    """Options or inputs the editor cannot use."""


@dataclass
class EditResult:
    deltas: dict[str, Tensor]  # ΔW per matrix, stored orientation, float64 for reports
    steps: int  # optimiser steps taken (skipped batches not counted)
    epochs: int
    epoch_losses: list[float]
    seconds: float


def eigenbases(stats: KFACStatistics, devices: dict[str, torch.device] | None = None) -> dict[str, tuple[Eigen, Eigen]]:
    """``(eigh(A), eigh(G))`` per edited matrix, on the device where the matrix lives."""
    out = {}
    for n in stats.names:
        dev = devices[n] if devices else stats.A[n].device
        out[n] = (eigh_factor(stats.A[n].to(dev), f"{n}.A"), eigh_factor(stats.G[n].to(dev), f"{n}.G"))
    return out


def build_projectors(eig: dict[str, tuple[Eigen, Eigen]], method: str, gamma: float,
                     dtype: torch.dtype = torch.float32) -> dict[str, KroneckerProjector]:
    """One projector per edited matrix: ``crispedit`` (A ⊗ G at gamma), ``ft`` (gamma 0) or
    ``nullspace`` (G = I, energy rule over the eigenvalues of A)."""
    if method not in METHODS:
        raise EditError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    g = 0.0 if method == "ft" else gamma
    return {n: KroneckerProjector.from_eigen(eA, eG, g, identity_G=method == "nullspace", dtype=dtype)
            for n, (eA, eG) in eig.items()}


def tokenize_requests(tokenizer, requests: Sequence[EditRequest]) -> list[tuple[list[int], int]]:
    """``(ids of prompt + " " + target, number of prompt tokens)`` per request; the prompt's
    length is measured by tokenising the prompt alone (SPEC §1.10.7)."""
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
    """Mean negative log-likelihood over all target tokens of the batch (right padding)."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _project(P: KroneckerProjector, X: Tensor, conv: bool) -> Tensor:
    """Project a weight-shaped tensor; GPT-2's Conv1D stores ``Wᵀ``."""
    return P.project(X.T).T if conv else P.project(X)


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
    """Edit ``model`` in place; returns ΔW per matrix and what the run did."""
    if optimizer not in OPTIMIZERS:
        raise EditError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if set(projectors) != set(modules):
        raise EditError(f"projectors for {sorted(projectors)} but editing {sorted(modules)}")
    if not requests:
        raise EditError("no request to edit")
    from tqdm.auto import tqdm

    items = tokenize_requests(tokenizer, requests)
    device, pad = input_device(model), pad_id(tokenizer)
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    weights = [m.weight for m in modules.values()]
    conv = {n: is_conv1d(m) for n, m in modules.items()}
    if optimizer == "sgd":
        opt = torch.optim.SGD(weights, lr=lr)
    else:
        opt = torch.optim.Adam(weights, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps, epoch_losses = 0, []
    start = time.perf_counter()
    # eval mode: no dropout, so the edit is a deterministic function of the seed
    with frozen(model, weights), tqdm(total=epochs, unit="epoch", desc="edit", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(items), generator=gen).tolist()
            losses = []
            for lo in range(0, len(order), batch_size):
                ids, attn, labels = _batch([items[i] for i in order[lo : lo + batch_size]], pad, device)
                loss = edit_loss(model, ids, attn, labels)
                losses.append(loss.item())
                if loss.item() < loss_threshold:
                    continue  # already learnt
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for n, m in modules.items():
                        m.weight.grad = _project(projectors[n], m.weight.grad, conv[n])
                    before = [w.detach().clone() for w in weights] if optimizer == "adam-projected-step" else None
                    opt.step()
                    if before is not None:
                        for (n, m), w0 in zip(modules.items(), before):
                            m.weight.copy_(w0 + _project(projectors[n], m.weight - w0, conv[n]))
                steps += 1
            epoch_losses.append(sum(losses) / len(losses))
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}", steps=steps)
            if epoch_losses[-1] < loss_threshold:
                break
    deltas = {n: m.weight.detach().double() - base[n].double() for n, m in modules.items()}
    return EditResult(deltas, steps, len(epoch_losses), epoch_losses, time.perf_counter() - start)


def drift_report(deltas: dict[str, Tensor], modules: dict[str, nn.Module], eig: dict[str, tuple[Eigen, Eigen]],
                 projectors: dict[str, KroneckerProjector]) -> dict[str, dict]:
    """Per matrix and summed: ‖ΔW‖/‖W‖, the K-FAC predicted drift ½ tr(ΔWᵀ G ΔW A) with the
    capability factors (whatever the method), and the part of it outside the method's kept
    subspace, ½ q(ΔW − P ΔW). ``modules`` hold the edited weights, ``deltas`` are float64."""
    rows: dict[str, dict] = {}
    sq_delta = sq_base = 0.0
    for n, m in modules.items():
        conv = is_conv1d(m)
        D = deltas[n].T if conv else deltas[n]
        W0 = (m.weight.detach().double() - deltas[n]).T if conv else m.weight.detach().double() - deltas[n]
        eA, eG = eig[n]
        P = projectors[n]
        outside = 0.0 if P.is_identity else quadratic_form(D - P.project(D.to(P.dtype)).double(), eA, eG)
        rows[n] = {"relative_change": float(D.norm() / W0.norm()), "predicted_kl": quadratic_form(D, eA, eG),
                   "predicted_kl_outside": outside}
        sq_delta += float(D.norm() ** 2)
        sq_base += float(W0.norm() ** 2)
    rows["total"] = {"relative_change": (sq_delta / sq_base) ** 0.5,
                     "predicted_kl": sum(r["predicted_kl"] for r in rows.values()),
                     "predicted_kl_outside": sum(r["predicted_kl_outside"] for r in rows.values())}
    return rows

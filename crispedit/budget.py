"""The capability budget: never let the K-FAC predicted drift exceed ``eps`` nats per token.

For the cumulative update ``ΔW_l = W_l − W0_l`` of every edited matrix ``l``, with the capability
factors at the base ``A_l = U_A diag(α) U_Aᵀ`` and ``G_l = U_G diag(β) U_Gᵀ``, the prediction of the
mean per-token KL(base ‖ edited) on capability text is a diagonal quadratic form in the Kronecker
eigenbasis:

    q(ΔW) = ½ Σ_l Σ_{j,i} d_l[j, i] C_l[j, i]²,    C_l = U_Gᵀ ΔW_l U_A,    d_l[j, i] = β_j α_i.

The budget set ``{q ≤ eps}`` is an ellipsoid. The update an optimiser proposes is replaced by its
Euclidean (Frobenius) projection onto that set: the smallest change of the weights that meets the
budget. Its optimality conditions give, coordinate by coordinate,

    C'[j, i] = C[j, i] / (1 + μ d[j, i])     with μ ≥ 0 the root of   ½ Σ d C² / (1 + μ d)² = eps,

one scalar shared by all matrices (the budget is summed over them), found by Newton's method on a
convex decreasing function (monotone from μ = 0, so it never overshoots). High-curvature coordinates
shrink most, zero-curvature ones not at all, and a coordinate that is zero stays zero (so an update
inside a subspace of the same eigenbasis stays there). Cost: one rotation into the eigenbasis and
one back per matrix and step (as much as one projection), plus a few passes over the coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Aim just inside the budget so that float32 rotations back to weights cannot land outside it.
MARGIN = 1e-4
NEWTON_STEPS = 100
NEWTON_TOL = 1e-12


class BudgetError(ValueError):
    """A budget that cannot be honoured (not positive, or no capability curvature to measure it)."""


def drift(C: list[Tensor], d: list[Tensor]) -> float:
    """``½ Σ d C²`` over all matrices (float64 sums)."""
    return 0.5 * sum(float((dl.double() * Cl.double() ** 2).sum()) for Cl, dl in zip(C, d))


def shrink_factor(C: list[Tensor], d: list[Tensor], eps: float) -> float:
    """The μ ≥ 0 at which ``½ Σ d C² / (1 + μ d)² = eps`` (0 when the budget already holds)."""
    if eps <= 0:
        raise BudgetError(f"--budget must be positive, got {eps}")
    C2 = [Cl.double() ** 2 for Cl in C]
    dd = [dl.double() for dl in d]

    def f_and_slope(mu: float) -> tuple[float, float]:
        f = slope = 0.0
        for c2, dl in zip(C2, dd):
            s = 1.0 / (1.0 + mu * dl)
            f += 0.5 * float((dl * c2 * s * s).sum())
            slope -= float((dl * dl * c2 * s * s * s).sum())
        return f - eps, slope

    mu = 0.0
    value, slope = f_and_slope(mu)
    for _ in range(NEWTON_STEPS):
        if value <= 0:
            break
        step = -value / slope
        mu += step
        value, slope = f_and_slope(mu)
        if step <= NEWTON_TOL * max(mu, 1.0):
            break
    return mu


def project_coordinates(C: list[Tensor], d: list[Tensor], eps: float) -> tuple[list[Tensor], float]:
    """The Euclidean projection of the coordinates ``C`` onto ``{½ Σ d C² ≤ eps}``, and μ."""
    mu = shrink_factor(C, d, eps)
    if mu == 0.0:
        return C, 0.0
    return [Cl / (1.0 + mu * dl.to(Cl.dtype)) for Cl, dl in zip(C, d)], mu


class CapabilityBudget:
    """``eps`` nats per token of predicted capability drift, over the whole history since the base.

    ``bases[name] = (U_A, alpha, U_G, beta)`` are the eigenbases of the capability factors at the base
    (linear orientation: W is d_out × d_in); ``base_weights[name]`` the base matrices in the stored
    orientation (``conv[name]``: GPT-2's Conv1D stores Wᵀ). ``__call__(masters)`` projects the
    cumulative update of the master weights in place, when it exceeds the budget.
    """

    def __init__(self, eps: float, bases: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]],
                 base_weights: dict[str, Tensor], conv: dict[str, bool]):
        if not eps > 0:
            raise BudgetError(f"--budget must be positive, got {eps}")
        self.eps = eps
        self.bases = bases
        self.base_weights = base_weights
        self.conv = conv
        self.d = {n: torch.outer(beta, alpha) for n, (_, alpha, _, beta) in bases.items()}
        self.projections = 0  # steps at which the budget bound
        self.last_mu = 0.0

    def coordinates(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """``C = U_Gᵀ (W − W0) U_A`` per matrix, in the eigenvectors' dtype."""
        out = {}
        for n, w in weights.items():
            U_A, _, U_G, _ = self.bases[n]
            D = (w.detach().to(U_A.dtype) - self.base_weights[n].to(U_A.dtype))
            D = D.T if self.conv[n] else D
            out[n] = U_G.T @ D @ U_A
        return out

    def predicted(self, weights: dict[str, Tensor]) -> float:
        """The predicted drift ``q(W − W0)`` of the given weights."""
        C = self.coordinates(weights)
        return drift(list(C.values()), [self.d[n] for n in C])

    @torch.no_grad()
    def __call__(self, masters: dict[str, Tensor]) -> None:
        C = self.coordinates(masters)
        names = list(C)
        d = [self.d[n] for n in names]
        if drift([C[n] for n in names], d) <= self.eps:
            self.last_mu = 0.0
            return
        projected, self.last_mu = project_coordinates([C[n] for n in names], d, self.eps * (1 - MARGIN))
        self.projections += 1
        for n, Cn in zip(names, projected):
            U_A, _, U_G, _ = self.bases[n]
            D = U_G @ Cn @ U_A.T
            D = D.T if self.conv[n] else D
            masters[n].copy_(self.base_weights[n].to(masters[n].dtype) + D.to(masters[n].dtype))

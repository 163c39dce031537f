"""The capability budget: the K-FAC predicted drift of the saved weights never exceeds ``eps`` nats per token.

For the cumulative update ``Z_l = W_l − W0_l`` of every edited matrix ``l`` (``d_out × d_in``), with the
capability factors at the base ``A_l = U_A diag(α) U_Aᵀ`` and ``G_l = U_G diag(β) U_Gᵀ`` (descending), the
prediction of the mean per-token KL(base ‖ edited) on capability text is a diagonal quadratic form in the
Kronecker eigenbasis, summed over the matrices:

    q(Z) = ½ Σ_l Σ_{j,i} d_l[j, i] C_l[j, i]²,    C_l = U_Gᵀ Z_l U_A,    d_l[j, i] = β_j α_i.

**The exact projection** onto ``{q ≤ t}`` is ``C' = C / (1 + μ d)``, one ``μ ≥ 0`` shared by all matrices,
the root of ``½ Σ d C² / (1 + μ d)² = t`` (Newton from ``μ = 0`` on a convex decreasing function). It
needs every coordinate: a rotation in and one back, ``R = 2 (d_out² d_in + d_out d_in²)`` flops each
(2.2 TFLOP for a 4096 × 14336 matrix: five of them cost more than LLaMA-3-8B's forward and backward).
``ExactBudget`` does it at every step (the reference); ``CapabilityBudget`` rarely.

**An anchor and a first-order term.** ``q`` is quadratic, so for any anchor ``Z₀`` and ``Y = Z − Z₀``

    q(Z) = q(Z₀) + ⟨H₀, Y⟩ + q(Y),    H₀ = G Z₀ A   (exact).

An *exact step* computes the coordinates of the saved weights, ``q₀`` and ``H₀ = U_G (d ⊙ C) U_Aᵀ``
(``2R``) and makes them the anchor. Between exact steps only ``q(Y)`` is unknown, and it is bounded.

**A dominating form that needs no rotation.** Keep the top ``K_A`` eigenvalues of ``A`` and ``K_G`` of
``G`` and flatten the tails to their largest value (``α̂_i = α_{K_A}`` for ``i ≥ K_A``, ``β̂`` alike).
``Â ⪰ A`` and ``Ĝ ⪰ G`` in the same eigenbasis, and ``½ tr(Yᵀ G Y A)`` grows with each PSD factor, so
``q̂(Y) = ½ Σ β̂_j α̂_i C_Y² ≥ q(Y)``. With ``V_A = U_A[:, :K_A]``, ``V_G = U_G[:, :K_G]``, ``R = V_Gᵀ Y``,
``S = Y V_A`` and the corner ``V_Gᵀ S``, ``q̂`` splits into four blocks of known mass (orthogonal
invariance): the corner (exact), ``K_G`` rows (``‖R_j‖² − ‖corner_j‖²`` at ``β_j α_{K_A}``), ``K_A``
columns and the tail (``‖Y‖² − ‖R‖² − ‖S‖² + ‖corner‖²`` at ``β_{K_G} α_{K_A}``):
``2 d_out d_in (K_A + K_G) + 2 K_G d_out K_A`` flops, about ``TAIL_FRACTION`` of ``R``:
``K_A + K_G = ⌈TAIL_FRACTION (d_in + d_out)⌉``, split to minimise ``tr Â · tr Ĝ`` (``tail_ranks``).

**Every step** evaluates the certificate ``q₀ + ⟨H₀, Y⟩ + q̂(Y) ≤ eps`` for the weights as they will be
saved. When it holds nothing changes, so a run the budget never binds is the unconstrained run bit for bit.
When it fails: if the last exact step is at least ``EXACT_EVERY`` steps old, an exact step re-anchors at
the current weights; then (or at once) the *cut* replaces ``Y`` by the Euclidean projection onto the set
where the certificate holds, ``Y' = (I + μ D̂)⁻¹ (Y − μ H₀)``. ``(I + μ D̂)⁻¹`` is a constant ``c`` on
the tail block and depends on the row (column) alone on the rows (columns) block, so

    (I + μ D̂)⁻¹ X = c X + V_G diag(f_G − c) R_X + (S_X diag(f_A − c) + V_G (M ⊙ corner_X)) V_Aᵀ

costs what the certificate costs, and ``μ`` is a bisection over a few thousand block sums. If the exact
step finds ``q > eps`` so far in the flattened tails that no cut could come back (``½ Σ d C² (1 − d/d̂)``,
the certificate's least value, is over), it projects exactly onto ``q ≤ (1 − HEADROOM) eps`` first.
``q ≤ eps`` holds after every step; the path differs from the per-step exact projection by the
conservatism of ``q̂(Y)`` between exact steps (``benchmarks/bench_budget.py`` measures it).

**Saved weights.** A bf16/fp16 model keeps float32 masters and its weights are the masters rounded. The
certificate is always taken on the rounded weights (the anchor is on their grid), so the rounding is inside
the guarantee. A cut of rounded weights aims below the limit by ``ROUNDING_AIM`` times the rounding seen at
the last cuts and checks the rounded result; when it is over, it cuts the masters' increment again
(``RETRY_AIM`` times the rounding below; the bound and views of a cut increment need no large product) and
after ``SAVED_TRIES`` falls back to the weights before the step (certified then).

Precision: every matmul runs in the eigenvectors' dtype inside ``full_precision()`` (no TF32), sums in
float64, and the limit is ``eps (1 − MARGIN)``. Kept between steps: the anchor and ``H₀`` (one matrix each
per edited matrix) and their small linear views; at an exact step every matrix's coordinates for the shared
μ. ``budget_flops`` and ``budget_memory`` count it all (``crispedit plan --budget``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .running import full_precision

# Aim just inside the budget so that float32 rounding in the rotations and sums cannot land outside it.
MARGIN = 1e-4
NEWTON_STEPS = 100
NEWTON_TOL = 1e-12
# The dominating form keeps K_G + K_A = ceil(TAIL_FRACTION (d_out + d_in)) exact eigenvalues: a certificate or
# a cut costs about TAIL_FRACTION of a rotation (bench_budget.py measures what it gives up).
TAIL_FRACTION = 1 / 16
# At most one exact step (rotation in, H₀ back, and the weights back when it projects) per this many steps.
EXACT_EVERY = 8
# An exact projection (when no cut could reach the limit) aims at q = (1 − HEADROOM) eps: room for the next steps.
HEADROOM = 0.02
# Cuts of a step whose rounded (saved) weights must fit before the step falls back to the last certified weights.
SAVED_TRIES = 2
# Bisection steps of the cut's μ.
BISECTIONS = 200
# A cut of rounded weights aims this many times the rounding seen at the last cuts below the limit.
ROUNDING_AIM = 1.5
# A cut that came out over aims this many times the rounding seen so far below the limit.
RETRY_AIM = 3.0


class BudgetError(ValueError):
    """A budget that cannot be honoured (not positive, or no capability curvature to measure it)."""


# ---------------------------------------------------------------------------------------------
# the shrink factor μ of a diagonal quadratic form


@dataclass
class _Term:
    """A part of ``½ Σ d m``: weights ``d = b ⊗ a`` (broadcast; either may be a scalar) and masses ``m``
    (``x²`` when ``squared``, else ``x``)."""

    b: Tensor | float
    a: Tensor | float
    x: Tensor
    squared: bool = True

    def d(self) -> Tensor:
        b = self.b[:, None] if isinstance(self.b, Tensor) and isinstance(self.a, Tensor) else self.b
        return b * self.a

    def mass(self) -> Tensor:
        return self.x * self.x if self.squared else self.x


def _value_and_slope(terms: list[_Term], mu: float) -> tuple[float, float]:
    """``f(μ) = ½ Σ d m / (1 + μ d)²`` and ``f'(μ)`` (elementwise in the data's dtype, float64 sums)."""
    f = slope = 0.0
    for t in terms:
        d, m = t.d(), t.mass()
        s = 1.0 / (1.0 + mu * d)
        dms2 = d * m * s * s
        f += 0.5 * float(torch.sum(dms2, dtype=torch.float64))
        slope -= float(torch.sum(dms2 * d * s, dtype=torch.float64))
    return f, slope


def _solve_mu(terms: list[_Term], target: float) -> float:
    """The ``μ ≥ 0`` at which ``½ Σ d m / (1 + μ d)² = target`` (0 when it is already at most that)."""
    dtype = terms[0].x.dtype if terms else torch.float64
    ftol = 16 * torch.finfo(dtype).eps * target  # the sums' own rounding: stop there
    mu = 0.0
    value, slope = _value_and_slope(terms, mu)
    value -= target
    for _ in range(NEWTON_STEPS):
        if value <= ftol or slope >= 0:
            break
        step = -value / slope
        mu += step
        value, slope = _value_and_slope(terms, mu)
        value -= target
        if step <= NEWTON_TOL * max(mu, 1.0):
            break
    return mu


def drift(C: list[Tensor], d: list[Tensor]) -> float:
    """``½ Σ d C²`` over all matrices (float64 sums)."""
    return 0.5 * sum(float(torch.sum(dl * Cl * Cl, dtype=torch.float64)) for Cl, dl in zip(C, d))


def shrink_factor(C: list[Tensor], d: list[Tensor], eps: float) -> float:
    """The μ ≥ 0 at which ``½ Σ d C² / (1 + μ d)² = eps`` (0 when the budget already holds)."""
    if eps <= 0:
        raise BudgetError(f"--budget must be positive, got {eps}")
    return _solve_mu([_Term(dl, 1.0, Cl) for Cl, dl in zip(C, d)], eps)


def project_coordinates(C: list[Tensor], d: list[Tensor], eps: float) -> tuple[list[Tensor], float]:
    """The Euclidean projection of the coordinates ``C`` onto ``{½ Σ d C² ≤ eps}``, and μ."""
    mu = shrink_factor(C, d, eps)
    if mu == 0.0:
        return C, 0.0
    return [Cl / (1.0 + mu * dl.to(Cl.dtype)) for Cl, dl in zip(C, d)], mu


# ---------------------------------------------------------------------------------------------
# one matrix: its eigenbases, exact coordinates and the dominating form


def rank_total(d_out: int, d_in: int, fraction: float = TAIL_FRACTION) -> int:
    """``K_G + K_A`` (see ``tail_ranks``), from the shape alone."""
    return min(d_out + d_in, max(2, math.ceil(fraction * (d_out + d_in))))


def tail_ranks(alpha: Tensor, beta: Tensor, fraction: float = TAIL_FRACTION) -> tuple[int, int]:
    """``(K_G, K_A)``: the exact eigenvalues the dominating form keeps on each side. Their sum is
    ``ceil(fraction (d_out + d_in))`` (what its flops grow with); the split minimises the dominating form's
    trace ``tr Â · tr Ĝ = Σ d̂``, its looseness on an increment spread evenly over the coordinates."""
    n, o = alpha.numel(), beta.numel()
    total = rank_total(o, n, fraction)

    def flattened_traces(v: Tensor) -> Tensor:  # Σ v̂ for K = 0 … len(v): Σ_{i<K} v_i + (len − K) v_K
        v = v.detach().to("cpu", torch.float64)
        head = torch.cat([torch.zeros(1, dtype=v.dtype), torch.cumsum(v, 0)])
        tail = torch.cat([v, torch.zeros(1, dtype=v.dtype)]) * torch.arange(v.numel(), -1, -1, dtype=v.dtype)
        return head + tail

    tA, tG = flattened_traces(alpha), flattened_traces(beta)
    K_G = torch.arange(max(1, total - n), min(o, total - 1) + 1)
    cost = tG[K_G] * tA[total - K_G]
    k = int(K_G[int(torch.argmin(cost))])
    return k, total - k


@dataclass
class _Lin:
    """The dominating form's linear view of a matrix ``X`` (linear orientation): ``R = V_Gᵀ X``,
    ``S = X V_A`` and the corner ``V_Gᵀ X V_A``."""

    R: Tensor
    S: Tensor
    corner: Tensor

    def minus(self, mu: float, other: "_Lin") -> "_Lin":
        return _Lin(self.R - mu * other.R, self.S - mu * other.S, self.corner - mu * other.corner)


def _dot(x: Tensor, y: Tensor, dim=None) -> Tensor:
    return torch.sum(x * y, dim=dim, dtype=torch.float64)


class _Matrix:
    """One edited matrix: eigenbases of its capability factors (linear orientation), its base weight
    (stored orientation) and the dominating form's ranks."""

    def __init__(self, U_A: Tensor, alpha: Tensor, U_G: Tensor, beta: Tensor, base: Tensor, conv: bool,
                 fraction: float):
        self.U_A, self.U_G, self.base, self.conv = U_A, U_G, base, conv
        self.dtype = U_A.dtype
        self.alpha = alpha.to(U_A.device, self.dtype)
        self.beta = beta.to(U_G.device, self.dtype)
        self.d_out, self.d_in = U_G.shape[0], U_A.shape[0]
        self.K_G, self.K_A = tail_ranks(self.alpha, self.beta, fraction)
        self.V_A, self.V_G = U_A[:, : self.K_A], U_G[:, : self.K_G]
        self.alpha_top, self.beta_top = self.alpha[: self.K_A], self.beta[: self.K_G]
        # the flattened tails (0 where a side has no tail: that block is empty)
        self.alpha_tail = float(self.alpha[self.K_A]) if self.K_A < self.d_in else 0.0
        self.beta_tail = float(self.beta[self.K_G]) if self.K_G < self.d_out else 0.0
        f64 = torch.float64
        # d̂ per unit of the four blocks, flattened: corner coordinates, rows, columns, the tail
        self.dhat = torch.cat([torch.outer(self.beta_top, self.alpha_top).to(f64).flatten(),
                               self.beta_top.to(f64) * self.alpha_tail, self.beta_tail * self.alpha_top.to(f64),
                               torch.tensor([self.beta_tail * self.alpha_tail], dtype=f64, device=U_A.device)])

    def d(self) -> Tensor:
        return torch.outer(self.beta, self.alpha)

    def dhat_full(self) -> Tensor:
        """``d̂`` on every coordinate (``d_out × d_in``): the flattened tails."""
        a, b = self.alpha.clone(), self.beta.clone()
        a[self.K_A:], b[self.K_G:] = self.alpha_tail, self.beta_tail
        return torch.outer(b, a)

    def linear(self, X: Tensor) -> Tensor:
        return X.T if self.conv else X

    def difference(self, w: Tensor, ref: Tensor) -> Tensor:
        """``w − ref`` in linear orientation, in the eigenvectors' dtype (subtracted in the wider dtype)."""
        dt = torch.promote_types(torch.promote_types(w.dtype, ref.dtype), self.dtype)
        return self.linear((w.detach().to(dt) - ref.to(w.device, dt)).to(self.dtype))

    def write(self, master: Tensor, ref: Tensor, Y: Tensor) -> None:
        """``master := ref + Y`` (``Y`` in linear orientation)."""
        dt = torch.promote_types(master.dtype, ref.dtype)
        master.copy_(ref.to(master.device, dt) + self.linear(Y).to(dt))

    # exact ------------------------------------------------------------------------------------

    def coordinates(self, Z: Tensor) -> Tensor:
        return self.U_G.T @ Z @ self.U_A

    def back(self, C: Tensor) -> Tensor:
        return self.U_G @ C @ self.U_A.T

    # the dominating form ----------------------------------------------------------------------

    def lin(self, X: Tensor) -> _Lin:
        S = X @ self.V_A
        return _Lin(self.V_G.T @ X, S, self.V_G.T @ S)

    def units(self, x: _Lin, y: _Lin, xy: Tensor) -> Tensor:
        """``Σ C_x C_y`` per unit of the four blocks (float64, flattened as ``dhat``), from the linear
        views and ``xy = ⟨X, Y⟩``."""
        corner = (x.corner.to(torch.float64) * y.corner.to(torch.float64))
        cr, cc = corner.sum(1), corner.sum(0)
        rows, cols = _dot(x.R, y.R, 1), _dot(x.S, y.S, 0)
        tail = xy - rows.sum() - cols.sum() + cr.sum()
        return torch.cat([corner.flatten(), rows - cr, cols - cc, tail.reshape(1)])

    def _factors(self, mu: float) -> tuple[float, Tensor, Tensor, Tensor]:
        """``F = 1 / (1 + μ d̂)`` by block: ``c`` (tail), ``f_G − c`` (rows), ``f_A − c`` (columns) and
        ``M = F_corner − c − (f_G − c) 1ᵀ − 1 (f_A − c)ᵀ``."""
        c = 1.0 / (1.0 + mu * self.beta_tail * self.alpha_tail)
        gG = 1.0 / (1.0 + mu * self.beta_top * self.alpha_tail) - c
        gA = 1.0 / (1.0 + mu * self.beta_tail * self.alpha_top) - c
        M = 1.0 / (1.0 + mu * torch.outer(self.beta_top, self.alpha_top)) - c - gG[:, None] - gA[None, :]
        return c, gG, gA, M

    def cut(self, X: Tensor, x: _Lin, mu: float) -> Tensor:
        """``U_G (F ⊙ C) U_Aᵀ`` with ``F = 1 / (1 + μ d̂)`` (module docstring), without a rotation."""
        c, gG, gA, M = self._factors(mu)
        out = c * X
        out += self.V_G @ (gG[:, None] * x.R)
        out += (x.S * gA[None, :] + self.V_G @ (M * x.corner)) @ self.V_A.T
        return out

    def cut_lin(self, x: _Lin, mu: float) -> _Lin:
        """The linear views of ``cut(X, x, μ)`` from those of ``X`` (small products only)."""
        c, gG, gA, M = self._factors(mu)
        inner = M * x.corner
        R = (gG + c)[:, None] * x.R + (x.corner * gA[None, :] + inner) @ self.V_A.T
        S = x.S * (gA + c)[None, :] + self.V_G @ (gG[:, None] * x.corner + inner)
        return _Lin(R, S, x.corner * (M + c + gG[:, None] + gA[None, :]))


class _Model:
    """The bound ``q(Z₀ + Y) ≤ q₀ + ⟨H₀, Y⟩ + q̂(Y)`` over all matrices, as a function of the cut's μ:
    ``Y(μ) = F_μ (Y − μ H₀)`` (the Euclidean projection onto the set where the bound is at most a
    target), from per-unit sums ``Σ C_Y²``, ``Σ C_H C_Y`` and ``Σ C_H²`` (float64, a few thousand)."""

    def __init__(self, q0: float, dhat: Tensor, yy: Tensor, hy: Tensor, hh: Tensor):
        self.q0, self.dhat, self.yy, self.hy, self.hh = q0, dhat, yy.clamp(min=0), hy, hh.clamp(min=0)

    def value(self, mu: float) -> float:
        f = 1.0 / (1.0 + mu * self.dhat)
        xx = (self.yy - 2 * mu * self.hy + mu * mu * self.hh).clamp(min=0)
        hx = self.hy - mu * self.hh
        return self.q0 + float((f * hx).sum() + 0.5 * (self.dhat * f * f * xx).sum())

    def after(self, mu: float) -> "_Model":
        """The bound of the cut increment ``Y(μ)`` as a function of a further cut's μ."""
        f = 1.0 / (1.0 + mu * self.dhat)
        xx = (self.yy - 2 * mu * self.hy + mu * mu * self.hh).clamp(min=0)
        return _Model(self.q0, self.dhat, f * f * xx, f * (self.hy - mu * self.hh), self.hh)

    def floor(self) -> float:
        """The bound's least value over all increments: ``q₀ − ½ Σ C_H² / d̂`` (at ``μ → ∞``)."""
        inside = self.dhat > 0
        return self.q0 - 0.5 * float((self.hh[inside] / self.dhat[inside]).sum()) if bool(inside.any()) else self.q0

    def solve(self, target: float) -> float:
        """The smallest μ ≥ 0 with ``value(μ) ≤ target`` (bisection on a decreasing function)."""
        if self.value(0.0) <= target:
            return 0.0
        top = float(self.dhat.max())
        hi = 1.0 / top if top > 0 else 1.0
        for _ in range(200):
            if self.value(hi) <= target:
                break
            hi *= 4
        lo = 0.0
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo + hi)
            if self.value(mid) <= target:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        return hi


# ---------------------------------------------------------------------------------------------
# the budgets


class _Budget:
    def __init__(self, eps: float, bases: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]],
                 base_weights: dict[str, Tensor], conv: dict[str, bool], tail_fraction: float = TAIL_FRACTION):
        if not eps > 0:
            raise BudgetError(f"--budget must be positive, got {eps}")
        self.eps = eps  # a session may raise it between chunks
        self.base_weights = base_weights
        self.conv = conv
        self.mats = {n: _Matrix(U_A, alpha, U_G, beta, base_weights[n], conv[n], tail_fraction)
                     for n, (U_A, alpha, U_G, beta) in bases.items()}
        self.projections = 0  # steps at which the budget changed the weights
        self.last_mu = 0.0  # μ of the last step's change (0: the last step changed nothing)

    @property
    def limit(self) -> float:
        """What every certificate is held to: ``eps (1 − MARGIN)``."""
        return self.eps * (1 - MARGIN)

    def coordinates(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """``C = U_Gᵀ (W − W0) U_A`` per matrix, in the eigenvectors' dtype."""
        with torch.no_grad(), full_precision():
            return {n: self.mats[n].coordinates(self.mats[n].difference(w, self.base_weights[n]))
                    for n, w in weights.items()}

    def predicted(self, weights: dict[str, Tensor]) -> float:
        """The predicted drift ``q(W − W0)`` of the given weights (exact: every coordinate)."""
        C = self.coordinates(weights)
        return drift(list(C.values()), [self.mats[n].d() for n in C])

    def begin(self) -> None:
        """A new run of steps (a chunk) starts."""


class ExactBudget(_Budget):
    """The reference: the exact Euclidean projection onto ``{q ≤ eps}`` of the masters' update at every
    step (two rotations per matrix and step; the masters, not the rounded weights)."""

    @torch.no_grad()
    def __call__(self, masters: dict[str, Tensor], weights: dict[str, Tensor] | None = None) -> None:
        C = self.coordinates(masters)
        names = list(C)
        d = [self.mats[n].d() for n in names]
        self.last_mu = 0.0
        if drift([C[n] for n in names], d) <= self.eps:
            return
        projected, self.last_mu = project_coordinates([C[n] for n in names], d, self.limit)
        self.projections += 1
        with full_precision():
            for n, Cn in zip(names, projected):
                m = self.mats[n]
                m.write(masters[n], self.base_weights[n], m.back(Cn))


class CapabilityBudget(_Budget):
    """``eps`` nats per token of predicted capability drift of the saved weights, over the whole history
    since the base (module docstring).

    ``bases[name] = (U_A, alpha, U_G, beta)`` are the eigenbases of the capability factors at the base
    (linear orientation: W is d_out × d_in); ``base_weights[name]`` the base matrices in the stored
    orientation and dtype (``conv[name]``: GPT-2's Conv1D stores Wᵀ); the saved weights are the masters
    rounded to that dtype. ``__call__(masters, weights)`` changes the masters in place when the budget
    needs it; ``weights`` are the model's weights before the step (certified at the step before).
    ``counts`` says what it did: steps, exact steps, exact projections, cuts, retries and fallbacks.
    """

    def __init__(self, eps: float, bases: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]],
                 base_weights: dict[str, Tensor], conv: dict[str, bool], tail_fraction: float = TAIL_FRACTION,
                 exact_every: int = EXACT_EVERY, headroom: float = HEADROOM):
        super().__init__(eps, bases, base_weights, conv, tail_fraction)
        if exact_every < 1:
            raise BudgetError(f"exact_every must be at least 1, got {exact_every}")
        self.exact_every, self.headroom = exact_every, headroom
        self.counts = {"steps": 0, "exact": 0, "exact_projections": 0, "cuts": 0, "retries": 0, "fallbacks": 0}
        self.begin()

    def begin(self) -> None:
        """Anchor at the base (``q₀ = 0``, ``H₀ = 0``), an exact step allowed at once. Called at the start of
        every chunk, so that a chunk's steps depend on its starting weights alone (a resumed ledger
        continues bit for bit)."""
        self.anchor: dict[str, Tensor] | None = None  # the saved weights (or masters) at the last exact step
        self.q0 = 0.0  # q(anchor − base)
        self.H: dict[str, Tensor] | None = None  # H₀ = G (anchor − base) A, linear orientation
        self.H_lin: dict[str, _Lin] = {}
        self.hh: dict[str, Tensor] = {}
        self.since_exact = self.exact_every
        self.rounding = 0.0  # what rounding to the weights' dtype added to the bound at the last cuts

    # -- helpers --------------------------------------------------------------------------------

    def _ref(self, n: str) -> Tensor:
        return self.anchor[n] if self.anchor is not None else self.base_weights[n]

    def _saved(self, n: str, master: Tensor) -> Tensor:
        """What the model's weight will be: the master rounded to the weight's dtype (as ``copy_`` rounds)."""
        dt = self.base_weights[n].dtype
        return master if master.dtype == dt else master.detach().to(dt)

    def _rounds(self, masters: dict[str, Tensor]) -> bool:
        return any(w.dtype != self.base_weights[n].dtype for n, w in masters.items())

    def _increment(self, n: str, master: Tensor) -> Tensor:
        """The saved weights' increment since the anchor (linear orientation, eigenvectors' dtype)."""
        return self.mats[n].difference(self._saved(n, master), self._ref(n))

    def _model(self, masters: dict[str, Tensor], zero: bool = False) -> tuple[_Model, dict[str, _Lin]]:
        """The bound of the saved weights as a function of the cut's μ, and the increments' linear views
        (one matrix's increment at a time; ``zero``: the saved weights are the anchor)."""
        lins, yy, hy, hh = {}, [], [], []
        for n, w in masters.items():
            m = self.mats[n]
            if zero:
                f = m.V_A.new_zeros
                lins[n] = lin = _Lin(f(m.K_G, m.d_in), f(m.d_out, m.K_A), f(m.K_G, m.K_A))
                yy.append(torch.zeros_like(m.dhat))
                hy.append(torch.zeros_like(m.dhat))
            else:
                y = self._increment(n, w)
                lins[n] = lin = m.lin(y)
                yy.append(m.units(lin, lin, _dot(y, y)))
                hy.append(torch.zeros_like(m.dhat) if self.H is None
                          else m.units(self.H_lin[n], lin, _dot(self.H[n], y)))
                del y
            hh.append(torch.zeros_like(m.dhat) if self.H is None else self.hh[n])
        dhat = torch.cat([self.mats[n].dhat for n in masters])
        return _Model(self.q0, dhat, torch.cat(yy), torch.cat(hy), torch.cat(hh)), lins

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, masters: dict[str, Tensor], weights: dict[str, Tensor] | None = None) -> None:
        with full_precision():
            self._step(masters, weights)

    def _step(self, masters: dict[str, Tensor], weights: dict[str, Tensor] | None) -> None:
        self.counts["steps"] += 1
        self.since_exact += 1
        self.last_mu = 0.0
        model, lins = self._model(masters)
        if model.value(0.0) <= self.limit:
            return  # certified: nothing changes
        # an exact step when one is due, or when no cut could reach the limit from this anchor (its limit fell)
        if self.since_exact >= self.exact_every or model.floor() > self.limit * (1 - MARGIN):
            projected = self._exact(masters)
            # the saved weights are the anchor, or (after an exact projection) its rounding
            model, lins = self._model(masters, zero=not (projected and self._rounds(masters)))
            if model.value(0.0) <= self.limit:
                self.projections += projected
                return
            if projected:  # its rounding ate the headroom (not seen in practice): the weights before the step
                self.projections += 1
                self._fallback(masters, weights)
                return
        self.projections += 1
        self._cut(masters, weights, model, lins)

    def _cut(self, masters: dict[str, Tensor], weights: dict[str, Tensor] | None, model: _Model,
             lins: dict[str, _Lin]) -> None:
        """Project the saved weights' increment since the anchor onto ``{q₀ + ⟨H₀, Y⟩ + q̂(Y) ≤ target}`` and
        make it the masters'. Rounded weights aim lower by the rounding seen at the last cuts, are checked,
        cut again ``RETRY_AIM`` times the rounding below the limit when over, and fall back to the weights
        before the step after ``SAVED_TRIES``."""
        self.counts["cuts"] += 1
        rounds = self._rounds(masters)
        target = self.limit - (ROUNDING_AIM * self.rounding if rounds else 0.0)
        saved, over = True, math.inf  # the first cut starts from the saved weights' increment, a retry from the
        # masters'
        for attempt in range(SAVED_TRIES if rounds else 1):
            if attempt:
                self.counts["retries"] += 1
            if target <= model.floor():
                break
            mu = model.solve(target)
            self.last_mu = max(self.last_mu, mu)
            inputs = {}
            for n, w in masters.items():
                m, lin = self.mats[n], lins[n]
                y = self._increment(n, w) if saved else m.difference(w, self._ref(n))
                if self.H is not None:
                    y, lin = y.sub_(self.H[n], alpha=mu), lin.minus(mu, self.H_lin[n])
                m.write(w, self._ref(n), m.cut(y, lin, mu))
                inputs[n] = lin
                del y
            if not rounds:
                return  # float32/64 weights are the masters: the cut's bound is theirs (MARGIN: the write's rounding)
            over = self._model(masters)[0].value(0.0) - self.limit  # the rounded weights
            effect = over + self.limit - target  # what the rounding added to the bound
            self.rounding = effect if effect > self.rounding else 0.8 * self.rounding + 0.2 * max(effect, 0.0)
            if over <= 0 or attempt + 1 == SAVED_TRIES:
                break
            # again from the masters' cut increment (its bound and views without a large product): a cut of the
            # rounded weights would mostly round back to them
            model, saved = model.after(mu), False
            lins = {n: self.mats[n].cut_lin(lin, mu) for n, lin in inputs.items()}
            target = min(target - over, self.limit - RETRY_AIM * self.rounding)
        if rounds and over <= 0:
            return
        self._fallback(masters, weights)

    def _fallback(self, masters: dict[str, Tensor], weights: dict[str, Tensor] | None) -> None:
        """The rounded weights could not be certified: the masters become the weights before the step
        (certified then). Float weights never get here (a float cut reaches its target: ``_exact`` sees to
        it)."""
        if weights is None or not self._rounds(masters):
            raise RuntimeError("the capability budget could not certify the weights")
        self.counts["fallbacks"] += 1
        for n, w in masters.items():
            w.copy_(weights[n].to(w.device, w.dtype))

    def _exact(self, masters: dict[str, Tensor]) -> bool:
        """Exact coordinates ``C`` of the saved weights' update. When ``q > limit`` and the dominating form
        could not bring it back (its least value, ``½ Σ d C² (1 − d / d̂)``, is over the limit), project
        exactly onto ``q ≤ (1 − headroom) limit``. The result is the anchor, with ``q₀`` and
        ``H₀ = G Z₀ A`` (rotations in and back, and a second back when projecting). Returns whether it
        projected."""
        self.counts["exact"] += 1
        self.since_exact = 0
        names = list(masters)
        mats = [self.mats[n] for n in names]
        C, q, floor = [], 0.0, 0.0
        for n, m in zip(names, mats):  # the saved weights' coordinates: the anchor is on their grid
            C.append(m.coordinates(m.difference(self._saved(n, masters[n]), m.base)))
            dC2 = m.d().mul_(C[-1]).mul_(C[-1])
            q += 0.5 * float(torch.sum(dC2, dtype=torch.float64))
            dhat = m.dhat_full()
            slack = (dhat - m.d()).div_(dhat.clamp_(min=torch.finfo(m.dtype).tiny))  # 1 − d / d̂
            floor += 0.5 * float(torch.sum(dC2.mul_(slack), dtype=torch.float64))
            del dC2, dhat, slack
        projected = q > self.limit and floor > self.limit * (1 - MARGIN)
        if projected:
            self.counts["exact_projections"] += 1
            mu = _solve_mu([_Term(m.beta, m.alpha, c) for m, c in zip(mats, C)], self.limit * (1 - self.headroom))
            self.last_mu = max(self.last_mu, mu)
            for i, (n, m) in enumerate(zip(names, mats)):
                C[i].div_(m.d().mul_(mu).add_(1.0))
                m.write(masters[n], m.base, m.back(C[i]))
        self.anchor = {n: (masters[n] if projected else self._saved(n, masters[n])).detach().clone() for n in names}
        self.H, self.H_lin, self.hh, self.q0 = {}, {}, {}, 0.0
        for i, (n, m) in enumerate(zip(names, mats)):
            H = self.H[n] = m.back(C[i].mul_(m.d()))  # d ⊙ C: the coordinates of H₀
            C[i] = None
            self.q0 += 0.5 * float(_dot(H, m.difference(self.anchor[n], m.base)))  # q₀ = ½ ⟨H₀, Z₀⟩
            self.H_lin[n] = lin = m.lin(H)
            self.hh[n] = m.units(lin, lin, _dot(H, H))
        return projected


# ---------------------------------------------------------------------------------------------
# counting (crispedit plan)


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _split(d_out: int, d_in: int, fraction: float) -> tuple[int, int]:
    """The ``(K_G, K_A)`` of ``rank_total`` whose corner costs most (the split depends on the spectra)."""
    total = rank_total(d_out, d_in, fraction)
    K_G = min(d_out, max(total - d_in, total // 2, 1))
    return K_G, total - K_G


def budget_flops(d_out: int, d_in: int, rounds: bool, fraction: float = TAIL_FRACTION,
                 exact_every: int = EXACT_EVERY) -> dict[str, int]:
    """Matmul flops (2 per multiply-add) of ``CapabilityBudget`` for one ``d_out × d_in`` matrix, counted
    from what the code multiplies (``rounds``: a bf16/fp16 model, whose rounded weights are checked).

    ``evaluate``: the certificate's linear views of an increment (``Y V_A``, ``V_Gᵀ Y``, the corner);
    ``cut``: its projection back (``cut_views``: the cut's views, where a retry starts); ``rotation``:
    ``U_Gᵀ Z U_A`` or back (``R``); ``exact``: a step with an exact step at its worst, its certificate
    included (in, ``H₀`` back, ``H₀``'s views and a cut; or, projecting, in, both back, the views and with
    rounding a check). Per step: ``certified`` (the certificate holds: one evaluation), ``step`` (a step
    that cuts, ``SAVED_TRIES`` times with its checks) and ``worst`` (the mean over any ``exact_every``
    steps at most: every step cuts and one is exact). Elementwise work (bisection on μ, the block sums,
    the rounding) is left out: a few passes over the matrix, no matmul.
    """
    o, n = d_out, d_in
    K_G, K_A = _split(o, n, fraction)
    evaluate = _mm(o, n, K_A) + _mm(K_G, o, n) + _mm(K_G, o, K_A)
    cut = _mm(o, K_G, n) + _mm(o, K_G, K_A) + _mm(o, K_A, n)
    cut_views = _mm(K_G, K_A, n) + _mm(o, K_G, K_A)  # a retry's start, with rounded weights
    rotation = _mm(o, o, n) + _mm(o, n, n)
    # a step that cuts: the certificate, then per try the cut and (rounding) its check, the views of a retry
    step = evaluate + (SAVED_TRIES * (cut + evaluate) + (SAVED_TRIES - 1) * cut_views if rounds else cut)
    # a step with an exact step: in, H₀ back, H₀'s views, then a cut; or, projecting, a second back and (rounding)
    # a check, never a cut
    exact = max(2 * rotation + evaluate + step, evaluate + 3 * rotation + evaluate + (evaluate if rounds else 0))
    return {"K_G": K_G, "K_A": K_A, "evaluate": evaluate, "cut": cut, "cut_views": cut_views, "rotation": rotation,
            "exact": exact,
            "exact_every": exact_every, "step": step, "certified": evaluate,
            "worst": -(-((exact_every - 1) * step + exact) // exact_every)}


def budget_memory(shapes: list[tuple[int, int]], weight_bytes: int, master_bytes: int, vector_bytes: int,
                  fraction: float = TAIL_FRACTION) -> dict[str, int]:
    """Bytes of ``CapabilityBudget``: ``kept`` between steps (the anchor, in the masters' dtype at worst;
    ``H₀`` and its linear views, in the eigenvectors' dtype) and the transient peaks of an exact step
    (every matrix's coordinates at once, for the shared μ, and one matrix's difference, rotation product,
    ``d``, ``d̂`` and ``d C²``) and of a cut (every matrix's linear views; one matrix's rounded weights, its
    increment and three products)."""
    W = sum(o * i for o, i in shapes)
    biggest = max(o * i for o, i in shapes)
    views = 0
    for o, i in shapes:
        K_G, K_A = _split(o, i, fraction)
        views += (K_G * i + o * K_A + K_G * K_A) * vector_bytes
    return {"anchor": W * master_bytes, "H": W * vector_bytes, "views": views,
            "exact_step": W * vector_bytes + 5 * biggest * vector_bytes,
            "cut_step": views + biggest * (weight_bytes + 4 * vector_bytes)}

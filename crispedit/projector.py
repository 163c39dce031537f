"""The matrix-free Kronecker-eigenbasis projector (SPEC §1.5).

For one edited matrix ``W`` (``d_out × d_in``, the orientation of ``nn.Linear``) the capability
curvature is approximated by ``A ⊗ G`` (column-major ``vec``). With ``A = U_A diag(alpha) U_Aᵀ``
and ``G = U_G diag(beta) U_Gᵀ`` the eigenvalues of ``A ⊗ G`` are the products ``alpha_i beta_j``
with eigenvectors ``u^A_i ⊗ u^G_j``. In that basis a matrix ``X`` has coordinates
``C = U_Gᵀ X U_A`` and ``C[j, i]`` belongs to the product ``alpha_i beta_j``.

Energy rule (joint over products): sort the ``n = d_in d_out`` products descending,
``s_1 ≥ … ≥ s_n``, ``S_k = Σ_{m≤k} s_m`` in float64, ``k* = min{k ≥ 0 : S_k ≥ gamma S_n}``.
``k* = 0`` keeps everything (plain fine-tuning); otherwise ``tau = s_{k*}`` and ``C[j, i]`` is kept
iff ``alpha_i beta_j < tau`` (ties with ``tau`` are removed too).

Projection: ``P(X) = U_G ((U_Gᵀ X U_A) ⊙ M) U_Aᵀ`` — four matmuls, never the dense
``(d_in d_out)²`` matrix. The K-FAC prediction of the capability drift of an update ``ΔW`` is
``½ tr(ΔWᵀ G ΔW A) = ½ Σ alpha_i beta_j C[j, i]²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# eigh runs in float64 up to this size (a float64 14336² problem needs ~1.6 GB and minutes on CPU).
EIGH_FLOAT64_MAX_DIM = 16384
# Negative eigenvalues of a covariance are rounding; anything below -NEGATIVE_TOL·λ_max is not.
NEGATIVE_TOL = 1e-4


class CurvatureError(ValueError):
    """Statistics that cannot define a projector (NaN/inf, not PSD, all zero, bad gamma)."""


@dataclass(frozen=True)
class Eigen:
    """Eigendecomposition ``M = vectors @ diag(values) @ vectors.T``, values descending, ≥ 0."""

    values: Tensor
    vectors: Tensor


def eigh_factor(M: Tensor, name: str = "factor", dtype: torch.dtype | None = None) -> Eigen:
    """Symmetrise, check and eigendecompose a K-FAC factor (``A`` or ``G``).

    Runs in float64 when the matrix has at most ``EIGH_FLOAT64_MAX_DIM`` rows (else float32) unless
    ``dtype`` is given; tiny negative eigenvalues (rounding) are clamped to zero; NaN/inf, a
    non-square matrix or a clearly indefinite one raise ``CurvatureError`` naming ``name``.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise CurvatureError(f"{name}: expected a square matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise CurvatureError(f"{name}: statistics contain NaN or inf; recompute the curvature")
    if dtype is None:
        dtype = torch.float64 if M.shape[0] <= EIGH_FLOAT64_MAX_DIM else torch.float32
    S = M.to(dtype)
    S = (S + S.T) / 2
    values, vectors = torch.linalg.eigh(S)  # ascending
    values, vectors = values.flip(0), vectors.flip(1).contiguous()
    top = values[0].clamp(min=0)
    if values[-1] < -NEGATIVE_TOL * top:
        raise CurvatureError(
            f"{name}: eigenvalue {values[-1].item():.3e} is far below zero (largest {top.item():.3e});"
            " a covariance must be positive semi-definite"
        )
    return Eigen(values.clamp(min=0), vectors)


@dataclass(frozen=True)
class Threshold:
    """The outcome of the energy rule for one matrix."""

    gamma: float
    k_star: int  # smallest k with S_k ≥ gamma·S_n (0: keep everything)
    tau: float  # products ≥ tau are removed (inf when nothing is removed)
    removed: int  # number of removed coordinates (≥ k_star because of ties)
    removed_share: float  # removed share of the curvature energy Σ alpha_i beta_j
    total: int  # d_in · d_out


def energy_threshold(alpha: Tensor, beta: Tensor, gamma: float) -> Threshold:
    """Apply the energy rule of SPEC §1.5 to the products ``alpha_i · beta_j`` (float64)."""
    if not 0.0 <= gamma < 1.0:
        raise CurvatureError(f"gamma must lie in [0, 1), got {gamma}")
    products = torch.outer(beta.to(torch.float64), alpha.to(torch.float64)).flatten()
    s = torch.sort(products, descending=True).values
    S = torch.cumsum(s, 0)
    S_n = S[-1].item()
    if not S_n > 0:
        raise CurvatureError(
            "the curvature statistics are all zero (empty corpus or a dead layer): no projector"
        )
    target = gamma * S_n
    # k* = min{k ≥ 0 : S_k ≥ target}, with S_0 = 0.
    k_star = 0 if target <= 0 else int(torch.searchsorted(S, torch.tensor([target], dtype=S.dtype))) + 1
    if k_star == 0:
        return Threshold(gamma, 0, float("inf"), 0, 0.0, s.numel())
    tau = s[k_star - 1].item()
    removed = products >= tau
    share = products[removed].sum().item() / S_n
    return Threshold(gamma, k_star, tau, int(removed.sum()), share, s.numel())


def kept_mask(alpha: Tensor, beta: Tensor, tau: float) -> Tensor:
    """``M[j, i] = alpha_i beta_j < tau`` (``d_out × d_in``, bool)."""
    return torch.outer(beta.to(torch.float64), alpha.to(torch.float64)) < tau


def project(X: Tensor, U_A: Tensor, U_G: Tensor | None, mask: Tensor) -> Tensor:
    """``U_G ((U_Gᵀ X U_A) ⊙ M) U_Aᵀ`` in the dtype of ``U_A``; ``U_G=None`` means ``G = I``."""
    dtype = U_A.dtype
    C = X.to(dtype) @ U_A
    if U_G is not None:
        C = U_G.T @ C
    C = C * (mask if mask.dtype == dtype else mask.to(dtype))
    if U_G is not None:
        C = U_G @ C
    return (C @ U_A.T).to(X.dtype)


def quadratic_form(X: Tensor, A: Eigen, G: Eigen, mask: Tensor | None = None) -> float:
    """K-FAC predicted drift ``½ tr(Xᵀ G X A) = ½ Σ alpha_i beta_j C[j, i]²`` (``C = U_Gᵀ X U_A``).

    With ``mask`` only the coordinates where it is true count. In nats per token when ``A`` and
    ``G`` are divided by the labelled-token count.
    """
    dtype = A.vectors.dtype
    C = G.vectors.to(dtype).T @ X.to(dtype) @ A.vectors
    weights = torch.outer(G.values.to(dtype), A.values)
    if mask is not None:
        weights = weights * mask.to(dtype)
    return 0.5 * float((weights * C * C).sum())


@dataclass
class KroneckerProjector:
    """Projector onto the gamma-approximate null space of ``A ⊗ G`` for one matrix.

    ``A`` and ``G`` (the capability curvature) always define ``predicted_drift``; the mask comes
    from them too unless ``identity_G`` (AlphaEdit / Adam-NSCL style: ``G = I``, energy rule over
    ``alpha`` alone).
    """

    A: Eigen
    G: Eigen
    mask: Tensor  # d_out × d_in, bool, True = kept
    threshold: Threshold
    identity_G: bool = False
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_factors(
        cls,
        A: Tensor,
        G: Tensor,
        gamma: float,
        identity_G: bool = False,
        dtype: torch.dtype = torch.float32,
        name: str = "layer",
        eigh_dtype: torch.dtype | None = None,
    ) -> "KroneckerProjector":
        """Eigendecompose ``A`` (d_in × d_in) and ``G`` (d_out × d_out) and apply the energy rule."""
        eA = eigh_factor(A, f"{name}.A", eigh_dtype)
        eG = eigh_factor(G, f"{name}.G", eigh_dtype)
        return cls.from_eigen(eA, eG, gamma, identity_G, dtype)

    @classmethod
    def from_eigen(
        cls, A: Eigen, G: Eigen, gamma: float, identity_G: bool = False, dtype: torch.dtype = torch.float32
    ) -> "KroneckerProjector":
        beta = torch.ones_like(G.values) if identity_G else G.values
        t = energy_threshold(A.values, beta, gamma)
        mask = kept_mask(A.values, beta, t.tau)
        A_ = Eigen(A.values, A.vectors.to(dtype))
        G_ = Eigen(G.values, G.vectors.to(dtype))
        return cls(A_, G_, mask.to(A.vectors.device), t, identity_G, dtype)

    def __post_init__(self) -> None:
        self.is_identity = bool(self.mask.all())
        self._mask = self.mask.to(self.dtype)  # the mask as a factor, converted once

    def project(self, X: Tensor) -> Tensor:
        """Project ``X`` (shape ``d_out × d_in``); exactly ``X`` when nothing is removed."""
        if self.is_identity:
            return X
        return project(X, self.A.vectors, None if self.identity_G else self.G.vectors, self._mask)

    def predicted_drift(self, X: Tensor) -> float:
        """``½ tr(Xᵀ G X A)`` with the capability factors, over all coordinates."""
        return quadratic_form(X, self.A, self.G)

    def predicted_drift_outside(self, X: Tensor) -> float:
        """The drift of the part of ``X`` outside the kept subspace, ``½ q(X − P X)``.

        For the CrispEdit projector (same eigenbasis) this is ``½ Σ_{M=0} alpha_i beta_j C²`` and
        ``q(X) = q(P X) + q(X − P X)`` exactly.
        """
        if self.is_identity:
            return 0.0
        return self.predicted_drift(X - self.project(X))

    def summary(self) -> dict:
        """tau, removed count and removed share of curvature energy, for reports."""
        t = self.threshold
        return {
            "gamma": t.gamma,
            "tau": t.tau,
            "removed": t.removed,
            "total": t.total,
            "removed_share": t.removed_share,
            "identity_G": self.identity_G,
        }

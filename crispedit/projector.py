"""The matrix-free Kronecker-eigenbasis projector.

For one edited matrix ``W`` (``d_out × d_in``, the orientation of ``nn.Linear``) the capability
curvature is approximated by ``A ⊗ G`` (column-major ``vec``). With ``A = U_A diag(alpha) U_Aᵀ``
and ``G = U_G diag(beta) U_Gᵀ`` (both sorted descending) the eigenvalues of ``A ⊗ G`` are the
products ``alpha_i beta_j`` with eigenvectors ``u^A_i ⊗ u^G_j``. In that basis a matrix ``X`` has
coordinates ``C = U_Gᵀ X U_A`` and ``C[j, i]`` belongs to the product ``alpha_i beta_j``.

Energy rule (joint over products): sort the ``n = d_in d_out`` products descending,
``s_1 ≥ … ≥ s_n``, ``S_k = Σ_{m≤k} s_m`` in float64, ``k* = min{k ≥ 0 : S_k ≥ gamma S_n}``.
``k* = 0`` keeps everything (plain fine-tuning); otherwise ``tau = s_{k*}`` and ``C[j, i]`` is kept
iff ``alpha_i beta_j < tau`` (ties with ``tau`` are removed too).

The removed set is a staircase. Rounding is monotone, so ``alpha_i ≥ alpha_i'`` and
``beta_j ≥ beta_j'`` give ``fl(alpha_i beta_j) ≥ fl(alpha_i' beta_j')``: if ``(j, i)`` is removed so
is every ``(j', i')`` above and left of it. It is stored as ``c_i``, the number of removed rows of
column ``i`` (non-increasing); ``r_A = #{i : c_i > 0}`` and ``r_G = c_0`` span its corner and
``lambda_j = #{i : c_i > j}`` is the length of row ``j``. With ``V_A = U_A[:, :r_A]``,
``V_G = U_G[:, :r_G]`` and ``R`` the removed indicator inside the corner,

    P(X) = U_G ((U_Gᵀ X U_A) ⊙ M) U_Aᵀ                      ("dense": four full rotations)
         = X − V_G ((V_Gᵀ X V_A) ⊙ R) V_Aᵀ                  ("corner": exact, cost ∝ removed ranks)

and the corner splits at any row ``p`` into the rows ``< p`` (all inside columns ``< r_A``) and
the rows ``p … r_G−1`` (inside columns ``< q = lambda_p``):

    V_G ((V_Gᵀ X V_A) ⊙ R) V_Aᵀ = V_G[:, :p] ((V_G[:, :p]ᵀ X) V_A ⊙ R₁) V_Aᵀ
                                 + V_G[:, p:] (V_G[:, p:]ᵀ (X V_A[:, :q]) ⊙ R₂) V_A[:, :q]ᵀ

so the products with ``X`` have ``p + lambda_p`` columns, not ``min(r_G, r_A)``; the best ``p``
gives the fewest lines covering the staircase. ``p = 0`` and ``p = r_G`` are the corner formula
in its two association orders. A mini-batch gradient is ``X = gᵀ a`` (``g``: ``T × d_out``
output gradients, ``a``: ``T × d_in`` inputs), and then the corner coordinates are
``(g V_G)ᵀ (a V_A)`` without touching ``X`` ("factors"). Every form is chosen per matrix by its
counted flops (``projection_flops``); all are the same projector, tested against the dense one.

The K-FAC prediction of the capability drift of an update ``ΔW`` is
``½ tr(ΔWᵀ G ΔW A) = ½ Σ alpha_i beta_j C[j, i]²``.

Precision: the rotation matmuls (those with eigenvectors) run in ``float32`` (TF32 disabled),
``tf32`` or ``bfloat16`` inputs with float32 accumulation and output; eigenvectors stay in the
projector's dtype. On a CPU, which has neither, ``tf32``/``bfloat16`` are emulated by rounding the
inputs of each rotation matmul (round to nearest even) and multiplying in float32: the same
rounding as a GPU's tensor cores up to summation order, at no gain in speed. The forms round
differently: the corner and factor forms subtract a rounded removed part from the exact ``X``, so
what leaks into the removed coordinates scales with the removed part; the dense form rounds the
whole result, so its leak scales with the kept part (``benchmarks/bench_projection.py`` measures
both on real statistics).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .options import PROJECTION_DTYPES  # auto: tf32 on a GPU, float32 elsewhere
from .running import full_precision

# eigh runs in float64 up to this size (a float64 14336² problem needs ~1.6 GB and minutes on CPU).
EIGH_FLOAT64_MAX_DIM = 16384
# Negative eigenvalues of a covariance are rounding; anything below -NEGATIVE_TOL·λ_max is not.
NEGATIVE_TOL = 1e-4
# A float32 eigh is accepted when ‖M U − U Λ‖_F / ‖M‖_F and ‖UᵀU − I‖_F / √n are both at most
# EIGH_TOL_EPS · max(n, 100) · eps(dtype): the scale of LAPACK's backward-error bound. Measured on
# power-law covariances, float32, n = 256…2048: residual 0.05–0.08 · n · eps (it grows with n),
# orthogonality ~1e-6 (flat); a broken solver gives O(1e-3…1). A projector from vectors within the
# tolerance (2.3e-3 at n = 18944) is idempotent to that relative size, far below any leak that
# matters (Adam's step leaks 15–60% of its predicted drift on the testbed).
EIGH_TOL_EPS = 1.0
# Precision of the rotation matmuls (see the module docstring).
# Forms of the projection; "corner" is the staircase form with the best split row.
FORMS = ("dense", "corner", "factors", "factors_dense")
# Column chunk when counting the staircase (bounds the float64 scratch to 8·2^24 bytes).
_CHUNK = 1 << 24


class CurvatureError(ValueError):
    """Statistics that cannot define a projector (NaN/inf, not PSD, all zero, bad gamma)."""


@dataclass(frozen=True)
class Eigen:
    """Eigendecomposition ``M = vectors @ diag(values) @ vectors.T``, values descending, ≥ 0."""

    values: Tensor
    vectors: Tensor


# ---------------------------------------------------------------------------------------------
# eigendecomposition


def _eigh(S: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` with the values descending (a seam for tests)."""
    values, vectors = torch.linalg.eigh(S)  # ascending
    return values.flip(0), vectors.flip(1).contiguous()


def eigh_errors(M: Tensor, values: Tensor, vectors: Tensor) -> tuple[float, float]:
    """``(‖M U − U Λ‖_F / ‖M‖_F, ‖UᵀU − I‖_F / √n)`` in the dtype of ``vectors``, TF32 off."""
    with full_precision():
        M = M.to(vectors.dtype)
        scale = torch.linalg.norm(M).clamp(min=torch.finfo(M.dtype).tiny)
        residual = torch.linalg.norm(M @ vectors - vectors * values) / scale
        eye = torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
        orthogonality = torch.linalg.norm(vectors.T @ vectors - eye) / vectors.shape[1] ** 0.5
    return float(residual), float(orthogonality)


def eigh_tolerance(n: int, dtype: torch.dtype) -> float:
    """The largest residual and orthogonality error ``eigh_factor`` accepts below float64."""
    return EIGH_TOL_EPS * max(n, 100) * torch.finfo(dtype).eps


def eigh_factor(M: Tensor, name: str = "factor", dtype: torch.dtype | None = None) -> Eigen:
    """Symmetrise, check and eigendecompose a K-FAC factor (``A`` or ``G``).

    Runs in float64 when the matrix has at most ``EIGH_FLOAT64_MAX_DIM`` rows (else float32) unless
    ``dtype`` is given. A result below float64 is checked (``eigh_errors`` against
    ``eigh_tolerance``) and, when off, recomputed in float64 on the CPU with a warning. Tiny
    negative eigenvalues (rounding) are clamped to zero; NaN/inf, a
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
    with full_precision():
        values, vectors = _eigh(S)
    if dtype != torch.float64:
        residual, orthogonality = eigh_errors(S, values, vectors)
        tol = eigh_tolerance(S.shape[0], dtype)
        if not (residual <= tol and orthogonality <= tol):
            warnings.warn(
                f"{name}: {str(dtype).removeprefix('torch.')} eigh is off (residual {residual:.1e}, "
                f"orthogonality {orthogonality:.1e}; tolerance {tol:.1e}); recomputing in float64 on the CPU",
                RuntimeWarning, stacklevel=2)
            S64 = M.detach().to("cpu", torch.float64)
            values, vectors = _eigh((S64 + S64.T) / 2)
            values, vectors = values.to(M.device), vectors.to(M.device)
    top = values[0].clamp(min=0)
    if values[-1] < -NEGATIVE_TOL * top:
        raise CurvatureError(
            f"{name}: eigenvalue {values[-1].item():.3e} is far below zero (largest {top.item():.3e});"
            " a covariance must be positive semi-definite"
        )
    return Eigen(values.clamp(min=0), vectors)


# ---------------------------------------------------------------------------------------------
# the energy rule and the staircase


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
    """Apply the energy rule to the products ``alpha_i · beta_j`` (float64)."""
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


def removed_per_column(alpha: Tensor, beta: Tensor, tau: float) -> Tensor:
    """``c_i = #{j : alpha_i beta_j ≥ tau}`` (int64, length ``d_in``, on the CPU) for ``alpha``,
    ``beta`` descending: the staircase ``~kept_mask`` without building it (only its corner is
    visited, in column chunks)."""
    a = alpha.detach().to("cpu", torch.float64)
    b = beta.detach().to("cpu", torch.float64)
    counts = torch.zeros(a.numel(), dtype=torch.int64)
    if not tau < float("inf") or a.numel() == 0 or b.numel() == 0:
        return counts
    r_G = int((b * a[0] >= tau).sum())
    r_A = int((a * b[0] >= tau).sum())
    step = max(1, _CHUNK // max(r_G, 1))
    for lo in range(0, r_A, step):
        counts[lo : min(lo + step, r_A)] = (torch.outer(b[:r_G], a[lo : min(lo + step, r_A)]) >= tau).sum(0)
    return counts


def row_lengths(counts: Tensor) -> Tensor:
    """``lambda_j = #{i : c_i > j}`` for ``j = 0 … r_G`` (``lambda_{r_G} = 0``) from non-increasing
    ``counts``."""
    counts = counts.to("cpu", torch.int64)
    r_G = int(counts[0]) if counts.numel() else 0
    ascending = counts.flip(0).contiguous()
    return counts.numel() - torch.searchsorted(ascending, torch.arange(r_G + 1), right=True)


def staircase_mask(counts: Tensor, d_out: int, device=None) -> Tensor:
    """The kept mask ``M[j, i] = j ≥ c_i`` (``d_out × d_in``, bool)."""
    counts = counts.to(device)
    return torch.arange(d_out, device=counts.device)[:, None] >= counts[None, :]


# ---------------------------------------------------------------------------------------------
# precision of the rotation matmuls


def _round_tf32(x: Tensor) -> Tensor:
    """Round to TF32 (8-bit exponent, 10-bit mantissa), to nearest even, kept in x's dtype."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32).to(x.dtype)


@contextlib.contextmanager
def _tf32():
    cuda, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda
        torch.set_float32_matmul_precision(precision)


def rotation_matmul(a: Tensor, b: Tensor, precision: str = "float32") -> Tensor:
    """``a @ b`` for a product with eigenvectors, in ``precision`` (``PROJECTION_DTYPES``), result in
    ``a``'s dtype. Call inside ``full_precision()``: ``float32`` then means full float32. ``auto`` is
    ``tf32`` on a GPU (at γ 0.8 it leaks ~4e-5 of the update's curvature into the protected
    coordinates, against Adam's own ~0.2, and runs at TF32 rates) and ``float32`` on a CPU, where TF32
    exists only as an emulation."""
    if precision == "auto":
        precision = "tf32" if a.is_cuda else "float32"
    if precision == "float32":
        return a @ b
    if precision == "tf32":
        if a.is_cuda and a.dtype == torch.float32:
            with _tf32():
                return a @ b
        return _round_tf32(a) @ _round_tf32(b)
    if a.is_cuda:
        try:
            return torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32).to(a.dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            return (a.bfloat16() @ b.bfloat16()).to(a.dtype)  # bf16-rounded output where out_dtype is missing
    return a.to(torch.bfloat16).to(a.dtype) @ b.to(torch.bfloat16).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# flop counts: matmul flops, 2 per multiply-add (what torch.utils.flop_counter counts); the
# elementwise mask and subtraction (≤ 2·d_out·d_in) are left out. The executors below do exactly these.


def _mm(m, k, n):
    return 2 * m * k * n


def _split_flops(d_out: int, d_in: int, r_A: int, lam: Tensor, T: int | None) -> Tensor:
    """Flops of the corner form for every split row ``p = 0 … r_G`` (int64 tensor), without forming
    ``X``: coordinates from ``X`` (``T=None``) or from the factors, then the two back-rotation
    blocks in their cheaper order, the last product being the one ``X − L R``."""
    o, n = d_out, d_in
    r_G = lam.numel() - 1
    p = torch.arange(r_G + 1, dtype=torch.int64)
    q = lam.to(torch.int64)
    h = r_G - p
    if T is None:
        coords = _mm(p, o, n) + _mm(p, n, r_A) + _mm(o, n, q) + _mm(h, o, q)
    else:
        coords = _mm(T, o, r_G) + _mm(T, n, r_A) + _mm(p, T, r_A) + _mm(h, T, q)
    back1 = torch.minimum(_mm(p, r_A, n) + _mm(o, p, n), _mm(o, p, r_A) + _mm(o, r_A, n))
    back2 = torch.minimum(_mm(o, h, q) + _mm(o, q, n), _mm(h, q, n) + _mm(o, h, n))
    return coords + back1 + back2


def _flops_table(d_out: int, d_in: int, r_G: int, r_A: int, lam: Tensor, T: int | None,
                 identity_G: bool, X_given: bool) -> tuple[dict[str, int], dict[str, int]]:
    """``(flops per form, split row per staircase form)``; see ``projection_flops``."""
    o, n = d_out, d_in
    form_X = 0 if (T is None or X_given) else _mm(o, T, n)
    rotation = _mm(o, n, n) + (0 if identity_G else _mm(o, o, n))
    flops = {"dense": 2 * rotation + form_X}
    splits = {}
    if identity_G:
        flops["rectangle"] = flops["corner"] = _mm(o, n, r_A) + _mm(o, r_A, n) + form_X
        splits["corner"] = 0
    else:
        costs = _split_flops(o, n, r_A, lam, None)
        p = int(torch.argmin(costs))
        flops["rectangle"] = int(min(costs[0], costs[-1])) + form_X  # the unsplit corner, best order
        flops["corner"] = int(costs[p]) + form_X
        splits["corner"] = p
    if T is not None:
        if identity_G:
            flops["factors"] = _mm(T, n, r_A) + _mm(o, T, r_A) + _mm(o, r_A, n) + form_X
            flops["factors_dense"] = _mm(T, n, n) + _mm(o, T, n) + _mm(o, n, n)
            splits["factors"] = 0
        else:
            costs = _split_flops(o, n, r_A, lam, T)
            p = int(torch.argmin(costs))
            flops["factors"] = int(costs[p]) + form_X
            splits["factors"] = p
            flops["factors_dense"] = _mm(T, o, o) + _mm(T, n, n) + _mm(o, T, n) + rotation
    return flops, splits


def projection_flops(d_out: int, d_in: int, r_G: int, r_A: int, T: int | None = None, *,
                     counts: Sequence[int] | Tensor | None = None, identity_G: bool = False,
                     X_given: bool = True) -> dict[str, int]:
    """Counted matmul flops (2 per multiply-add) of one projection of a ``d_out × d_in`` gradient,
    per form.

    ``dense``: the four full rotations. ``rectangle``: ``X − V_G ((V_Gᵀ X V_A) ⊙ R) V_Aᵀ`` in its
    cheaper association order. ``corner``: the same split at its best row (needs the staircase,
    ``counts`` = removed rows per column; without it the removed set is taken to be the whole
    ``r_G × r_A`` rectangle, the worst case). With ``T`` (token positions of ``X = gᵀ a``):
    ``factors`` (corner coordinates from ``g`` and ``a``) and ``factors_dense`` (full rotation of
    the factors); when ``X_given`` is false every form that needs ``X`` also pays ``2 T d_out d_in``
    to form it, so the values always compare the same job. With ``identity_G`` (``G = I``) the
    removed set is ``r_A`` whole columns and no ``U_G`` rotation is done (``r_G = d_out``).
    """
    if counts is None:
        lam = torch.full((r_G + 1,), r_A, dtype=torch.int64)
        lam[-1] = 0
    else:
        counts = torch.as_tensor(counts, dtype=torch.int64)
        lam = row_lengths(counts)
        if lam.numel() - 1 != r_G or int(lam[0]) != r_A:
            raise ValueError(f"counts span a {lam.numel() - 1} × {int(lam[0])} corner, "
                             f"not r_G × r_A = {r_G} × {r_A}")
    return _flops_table(d_out, d_in, r_G, r_A, lam, T, identity_G, X_given)[0]


# ---------------------------------------------------------------------------------------------
# reference functions


def project(X: Tensor, U_A: Tensor, U_G: Tensor | None, mask: Tensor) -> Tensor:
    """``U_G ((U_Gᵀ X U_A) ⊙ M) U_Aᵀ`` in the dtype of ``U_A``; ``U_G=None`` means ``G = I``."""
    dtype = U_A.dtype
    with full_precision():
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
    with full_precision():
        C = G.vectors.to(dtype).T @ X.to(dtype) @ A.vectors
    weights = torch.outer(G.values.to(dtype), A.values.to(dtype))
    if mask is not None:
        weights = weights * mask.to(dtype)
    return 0.5 * float((weights * C * C).sum(dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# the projector


@dataclass
class KroneckerProjector:
    """Projector onto the gamma-approximate null space of ``A ⊗ G`` for one matrix.

    ``A`` and ``G`` (the capability curvature) always define ``predicted_drift``; the removed set
    comes from them too unless ``identity_G`` (AlphaEdit / Adam-NSCL style: ``G = I``, energy rule
    over ``alpha`` alone). State: the two eigenbases and ``counts`` (removed rows per column, the
    staircase); ``mask`` is built on demand. ``projection_dtype`` sets the precision of the
    rotation matmuls (``PROJECTION_DTYPES``).
    """

    A: Eigen
    G: Eigen
    threshold: Threshold
    counts: Tensor  # int64 [d_in], CPU: removed rows of each column (non-increasing)
    identity_G: bool = False
    dtype: torch.dtype = torch.float32
    projection_dtype: str = "float32"
    _plans: dict = field(default_factory=dict, init=False, repr=False)
    _counts_dev: Tensor | None = field(default=None, init=False, repr=False)

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
        projection_dtype: str = "float32",
    ) -> "KroneckerProjector":
        """Eigendecompose ``A`` (d_in × d_in) and ``G`` (d_out × d_out) and apply the energy rule."""
        eA = eigh_factor(A, f"{name}.A", eigh_dtype)
        eG = eigh_factor(G, f"{name}.G", eigh_dtype)
        return cls.from_eigen(eA, eG, gamma, identity_G, dtype, projection_dtype)

    @classmethod
    def from_eigen(
        cls, A: Eigen, G: Eigen, gamma: float, identity_G: bool = False, dtype: torch.dtype = torch.float32,
        projection_dtype: str = "float32",
    ) -> "KroneckerProjector":
        for key, e in (("A", A), ("G", G)):
            if e.values.numel() > 1 and bool((e.values[1:] > e.values[:-1]).any()):
                raise CurvatureError(f"{key}: eigenvalues must be sorted descending (as eigh_factor returns them)")
        beta = torch.ones_like(G.values) if identity_G else G.values
        t = energy_threshold(A.values, beta, gamma)
        counts = removed_per_column(A.values, beta, t.tau)
        A_ = Eigen(A.values, A.vectors.to(dtype))
        G_ = Eigen(G.values, G.vectors.to(dtype))
        return cls(A_, G_, t, counts, identity_G, dtype, projection_dtype)

    def __post_init__(self) -> None:
        if self.projection_dtype not in PROJECTION_DTYPES:
            raise CurvatureError(
                f"--projection-dtype must be one of {', '.join(PROJECTION_DTYPES)}, got {self.projection_dtype!r}")
        self.counts = self.counts.to("cpu", torch.int64)
        self.d_out, self.d_in = self.G.vectors.shape[0], self.A.vectors.shape[0]
        self.r_A = int((self.counts > 0).sum())
        self.r_G = int(self.counts[0]) if self.counts.numel() else 0
        self.is_identity = self.r_A == 0
        self._lam = row_lengths(self.counts)

    # -- the staircase ------------------------------------------------------------------------

    @property
    def mask(self) -> Tensor:
        """The kept mask (``d_out × d_in``, bool, True = kept), built on demand (reports, tests)."""
        return staircase_mask(self.counts, self.d_out, self.A.vectors.device)

    def _removed(self, rows: slice, cols: int) -> Tensor:
        """The removed indicator of ``rows`` × columns ``< cols`` of the corner (bool)."""
        dev = self.A.vectors.device
        if self._counts_dev is None or self._counts_dev.device != dev:
            self._counts_dev = self.counts.to(dev)
        j = torch.arange(rows.start, rows.stop, device=dev)
        return j[:, None] < self._counts_dev[:cols][None, :]

    def flops(self, T: int | None = None, X_given: bool = True) -> dict[str, int]:
        """``projection_flops`` of this projector (its own staircase)."""
        return self._plan(T, X_given)[0]

    def _plan(self, T: int | None, X_given: bool) -> tuple[dict[str, int], dict[str, int]]:
        key = (T, X_given)
        if key not in self._plans:
            self._plans[key] = _flops_table(self.d_out, self.d_in, self.r_G, self.r_A, self._lam, T,
                                            self.identity_G, X_given)
        return self._plans[key]

    def form(self, T: int | None = None, X_given: bool = True) -> str:
        """The cheapest form by counted flops (``dense``, ``corner``, ``factors``, ``factors_dense``)."""
        flops = dict(self._plan(T, X_given)[0])
        flops.pop("rectangle")
        return min(flops, key=flops.get)

    # -- projecting ---------------------------------------------------------------------------

    def project(self, X: Tensor, form: str | None = None) -> Tensor:
        """Project ``X`` (shape ``d_out × d_in``); exactly ``X`` when nothing is removed.

        ``form`` (``dense`` or ``corner``) overrides the cheapest one by counted flops."""
        if self.is_identity:
            return X
        form = form or self.form()
        if form not in ("dense", "corner"):
            raise ValueError(f"project takes form dense or corner, got {form!r} (factor forms: project_factors)")
        with full_precision():
            Xd = X.to(self.dtype)
            if form == "dense":
                out = self._dense(Xd)
            else:
                out = self._corner(Xd, None, None, self._plan(None, True)[1]["corner"])
        return out.to(X.dtype)

    def project_factors(self, g: Tensor, a: Tensor, X: Tensor | None = None, form: str | None = None) -> Tensor:
        """Project the gradient ``X = gᵀ a`` (``g``: ``[..., d_out]`` output gradients, ``a``:
        ``[..., d_in]`` layer inputs, leading dims flattened to ``T`` positions), in ``d_out × d_in``
        orientation. Pass ``X`` when autograd already formed it; otherwise it is formed here (full
        float32). The form is the cheapest by counted flops given ``T`` unless ``form`` is given."""
        g = g.reshape(-1, g.shape[-1])
        a = a.reshape(-1, a.shape[-1])
        if g.shape[0] != a.shape[0] or g.shape[1] != self.d_out or a.shape[1] != self.d_in:
            raise ValueError(f"factors of shapes {tuple(g.shape)} and {tuple(a.shape)} do not fit a "
                             f"{self.d_out} × {self.d_in} matrix")
        T = g.shape[0]
        out_dtype = X.dtype if X is not None else g.dtype
        with full_precision():
            g, a = g.to(self.dtype), a.to(self.dtype)
            Xd = X.to(self.dtype) if X is not None else None
            if self.is_identity:
                return (Xd if Xd is not None else g.T @ a).to(out_dtype)
            flops, splits = self._plan(T, X is not None)
            form = form or self.form(T, X is not None)
            if form == "factors_dense":
                out = self._factors_dense(g, a)
            else:
                if Xd is None:
                    Xd = g.T @ a
                if form == "dense":
                    out = self._dense(Xd)
                elif form == "corner":
                    out = self._corner(Xd, None, None, self._plan(None, True)[1]["corner"])
                elif form == "factors":
                    out = self._corner(Xd, g, a, splits["factors"])
                else:
                    raise ValueError(f"unknown projection form {form!r}; one of {', '.join(FORMS)}")
        return out.to(out_dtype)

    def _mm(self, x: Tensor, y: Tensor) -> Tensor:
        return rotation_matmul(x, y, self.projection_dtype)

    def _dense(self, X: Tensor) -> Tensor:
        """``U_G ((U_Gᵀ X U_A) ⊙ M) U_Aᵀ`` with the staircase zeroed inside the corner."""
        U_A, mm = self.A.vectors, self._mm
        C = mm(X, U_A)
        if self.identity_G:
            C[:, : self.r_A] = 0
            return mm(C, U_A.T)
        U_G = self.G.vectors
        C = mm(U_G.T, C)
        C[: self.r_G, : self.r_A].masked_fill_(self._removed(slice(0, self.r_G), self.r_A), 0)
        return mm(mm(U_G, C), U_A.T)

    def _factors_dense(self, g: Tensor, a: Tensor) -> Tensor:
        """The dense form with the coordinates ``(g U_G)ᵀ (a U_A)`` from the factors."""
        U_A, mm = self.A.vectors, self._mm
        aU = mm(a, U_A)
        if self.identity_G:
            C = mm(g.T, aU)
            C[:, : self.r_A] = 0
            return mm(C, U_A.T)
        U_G = self.G.vectors
        C = mm(mm(g, U_G).T, aU)
        C[: self.r_G, : self.r_A].masked_fill_(self._removed(slice(0, self.r_G), self.r_A), 0)
        return mm(mm(U_G, C), U_A.T)

    def _corner(self, X: Tensor, g: Tensor | None, a: Tensor | None, p: int) -> Tensor:
        """``X − V_G ((V_Gᵀ X V_A) ⊙ R) V_Aᵀ`` split at row ``p`` (module docstring), coordinates
        from ``X`` or, given ``g`` and ``a``, from the factors; each back-rotation block in its
        cheaper order, both blocks in one ``X − L R``."""
        mm, r_A, o, n = self._mm, self.r_A, self.d_out, self.d_in
        V_A = self.A.vectors[:, :r_A]
        if self.identity_G:
            C = mm(X, V_A) if g is None else mm(g.T, mm(a, V_A))
            return X - mm(C, V_A.T)
        r_G = self.r_G
        q = int(self._lam[p])
        h = r_G - p
        V_G = self.G.vectors[:, :r_G]
        if g is None:
            C1 = mm(mm(V_G[:, :p].T, X), V_A)  # p × r_A
            C2 = mm(V_G[:, p:].T, mm(X, V_A[:, :q]))  # h × q
        else:
            gV, aV = mm(g, V_G), mm(a, V_A)
            C1 = mm(gV[:, :p].T, aV)
            C2 = mm(gV[:, p:].T, aV[:, :q])
        R1 = C1 * self._removed(slice(0, p), r_A)
        R2 = C2 * self._removed(slice(p, r_G), q)
        # block 1: V_G[:, :p] R1 V_Aᵀ, inner p or r_A; block 2: V_G[:, p:] R2 V_A[:, :q]ᵀ, inner q or h
        if _mm(p, r_A, n) + _mm(o, p, n) <= _mm(o, p, r_A) + _mm(o, r_A, n):
            L1, Q1 = V_G[:, :p], mm(R1, V_A.T)
        else:
            L1, Q1 = mm(V_G[:, :p], R1), V_A.T
        if _mm(o, h, q) + _mm(o, q, n) <= _mm(h, q, n) + _mm(o, h, n):
            L2, Q2 = mm(V_G[:, p:], R2), V_A[:, :q].T
        else:
            L2, Q2 = V_G[:, p:], mm(R2, V_A[:, :q].T)
        return X - mm(torch.cat([L1, L2], 1), torch.cat([Q1, Q2], 0))

    # -- predictions --------------------------------------------------------------------------

    def predicted_drift(self, X: Tensor) -> float:
        """``½ tr(Xᵀ G X A)`` with the capability factors, over all coordinates."""
        return quadratic_form(X, self.A, self.G)

    def predicted_drift_outside(self, X: Tensor) -> float:
        """The drift of the part of ``X`` outside the kept subspace, ``½ q(X − P X)``.

        For the CrispEdit projector (same eigenbasis) this is ``½ Σ_{M=0} alpha_i beta_j C²`` and
        ``q(X) = q(P X) + q(X − P X)`` exactly; computed from the corner coordinates only (with
        ``G = I`` the removed part is ``X V_A V_Aᵀ``, whose coordinates are ``U_Gᵀ X V_A``).
        """
        if self.is_identity:
            return 0.0
        dtype, r_A = self.A.vectors.dtype, self.r_A
        rows = self.d_out if self.identity_G else self.r_G
        with full_precision():
            C = self.G.vectors[:, :rows].T.to(dtype) @ X.to(dtype) @ self.A.vectors[:, :r_A]
        weights = torch.outer(self.G.values[:rows].to(dtype), self.A.values[:r_A].to(dtype))
        if not self.identity_G:
            weights = weights * self._removed(slice(0, rows), r_A).to(weights.device, dtype)
        return 0.5 * float((weights * C * C).sum())

    def summary(self) -> dict:
        """tau, removed count and share of curvature energy, the corner and the form, for reports."""
        t = self.threshold
        out = {
            "gamma": t.gamma,
            "tau": t.tau,
            "removed": t.removed,
            "total": t.total,
            "removed_share": t.removed_share,
            "identity_G": self.identity_G,
            "r_A": self.r_A,
            "r_G": self.r_G,
            "projection_dtype": self.projection_dtype,
        }
        if not self.is_identity:
            out["form"] = self.form()
            out["flops"] = {k: v for k, v in self.flops().items() if k in ("dense", "corner")}
        return out

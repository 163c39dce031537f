"""The matrix-free projector against the dense ``(U_A ⊗ U_G) diag(vec M) (U_A ⊗ U_G)ᵀ``."""

from __future__ import annotations

import pytest
import torch

from crispedit.projector import CurvatureError, Eigen, KroneckerProjector, eigh_factor, energy_threshold, project
from dense import dense_projector, vec

# float64 on 6×4 matrices: only rounding of a few matmuls.
EXACT_TOL = 1e-12
# float32 projection: single-precision rounding of four matmuls.
FLOAT32_TOL = 1e-5
GAMMAS = [0.0, 0.3, 0.5, 0.8, 0.9, 0.99]


def _psd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, rank or 2 * d, generator=g, dtype=torch.float64)
    return X @ X.T / X.shape[1]


def _factors(seed=0, d_in=6, d_out=4):
    return _psd(d_in, seed), _psd(d_out, seed + 100)


def _brute_force(alpha, beta, gamma):
    """The energy rule by a Python sort of (product, i, j), one product at a time."""
    products = sorted(((float(a) * float(b), i, j) for i, a in enumerate(alpha) for j, b in enumerate(beta)), reverse=True)
    total = sum(p for p, _, _ in products)
    running, k_star = 0.0, 0
    if gamma * total > 0:
        for k, (p, _, _) in enumerate(products, 1):
            running += p
            if running >= gamma * total:
                k_star = k
                break
    keep = torch.ones(len(beta), len(alpha), dtype=torch.bool)
    if k_star:
        tau = products[k_star - 1][0]
        for p, i, j in products:
            if p >= tau:
                keep[j, i] = False
    return k_star, keep


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("identity_G", [False, True], ids=["A⊗G", "G=I"])
def test_matches_dense_projector(gamma, identity_G):
    A, G = _factors()
    P = KroneckerProjector.from_factors(A, G, gamma, identity_G=identity_G, dtype=torch.float64)
    U_G = torch.eye(4, dtype=torch.float64) if identity_G else P.G.vectors
    D = dense_projector(P.A.vectors, U_G, P.mask)
    X = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(vec(P.project(X)), D @ vec(X), rtol=0, atol=EXACT_TOL)
    # a projector: idempotent and self-adjoint, also as the dense matrix
    torch.testing.assert_close(D @ D, D, rtol=0, atol=EXACT_TOL)
    torch.testing.assert_close(D, D.T, rtol=0, atol=EXACT_TOL)
    PX = P.project(X)
    torch.testing.assert_close(P.project(PX), PX, rtol=0, atol=EXACT_TOL)
    Y = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert abs(float((P.project(X) * Y).sum() - (X * P.project(Y)).sum())) < EXACT_TOL


def test_float32_projection_is_a_projector_to_single_precision():
    A, G = _factors(3, d_in=24, d_out=16)
    P64 = KroneckerProjector.from_factors(A, G, 0.8, dtype=torch.float64)
    P32 = KroneckerProjector.from_factors(A, G, 0.8, dtype=torch.float32)
    X = torch.randn(16, 24, dtype=torch.float32)
    torch.testing.assert_close(P32.project(X).double(), P64.project(X.double()), rtol=0, atol=FLOAT32_TOL)
    assert P32.project(X).dtype == torch.float32


def test_gamma_zero_is_the_identity_by_the_rule():
    A, G = _factors()
    P = KroneckerProjector.from_factors(A, G, 0.0)
    X = torch.randn(4, 6)
    assert P.mask.all() and P.threshold.k_star == 0 and P.threshold.removed == 0
    assert P.project(X) is X  # plain fine-tuning, bit for bit
    assert P.predicted_drift_outside(X) == 0.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", GAMMAS)
def test_energy_rule_equals_brute_force_sort(seed, gamma):
    A, G = _factors(seed)
    P = KroneckerProjector.from_factors(A, G, gamma, dtype=torch.float64)
    k_star, keep = _brute_force(P.A.values, P.G.values, gamma)
    assert P.threshold.k_star == k_star
    assert torch.equal(P.mask, keep)
    assert P.threshold.removed == int((~keep).sum())
    products = torch.outer(P.G.values, P.A.values)
    share = float(products[~keep].sum() / products.sum())
    assert P.threshold.removed_share == pytest.approx(share, abs=1e-14)
    assert share >= gamma - 1e-15


def test_ties_with_tau_are_removed_and_g_identity_removes_whole_input_directions():
    t = energy_threshold(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0]), 0.5)
    assert (t.k_star, t.tau, t.removed, t.removed_share) == (2, 2.0, 2, 0.5)
    t = energy_threshold(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0]), 0.6)
    assert (t.k_star, t.tau, t.removed, t.removed_share) == (3, 1.0, 6, 1.0)  # tie with tau: all go
    A, G = _factors()
    P = KroneckerProjector.from_factors(A, G, 0.7, identity_G=True)
    columns = P.mask.all(0) | (~P.mask).all(0)
    assert columns.all()  # every input direction is kept or removed whole
    alpha = P.A.values.double()
    removed = (~P.mask).all(0)
    k = int(removed.sum())
    # the energy rule over alpha alone
    cum = torch.cumsum(alpha, 0)
    assert k == int(torch.searchsorted(cum, torch.tensor([0.7 * cum[-1].item()], dtype=cum.dtype))) + 1


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_predicted_quadratic_form(gamma):
    A, G = _factors(2)
    P = KroneckerProjector.from_factors(A, G, gamma, dtype=torch.float64)
    X = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Xp = P.project(X)
    K = torch.kron(A, G)
    assert P.predicted_drift(Xp) == pytest.approx(0.5 * float(vec(Xp) @ K @ vec(Xp)), rel=1e-12)
    assert P.predicted_drift(X) == pytest.approx(0.5 * float(torch.trace(X.T @ G @ X @ A)), rel=1e-12)
    outside = X - Xp
    assert P.predicted_drift_outside(X) == pytest.approx(0.5 * float(vec(outside) @ K @ vec(outside)), rel=1e-12, abs=1e-15)
    # same eigenbasis: the form splits exactly into kept + outside
    assert P.predicted_drift(X) == pytest.approx(P.predicted_drift(Xp) + P.predicted_drift_outside(X), rel=1e-12)


def test_a_projected_update_moves_the_prediction_far_less_than_the_raw_one():
    A, G = _psd(12, 5, rank=3), _psd(8, 6, rank=2)  # low-rank curvature, like real layers
    P = KroneckerProjector.from_factors(A, G, 0.99, dtype=torch.float64)
    X = torch.randn(8, 12, dtype=torch.float64)
    assert P.predicted_drift(P.project(X)) < 0.05 * P.predicted_drift(X)


def test_eigh_refuses_bad_statistics():
    with pytest.raises(CurvatureError, match="layer.A: statistics contain NaN"):
        eigh_factor(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "layer.A")
    with pytest.raises(CurvatureError, match="far below zero"):
        eigh_factor(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), "layer.G")
    with pytest.raises(CurvatureError, match="square"):
        eigh_factor(torch.ones(2, 3))
    e = eigh_factor(torch.tensor([[1.0, 0.0], [0.0, -1e-9]], dtype=torch.float64))
    assert (e.values >= 0).all() and e.values[0] == 1.0  # tiny negatives clamped, descending
    with pytest.raises(CurvatureError, match="all zero"):
        KroneckerProjector.from_factors(torch.zeros(3, 3), torch.eye(2), 0.5)
    for gamma in (-0.1, 1.0, 1.5):
        with pytest.raises(CurvatureError, match="gamma"):
            energy_threshold(torch.ones(2), torch.ones(2), gamma)


def test_eigh_symmetrises_and_reconstructs():
    A = _psd(5, 9)
    skew = torch.randn(5, 5, dtype=torch.float64) * 1e-9
    e = eigh_factor(A + skew - skew.T)
    torch.testing.assert_close(e.vectors @ torch.diag(e.values) @ e.vectors.T, A, rtol=0, atol=1e-12)
    assert isinstance(e, Eigen) and e.values.dtype == torch.float64


def test_project_function_with_identity_g_is_a_column_projection():
    A, _ = _factors()
    e = eigh_factor(A)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 3:] = True
    X = torch.randn(4, 6, dtype=torch.float64)
    U = e.vectors[:, 3:]
    torch.testing.assert_close(project(X, e.vectors, None, mask), X @ U @ U.T, rtol=0, atol=EXACT_TOL)

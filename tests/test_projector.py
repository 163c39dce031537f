"""The matrix-free projector against the dense ``(U_A ⊗ U_G) diag(vec M) (U_A ⊗ U_G)ᵀ``."""

from __future__ import annotations

import pytest
import torch

from crispedit.projector import (
    CurvatureError,
    Eigen,
    KroneckerProjector,
    eigh_errors,
    eigh_factor,
    energy_threshold,
    kept_mask,
    project,
    projection_flops,
    removed_per_column,
    row_lengths,
    staircase_mask,
)
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


# ---------------------------------------------------------------------------------------------
# the staircase, the cheap forms, precision, the float32 eigh check

FORMS_X = ["dense", "corner"]
FORMS_FACTORS = ["dense", "corner", "factors", "factors_dense"]
# (d_out, d_in): wide, tall and square, so every association order and split gets exercised
SHAPES = [(4, 6), (9, 5), (7, 13)]
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per input), TF32 keeps 10 (2^-11 ≈ 5e-4);
# a handful of chained roundings on these small matrices stays below 5× that.
BF16_TOL, TF32_TOL = 1e-2, 2.5e-3


def _decaying_psd(d: int, seed: int) -> torch.Tensor:
    """A covariance with a power-law spectrum ``(1 + i)^-1.5``: its staircases have many steps and
    their cheapest split rows lie inside the corner (0 < p < r_G) for several gammas."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = (1.0 + torch.arange(d, dtype=torch.float64)) ** -1.5
    return Q @ torch.diag(values) @ Q.T


def _projector(shape, gamma, identity_G=False, seed=0, dtype=torch.float64, **kw):
    d_out, d_in = shape
    return KroneckerProjector.from_factors(_decaying_psd(d_in, seed), _decaying_psd(d_out, seed + 50), gamma,
                                           identity_G=identity_G, dtype=dtype, **kw)


def _dense_of(P):
    U_G = torch.eye(P.d_out, dtype=torch.float64) if P.identity_G else P.G.vectors.double()
    return dense_projector(P.A.vectors.double(), U_G, P.mask)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("identity_G", [False, True], ids=["A⊗G", "G=I"])
def test_every_form_equals_the_dense_projector(shape, gamma, identity_G):
    P = _projector(shape, gamma, identity_G)
    D = _dense_of(P)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(*shape, dtype=torch.float64, generator=gen)
    for form in FORMS_X:
        torch.testing.assert_close(vec(P.project(X, form=form)), D @ vec(X), rtol=0, atol=EXACT_TOL)
    for T in (1, 3, 40):  # fewer and more positions than either dimension
        g = torch.randn(T, shape[0], dtype=torch.float64, generator=gen)
        a = torch.randn(T, shape[1], dtype=torch.float64, generator=gen)
        want = D @ vec(g.T @ a)
        for form in FORMS_FACTORS:
            torch.testing.assert_close(vec(P.project_factors(g, a, form=form)), want, rtol=0, atol=EXACT_TOL)
            torch.testing.assert_close(vec(P.project_factors(g, a, X=g.T @ a, form=form)), want, rtol=0, atol=EXACT_TOL)
        torch.testing.assert_close(vec(P.project_factors(g.reshape(T, 1, -1), a.reshape(T, 1, -1))), want, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("gamma", [0.5, 0.8, 0.9])
def test_every_split_row_of_the_corner_is_the_same_projector(gamma):
    P = _projector((9, 13), gamma)
    assert 1 < P.r_G and 1 < P.r_A and P.threshold.removed < P.r_G * P.r_A  # a staircase, not a rectangle
    X = torch.randn(9, 13, dtype=torch.float64)
    g, a = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    want, want_f = P.project(X, form="dense"), P.project(g.T @ a, form="dense")
    for p in range(P.r_G + 1):  # the private executor, to reach every split, not only the cheapest
        torch.testing.assert_close(P._corner(X, None, None, p), want, rtol=0, atol=EXACT_TOL)
        torch.testing.assert_close(P._corner(g.T @ a, g, a, p), want_f, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("identity_G", [False, True], ids=["A⊗G", "G=I"])
def test_staircase_counts_equal_the_full_mask(seed, identity_G):
    g = torch.Generator().manual_seed(seed)
    # ties included: values drawn from a small set
    alpha = torch.randint(0, 6, (40,), generator=g).double().sort(descending=True).values
    beta = torch.randint(0, 5, (17,), generator=g).double().sort(descending=True).values
    if identity_G:
        beta = torch.ones(17, dtype=torch.float64)
    for gamma in GAMMAS:
        t = energy_threshold(alpha, beta, gamma)
        removed = ~kept_mask(alpha, beta, t.tau)
        counts = removed_per_column(alpha, beta, t.tau)
        assert torch.equal(counts, removed.sum(0))
        assert torch.equal(staircase_mask(counts, 17), ~removed)
        assert int(counts.sum()) == t.removed
        assert torch.equal(row_lengths(counts)[:-1], removed.sum(1)[: int(counts[0])])


def test_the_projector_holds_no_weight_sized_tensor():
    P = _projector((9, 13), 0.8, dtype=torch.float32)
    tensors = [t for v in vars(P).values() if isinstance(v, Eigen) for t in (v.values, v.vectors)]
    tensors += [v for v in vars(P).values() if isinstance(v, torch.Tensor)]
    assert P.counts.shape == (13,)
    assert all(t.numel() != 9 * 13 for t in tensors)
    assert P.mask.shape == (9, 13) and P.mask.dtype == torch.bool  # still available, built on demand


@pytest.mark.parametrize("identity_G", [False, True], ids=["A⊗G", "G=I"])
def test_counted_flops_are_the_flops_executed(identity_G):
    from torch.utils.flop_counter import FlopCounterMode

    P = _projector((9, 13), 0.8, identity_G)
    X = torch.randn(9, 13, dtype=torch.float64)
    g, a = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 13, dtype=torch.float64)

    def counted(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    table = P.flops()
    for form in FORMS_X:
        assert counted(lambda: P.project(X, form=form)) == table[form]
    for X_given in (False, True):
        table = P.flops(3, X_given)
        for form in FORMS_FACTORS:
            assert counted(lambda: P.project_factors(g, a, X=X if X_given else None, form=form)) == table[form]
        assert P.form(3, X_given) == min(FORMS_FACTORS, key=table.get)
    # the corner without the staircase is never cheaper than the split, the dense never cheaper than either
    assert identity_G or table["corner"] < table["rectangle"] <= table["dense"]


def test_projection_flops_by_hand():
    o, n, rG, rA = 4096, 14336, 1000, 3000
    f = projection_flops(o, n, rG, rA)
    assert f["dense"] == 4 * o * n * (o + n)  # the 4.3 TFLOP
    assert f["dense"] == 4_329_327_034_368
    # rectangle: X V_A first (2 o n rA + 2 rG o rA), then V_G (R V_Aᵀ) (2 rG rA n + 2 o rG n) is cheaper than V_G R first
    assert f["rectangle"] == f["corner"] == min(2 * o * n * rA + 2 * rG * o * rA, 2 * rG * o * n + 2 * rG * n * rA) + min(
        2 * rG * rA * n + 2 * o * rG * n, 2 * o * rG * rA + 2 * o * rA * n)
    f = projection_flops(o, n, rG, rA, T=256, X_given=False)
    back = min(2 * rG * rA * n + 2 * o * rG * n, 2 * o * rG * rA + 2 * o * rA * n)
    assert f["factors"] == 2 * 256 * (o * rG + n * rA + rG * rA) + back + 2 * o * 256 * n  # coordinates, back, X = gᵀa
    # a hook-shaped staircase (one full row, one full column) costs two lines, not min(rG, rA)
    counts = torch.ones(rA, dtype=torch.int64)
    counts[0] = rG
    hook = projection_flops(o, n, rG, rA, counts=counts)
    assert hook["corner"] < hook["rectangle"] / 100
    with pytest.raises(ValueError, match="corner"):
        projection_flops(o, n, rG + 1, rA, counts=counts)
    g = projection_flops(o, n, o, rA, identity_G=True)
    assert g["corner"] == 4 * o * n * rA and g["dense"] == 4 * o * n * n


def test_float32_forms_agree_with_float64_to_single_precision():
    P64 = _projector((9, 13), 0.8)
    P32 = _projector((9, 13), 0.8, dtype=torch.float32)
    X = torch.randn(9, 13)
    g, a = torch.randn(6, 9), torch.randn(6, 13)
    want = P64.project(X.double(), form="dense")
    for form in FORMS_X:
        out = P32.project(X, form=form)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, rtol=0, atol=FLOAT32_TOL)
    want = P64.project((g.T @ a).double(), form="dense")
    for form in FORMS_FACTORS:
        torch.testing.assert_close(P32.project_factors(g, a, form=form).double(), want, rtol=0, atol=FLOAT32_TOL * 10)


@pytest.mark.parametrize("precision,tol", [("tf32", TF32_TOL), ("bfloat16", BF16_TOL)])
def test_reduced_precision_rounds_the_rotations_only(precision, tol):
    P = _projector((9, 13), 0.8, dtype=torch.float32)
    Q = _projector((9, 13), 0.8, dtype=torch.float32, projection_dtype=precision)
    X = torch.randn(9, 13)
    for form in FORMS_X:
        exact, approx = P.project(X, form=form), Q.project(X, form=form)
        assert approx.dtype == torch.float32 and Q.A.vectors.dtype == torch.float32
        err = float((approx - exact).norm() / X.norm())
        assert 0 < err < tol  # rounded (not silently full precision), but only to the format's precision
    # the corner form subtracts a rounded removed part from the exact X: the kept part is untouched
    Y = X - P.project(X)  # the removed part of X
    K = P.project(X)
    torch.testing.assert_close(Q.project(K, form="corner"), K, rtol=0, atol=tol * float(K.norm()))
    assert float((Q.project(Y, form="corner")).norm()) < tol * float(Y.norm())


def test_tf32_rounding_is_to_nearest_even_with_ten_mantissa_bits():
    from crispedit.projector import _round_tf32

    ulp = 2.0 ** -10
    x = torch.tensor([1.0, 1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.75 * ulp, -3 - ulp / 4, 2.0 ** -20 * (1 + ulp / 2)])
    want = torch.tensor([1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -3.0, 2.0 ** -20])
    assert torch.equal(_round_tf32(x), want)


def test_float32_projection_runs_with_full_precision_whatever_the_caller_set(monkeypatch):
    import crispedit.projector as projector

    seen = []
    real = projector.rotation_matmul

    def spy(a, b, precision="float32"):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32))
        return real(a, b, precision)

    monkeypatch.setattr(projector, "rotation_matmul", spy)
    P = _projector((9, 13), 0.8, dtype=torch.float32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a caller that enabled TF32
    try:
        P.project(torch.randn(9, 13), form="dense")
        P.project_factors(torch.randn(3, 9), torch.randn(3, 13))
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and all(s == ("highest", False) for s in seen)


def test_projection_dtype_and_eigen_order_are_checked():
    with pytest.raises(CurvatureError, match="--projection-dtype must be one of auto, float32, tf32, bfloat16, got 'fp8'"):
        _projector((4, 6), 0.8, projection_dtype="fp8")
    e = eigh_factor(_psd(6, 0))
    unsorted = Eigen(e.values.flip(0), e.vectors.flip(1))
    with pytest.raises(CurvatureError, match="A: eigenvalues must be sorted descending"):
        KroneckerProjector.from_eigen(unsorted, eigh_factor(_psd(4, 1)), 0.5)


@pytest.mark.parametrize("identity_G", [False, True], ids=["A⊗G", "G=I"])
def test_predicted_drift_outside_from_the_corner(identity_G):
    A, G = _decaying_psd(13, 1), _decaying_psd(9, 2)
    P = KroneckerProjector.from_factors(A, G, 0.8, identity_G=identity_G, dtype=torch.float64)
    X = torch.randn(9, 13, dtype=torch.float64)
    outside = X - P.project(X, form="dense")
    want = 0.5 * float(vec(outside) @ torch.kron(A, G) @ vec(outside))
    assert P.predicted_drift_outside(X) == pytest.approx(want, rel=1e-10)


def test_float32_eigh_is_checked_and_accepted_when_right(monkeypatch, recwarn):
    import crispedit.projector as projector

    monkeypatch.setattr(projector, "EIGH_FLOAT64_MAX_DIM", 4)  # an 8 × 8 factor takes the large-matrix path
    M = _decaying_psd(8, 3)
    e = eigh_factor(M, "big.A")
    assert e.vectors.dtype == torch.float32 and not recwarn.list
    residual, orthogonality = eigh_errors(M.float(), e.values, e.vectors)
    assert max(residual, orthogonality) < projector.eigh_tolerance(8, torch.float32) / 10  # with room to spare
    assert projector.eigh_tolerance(18944, torch.float32) == pytest.approx(18944 * 2.0**-23)


def test_an_off_float32_eigh_falls_back_to_float64_on_the_cpu(monkeypatch):
    import crispedit.projector as projector

    monkeypatch.setattr(projector, "EIGH_FLOAT64_MAX_DIM", 4)
    real = projector._eigh

    def broken(S):  # a solver that returns slightly wrong vectors in float32 (as cuSOLVER has, at size)
        values, vectors = real(S)
        if S.dtype == torch.float32:
            vectors = vectors + 1e-3 * torch.randn_like(vectors)
        return values, vectors

    monkeypatch.setattr(projector, "_eigh", broken)
    M = _decaying_psd(8, 3)
    with pytest.warns(RuntimeWarning, match=r"big.G: float32 eigh is off \(residual .*recomputing in float64"):
        e = eigh_factor(M, "big.G")
    assert e.vectors.dtype == torch.float64
    torch.testing.assert_close(e.vectors @ torch.diag(e.values) @ e.vectors.T, M, rtol=0, atol=1e-12)
    with pytest.warns(RuntimeWarning):  # the same for an explicit float32 request
        assert eigh_factor(M, "big.G", dtype=torch.float32).vectors.dtype == torch.float64


def test_summary_reports_the_corner_and_the_form():
    P = _projector((9, 13), 0.8)
    s = P.summary()
    removed = ~P.mask
    assert (s["r_A"], s["r_G"]) == (P.r_A, P.r_G) == (int(removed.any(0).sum()), int(removed.any(1).sum()))
    assert s["form"] == "corner" and s["flops"]["corner"] < s["flops"]["dense"]
    assert s["projection_dtype"] == "float32"


def test_auto_precision_is_full_float32_on_a_cpu():
    A, G = _factors()
    X = torch.randn(4, 6, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    auto = KroneckerProjector.from_factors(A.float(), G.float(), 0.8, projection_dtype="auto")
    exact = KroneckerProjector.from_factors(A.float(), G.float(), 0.8, projection_dtype="float32")
    assert torch.equal(auto.project(X), exact.project(X))

"""Floor 6: the linear algebra behind PiSSA and rank reduction (``lora_numpy.peft.svd``).

Every expectation is computed here from NumPy's own SVD and the Eckart–Young theorem:
for ``M = U S Vᵀ`` the best rank-k approximation is ``U_k S_k V_kᵀ`` and its squared Frobenius
error is ``Σ_{i>k} S_i²``."""
import numpy as np
import pytest

from lora_numpy import backend
from lora_numpy.peft import low_rank_approximation, randomized_svd, split_factors, truncate_product


def _np(a):
    return backend.to_numpy(a)


def _xp(a):
    return backend.asarray(a)


def decaying_matrix(rng, m, n, decay=0.8):
    """A float64 (m, n) matrix with singular values decay**i (known exactly)."""
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    S = decay ** np.arange(k)
    return (U * S) @ V.T, S


def svd_truncation(M, k):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


# ---- low_rank_approximation ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(20, 12), (9, 30), (16, 16)])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_low_rank_approximation_meets_eckart_young(rng, shape, k):
    """‖M − BA‖_F² equals the sum of the dropped squared singular values, BA has rank k,
    and the factors have shapes (m, k), (k, n)."""
    M = rng.standard_normal(shape)
    Bf, Af = low_rank_approximation(_xp(M), k)
    Bf, Af = _np(Bf), _np(Af)
    assert Bf.shape == (shape[0], k) and Af.shape == (k, shape[1])
    S = np.linalg.svd(M, compute_uv=False)
    err = np.sum((M - Bf @ Af) ** 2)
    np.testing.assert_allclose(err, np.sum(S[k:] ** 2), rtol=1e-10, atol=1e-12)
    assert np.linalg.matrix_rank(Bf @ Af) == k
    np.testing.assert_allclose(Bf @ Af, svd_truncation(M, k), atol=1e-10)


def test_low_rank_approximation_full_rank_is_exact(rng):
    M = rng.standard_normal((7, 5))
    Bf, Af = low_rank_approximation(_xp(M), 5)
    np.testing.assert_allclose(_np(Bf) @ _np(Af), M, atol=1e-12)


def test_low_rank_approximation_shares_singular_values_evenly(rng):
    """B = U_k √S_k, A = √S_k V_kᵀ: the two factors carry the same column/row norms."""
    M = rng.standard_normal((10, 8))
    Bf, Af = low_rank_approximation(_xp(M), 4)
    S = np.linalg.svd(M, compute_uv=False)[:4]
    np.testing.assert_allclose(np.linalg.norm(_np(Bf), axis=0), np.sqrt(S), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(_np(Af), axis=1), np.sqrt(S), rtol=1e-10)


@pytest.mark.parametrize("k", [0, -1, 6, 100])
def test_low_rank_approximation_rejects_bad_rank(rng, k):
    with pytest.raises(ValueError, match="rank"):
        low_rank_approximation(_xp(rng.standard_normal((8, 5))), k)


# ---- split_factors ----------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_split_factors_reassemble(rng, scaling):
    """scaling · B A = U diag(S) Vt."""
    M = rng.standard_normal((6, 9))
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    Bf, Af = split_factors(_xp(U), _xp(S), _xp(Vt), scaling)
    np.testing.assert_allclose(scaling * _np(Bf) @ _np(Af), M, atol=1e-12)


# ---- randomized_svd ---------------------------------------------------------------------------
def test_randomized_svd_shapes_and_orthonormality(rng):
    M, _ = decaying_matrix(rng, 40, 25)
    U, S, Vt = map(_np, randomized_svd(_xp(M), 6, n_iter=2, rng=np.random.default_rng(0)))
    assert U.shape == (40, 6) and S.shape == (6,) and Vt.shape == (6, 25)
    np.testing.assert_allclose(U.T @ U, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(6), atol=1e-10)
    assert np.all(np.diff(S) <= 1e-12), "singular values must come in decreasing order"


def test_randomized_svd_approaches_exact_as_n_iter_grows(rng):
    """On a matrix with a slowly decaying spectrum, the error of the top-k singular values and
    of the rank-k reconstruction never grows with more power iterations, and with enough of
    them matches the exact SVD."""
    M, S_true = decaying_matrix(rng, 60, 50, decay=0.93)
    k = 5
    sv_errors, recon_errors = [], []
    for n_iter in (0, 1, 2, 4, 8, 16, 32):
        U, S, Vt = map(_np, randomized_svd(_xp(M), k, n_iter=n_iter, rng=np.random.default_rng(7)))
        sv_errors.append(np.linalg.norm(S - S_true[:k]))
        recon_errors.append(np.linalg.norm(M - (U * S) @ Vt))
    best = np.sqrt(np.sum(S_true[k:] ** 2))  # Eckart–Young: no rank-k matrix does better
    assert all(e >= best - 1e-9 for e in recon_errors)
    for a, b in zip(sv_errors, sv_errors[1:]):
        assert b <= a + 1e-9, sv_errors
    for a, b in zip(recon_errors, recon_errors[1:]):
        assert b <= a + 1e-9, recon_errors
    assert sv_errors[0] > 10 * sv_errors[-1], "power iterations should help a lot here"
    np.testing.assert_allclose(recon_errors[-1], best, rtol=1e-3)
    np.testing.assert_allclose(S, S_true[:k], rtol=1e-3)


def test_randomized_svd_exact_on_low_rank_matrix(rng):
    """A matrix of exact rank k is recovered exactly, even without power iterations."""
    M = rng.standard_normal((30, 4)) @ rng.standard_normal((4, 20))
    U, S, Vt = map(_np, randomized_svd(_xp(M), 4, n_iter=0, rng=np.random.default_rng(1)))
    np.testing.assert_allclose((U * S) @ Vt, M, atol=1e-10)
    np.testing.assert_allclose(S, np.linalg.svd(M, compute_uv=False)[:4], rtol=1e-10)


def test_randomized_svd_is_seeded(rng):
    M, _ = decaying_matrix(rng, 20, 15)
    a = _np(randomized_svd(_xp(M), 3, 1, rng=np.random.default_rng(3))[1])
    b = _np(randomized_svd(_xp(M), 3, 1, rng=np.random.default_rng(3))[1])
    np.testing.assert_array_equal(a, b)


# ---- truncate_product -------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncate_product_equals_svd_truncation(rng, k):
    """U S Vt from the factors equals the rank-k SVD truncation of B @ A, formed explicitly."""
    Bm, Am = rng.standard_normal((14, 6)), rng.standard_normal((6, 11))
    U, S, Vt = map(_np, truncate_product(_xp(Bm), _xp(Am), k))
    assert U.shape == (14, k) and S.shape == (k,) and Vt.shape == (k, 11)
    P = Bm @ Am
    np.testing.assert_allclose((U * S) @ Vt, svd_truncation(P, k), atol=1e-10)
    np.testing.assert_allclose(S, np.linalg.svd(P, compute_uv=False)[:k], rtol=1e-10)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(k), atol=1e-10)
    err = np.sum((P - (U * S) @ Vt) ** 2)
    np.testing.assert_allclose(err, np.sum(np.linalg.svd(P, compute_uv=False)[k:] ** 2),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("k", [0, 7])
def test_truncate_product_rejects_bad_rank(rng, k):
    with pytest.raises(ValueError):
        truncate_product(_xp(rng.standard_normal((8, 6))), _xp(rng.standard_normal((6, 5))), k)

"""Floor 6: the linear algebra behind PiSSA and rank reduction.

Eckart–Young: for ``M = U S Vᵀ`` (singular values in decreasing order), the best rank-k
approximation in Frobenius (and spectral) norm is ``U_k S_k V_kᵀ``, and its error is
``‖M − M_k‖_F² = Σ_{i>k} S_i²``. Everything here is that one fact, used three ways.
"""
from __future__ import annotations

import numpy as np

from .. import backend


def split_factors(U, S, Vt, scaling: float = 1.0):
    """Share the singular values evenly between two factors: ``scaling · B A = U diag(S) Vt``.

    U (m, k), S (k,), Vt (k, n) -> B (m, k) = U √(S/s), A (k, n) = √(S/s) Vt.
    """
    root = backend.xp.sqrt(S / scaling)
    return U * root[None, :], root[:, None] * Vt


def low_rank_approximation(M, k: int):
    """The best rank-k factors of M (m, n): returns B (m, k), A (k, n) with ``B @ A = M_k``."""
    m, n = M.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rank k must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {k}")
    U, S, Vt = backend.xp.linalg.svd(M, full_matrices=False)
    return split_factors(U[:, :k], S[:k], Vt[:k])


def randomized_svd(M, k: int, n_iter: int = 2, oversample: int = 0, rng=None):
    """Approximate top-k SVD of M (m, n) by random projection (Halko, Martinsson & Tropp 2011).

    Sketch the range of M with ``Y = M Ω`` for a Gaussian Ω (n, k+p), sharpen it with
    ``n_iter`` power iterations ``Y = M (Mᵀ Y)`` (each multiplies the weight of direction i by
    S_i², so the top directions dominate), orthonormalise to Q, and take the exact SVD of the
    small ``Qᵀ M``. More iterations, closer to the exact SVD. Returns U (m, k), S (k,), Vt (k, n).
    ``oversample=0`` mirrors PEFT's ``torch.svd_lowrank(W, q=r, niter=K)`` call.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    xp = backend.xp
    omega = backend.asarray(rng.standard_normal((M.shape[1], k + oversample)).astype(M.dtype))
    Q, _ = xp.linalg.qr(M @ omega)
    for _ in range(n_iter):  # re-orthonormalise each time: powers of S would swamp float32
        Q, _ = xp.linalg.qr(M.T @ Q)
        Q, _ = xp.linalg.qr(M @ Q)
    Ub, S, Vt = xp.linalg.svd(Q.T @ M, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vt[:k]


def truncate_product(B, A, k: int):
    """Best rank-k factors of the product ``B @ A`` ((m, r) @ (r, n)) without forming it.

    With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR), ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``: the SVD of
    the small r×r core gives the SVD of the product. Returns U (m, k), S (k,), Vt (k, n).
    """
    r = B.shape[1]
    if not 1 <= k <= r:
        raise ValueError(f"can only truncate to a rank in [1, {r}], got {k}")
    Qb, Rb = backend.xp.linalg.qr(B)
    Qa, Ra = backend.xp.linalg.qr(A.T)
    Uc, S, Vtc = backend.xp.linalg.svd(Rb @ Ra.T)
    return (Qb @ Uc)[:, :k], S[:k], (Qa @ Vtc.T).T[:k]

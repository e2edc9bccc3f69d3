"""Floor 7: what a trained low-rank update learnt, the measurements of the LoRA paper's §7
(Hu et al., 2021, "Understanding the low-rank updates").

    subspace similarity   φ(A, A', i, j) = ‖U_iᵀ U'_j‖²_F / min(i, j)            in [0, 1]
        U_i: the top-i right singular vectors of A (r, d_in), as columns (d_in, i). 1 when one
        span contains the other, 0 when they are orthogonal; two random subspaces of R^d score
        max(i, j) / d on average, the level any measured φ must beat.
    amplification factor  ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F
        U_r, V_r: the top-r left and right singular vectors of ΔW. Large when ΔW points along
        directions that W itself barely uses (the paper's "amplifies features").

Everything works on host NumPy arrays (float64 for the SVDs): these are read-outs after
training, not part of the autograd graph.
"""
from __future__ import annotations

import numpy as np

from . import backend


def adapter_factors(layer, adapter_name: str | None = None):
    """(A, B, s) of a LoRA layer's adapter (the active one by default) as NumPy arrays:
    A (r, d_in), B (d_out, r), ΔW = s · B A.

    The one place that knows where a layer keeps its adapter, so that analyses need not.
    """
    name = layer.active_adapter if adapter_name is None else adapter_name
    A, B = layer.factors(name)
    return backend.to_numpy(A), backend.to_numpy(B), float(layer.scaling[name])


def right_singular_vectors(A) -> np.ndarray:
    """The right singular vectors of A (r, d_in) as columns, (d_in, min(r, d_in)), strongest first."""
    _, _, Vt = np.linalg.svd(np.asarray(A, dtype=np.float64), full_matrices=False)
    return Vt.T


def subspace_similarity(U, U_other, i: int, j: int) -> float:
    """φ = ‖U[:, :i]ᵀ U_other[:, :j]‖²_F / min(i, j) for two matrices of orthonormal columns."""
    if not (1 <= i <= U.shape[1] and 1 <= j <= U_other.shape[1]):
        raise ValueError(f"i={i}, j={j} must be in [1, {U.shape[1]}] and [1, {U_other.shape[1]}]")
    if U.shape[0] != U_other.shape[0]:
        raise ValueError(f"the subspaces live in R^{U.shape[0]} and R^{U_other.shape[0]}: compare "
                         "adapters of the same layer")
    overlap = U[:, :i].T @ U_other[:, :j]
    return float((overlap ** 2).sum() / min(i, j))


def subspace_similarity_grid(A, A_other, max_i: int | None = None, max_j: int | None = None) -> np.ndarray:
    """φ(A, A_other, i, j) for i = 1..max_i (rows) and j = 1..max_j (columns): the paper's
    Figure 3 and 4 heatmaps. A (r, d_in), A_other (r', d_in); the defaults are r and r'."""
    U, U_other = right_singular_vectors(A), right_singular_vectors(A_other)
    max_i, max_j = max_i or U.shape[1], max_j or U_other.shape[1]
    return np.array([[subspace_similarity(U, U_other, i, j) for j in range(1, max_j + 1)]
                     for i in range(1, max_i + 1)])


def projection_norm(W, U, V) -> float:
    """‖Uᵀ W V‖_F: how much of W (d_out, d_in) lies along U (d_out, r) on the left and V (d_in, r)."""
    return float(np.linalg.norm(U.T @ np.asarray(W, dtype=np.float64) @ V))


def top_singular_directions(M, r: int):
    """The top-r left (d_out, r) and right (d_in, r) singular vectors of M (d_out, d_in)."""
    U, _, Vt = np.linalg.svd(np.asarray(M, dtype=np.float64), full_matrices=False)
    return U[:, :r], Vt[:r].T


def amplification_factor(delta_W, W, r: int) -> float:
    """‖ΔW‖_F / ‖U_rᵀ W V_r‖_F with U_r, V_r the top-r singular directions of ΔW (Table 7)."""
    U, V = top_singular_directions(delta_W, r)
    return float(np.linalg.norm(np.asarray(delta_W, dtype=np.float64)) / projection_norm(W, U, V))

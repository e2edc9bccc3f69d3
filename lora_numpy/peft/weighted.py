"""Floor 6: adapter arithmetic, PEFT's ``add_weighted_adapter`` for one layer.

Given adapters i with factors A_i (r_i, n), B_i (m, r_i), scales s_i and weights w_i, each way
builds the factors (A, B) of a new adapter whose own scale is 1 (PEFT sets its lora_alpha = r):

* ``"cat"``: A = [w_1 s_1 A_1 ; w_2 s_2 A_2 ; ...], B = [B_1 | B_2 | ...], rank Σ r_i, so
  B A = Σ w_i s_i B_i A_i exactly: each adapter keeps its own subspace.
* ``"linear"``: equal ranks; A = Σ sign(w_i s_i) √|w_i s_i| A_i, B = Σ √|w_i s_i| B_i. The
  product B A then holds the cross terms √(..) B_i A_j (i ≠ j) too: cheap but approximate.
* ``"svd"``: ΔW = Σ w_i s_i B_i A_i, then its best rank-k factors (Eckart–Young): B = U_k S_k,
  A = V_kᵀ, with k = ``svd_rank`` or the largest r_i.
"""
from __future__ import annotations

import math

from .. import backend

COMBINATIONS = ("linear", "cat", "svd")


def combine_factors(combination_type: str, factors: list, weights: list, new_rank: int,
                    svd_clamp: float | None = None):
    """factors: (A_i, B_i, s_i) of the adapters this layer holds (weights to match).
    Returns the new adapter's (A (new_rank, n), B (m, new_rank)) arrays."""
    xp = backend.xp
    n, m = factors[0][0].shape[1], factors[0][1].shape[0]
    A = xp.zeros((new_rank, n), dtype=factors[0][0].dtype)
    B = xp.zeros((m, new_rank), dtype=factors[0][1].dtype)
    if combination_type == "cat":
        A_cat = xp.concatenate([A_i * (w * s) for (A_i, _, s), w in zip(factors, weights)], axis=0)
        B_cat = xp.concatenate([B_i for (_, B_i, _) in factors], axis=1)
        A[:A_cat.shape[0]], B[:, :B_cat.shape[1]] = A_cat, B_cat  # a layer may hold fewer adapters
    elif combination_type == "linear":
        for (A_i, B_i, s), w in zip(factors, weights):
            root = math.sqrt(abs(w * s))
            A += (root if w * s >= 0 else -root) * A_i  # the sign on one side only
            B += root * B_i
    elif combination_type == "svd":
        delta = sum(w * s * (B_i @ A_i) for (A_i, B_i, s), w in zip(factors, weights))
        if new_rank > min(delta.shape):
            raise ValueError(f"svd_rank={new_rank} exceeds min{delta.shape} = {min(delta.shape)} "
                             "of a layer's ΔW; choose a smaller svd_rank")
        U, S, Vt = xp.linalg.svd(delta, full_matrices=False)
        U, Vt = U[:, :new_rank] * S[:new_rank], Vt[:new_rank]
        if svd_clamp is not None:  # PEFT's option: clip both factors at a quantile of their values
            high = xp.quantile(xp.concatenate([U.ravel(), Vt.ravel()]), svd_clamp)
            U, Vt = xp.clip(U, -high, high), xp.clip(Vt, -high, high)
        A, B = Vt, U
    else:
        raise ValueError(f"combination_type={combination_type!r}; choose one of {COMBINATIONS}")
    return A, B

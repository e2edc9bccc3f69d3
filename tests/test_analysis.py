import numpy as np
import pytest

from lora_numpy.analysis import (adapter_factors, amplification_factor, projection_norm,
                                 right_singular_vectors, subspace_similarity, subspace_similarity_grid)
from lora_numpy.nn import Linear
from lora_numpy.peft import LoraConfig, LoraLinear


def orthonormal(d, k, seed):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))[0]


def test_phi_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    Q = orthonormal(10, 6, 0)
    # The same span in another basis (a rotation inside it) is the same subspace.
    rotated = Q[:, :3] @ orthonormal(3, 3, 1)
    assert subspace_similarity(Q[:, :3], rotated, 3, 3) == pytest.approx(1.0)
    assert subspace_similarity(Q[:, :3], Q[:, 3:], 3, 3) == pytest.approx(0.0, abs=1e-12)
    # Nested spans: the smaller one lies inside the larger, so φ = 1 whatever the sizes.
    assert subspace_similarity(Q, Q, 2, 6) == pytest.approx(1.0)


def test_phi_against_a_hand_computed_case():
    # U = e1 in R^2; U' = (cos t, sin t): ‖Uᵀ U'‖² = cos² t.
    t = 0.3
    U = np.array([[1.0], [0.0]])
    U_other = np.array([[np.cos(t)], [np.sin(t)]])
    assert subspace_similarity(U, U_other, 1, 1) == pytest.approx(np.cos(t) ** 2)
    # span(e1, e2) against span(e1, (e1+e3)/√2) = span(e1, e3) in R^3: they share one of two
    # directions, so ‖U2ᵀ V2‖² = 1 and φ = 1 / min(2, 2).
    U2 = np.eye(3)[:, :2]
    V2 = np.linalg.qr(np.stack([[1.0, 0, 0], [1 / np.sqrt(2), 0, 1 / np.sqrt(2)]], axis=1))[0]
    assert subspace_similarity(U2, V2, 2, 2) == pytest.approx(0.5)


def test_grid_uses_right_singular_vectors_of_A():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 12))
    grid = subspace_similarity_grid(A, 3.0 * A)           # the same row space, scaled
    assert grid.shape == (4, 4)
    assert np.allclose(np.diag(grid), 1.0)
    # Right singular vectors span A's row space: the columns of A.T lie in it.
    U = right_singular_vectors(A)
    assert np.allclose(U @ (U.T @ A.T), A.T)
    with pytest.raises(ValueError, match="i=5"):
        subspace_similarity(U, U, 5, 1)


def test_amplification_factor_by_hand():
    # W = diag(10, 1, 1, 1); ΔW = 2 e2 e2ᵀ: it lies where W has gain 1, so 2 / |e2ᵀ W e2| = 2.
    W = np.diag([10.0, 1.0, 1.0, 1.0])
    delta = np.zeros((4, 4))
    delta[1, 1] = 2.0
    assert amplification_factor(delta, W, 1) == pytest.approx(2.0)
    # Along W's strongest direction the same ΔW is "amplified" far less.
    delta_top = np.zeros((4, 4))
    delta_top[0, 0] = 2.0
    assert amplification_factor(delta_top, W, 1) == pytest.approx(0.2)
    assert projection_norm(W, np.eye(4)[:, :2], np.eye(4)[:, :2]) == pytest.approx(np.sqrt(101.0))


def test_adapter_factors_rebuild_delta_weight():
    layer = LoraLinear(Linear(6, 5, rng=np.random.default_rng(0)),
                       LoraConfig(r=2, lora_alpha=8, init_lora_weights=False), np.random.default_rng(1))
    A, B, s = adapter_factors(layer)
    assert A.shape == (2, 6) and B.shape == (5, 2) and s == 4.0
    assert np.allclose(s * B @ A, layer.delta_weight())

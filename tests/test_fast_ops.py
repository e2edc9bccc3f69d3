"""Every optimised op against its plain reference, on random inputs, in float64 and float32.

The fast ops in functional.py and backend.py reorder the arithmetic (BLAS reductions, fewer
passes, a segment sum, FlashAttention's row-sum identity). Each reference here is the textbook
formula written the obvious way; forward values and input gradients must agree.
"""
import math
import platform

import numpy as np
import pytest

from lora_numpy import Tensor, backend
from lora_numpy import functional as F

TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-5)}
DTYPES = [np.float64, np.float32]


def run(op, arrays, upstream_seed=0):
    """Forward ``op`` on tensors of ``arrays``, backward a random upstream gradient:
    (output array, [gradient of each input])."""
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = op(*tensors)
    g = np.random.default_rng(upstream_seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(g)
    return out.data, [t.grad for t in tensors], g


def check(got, expected, dtype):
    assert got.dtype == dtype, f"{got.dtype} leaked into a {dtype.__name__} op"
    np.testing.assert_allclose(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_blas_reductions_match_numpys(dtype):
    a = np.random.default_rng(1).standard_normal((300, 7, 37)).astype(dtype)
    check(F._sum_rows(a.reshape(-1, 37)), a.reshape(-1, 37).sum(axis=0), dtype)
    check(F._mean_last(a), a.mean(axis=-1, keepdims=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bias_gradient(dtype):
    rng = np.random.default_rng(2)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((4, 9, 6), (5, 6), (5,)))
    out, (gx, gw, gb), g = run(F.linear, [x, w, b])
    check(out, x @ w.T + b, dtype)
    check(gb, g.sum(axis=(0, 1)), dtype)
    check(gw, np.einsum("nto,nti->oi", g, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_the_tanh_form(dtype):
    x = (np.random.default_rng(3).standard_normal((64, 50)) * 3).astype(dtype)
    c, k = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(c * (x + k * x ** 3))
    out, (gx,), g = run(F.gelu, [x])
    check(out, 0.5 * x * (1 + t), dtype)
    check(gx, g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * k * x * x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_the_plain_formula(dtype):
    rng = np.random.default_rng(4)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((3, 10, 16), (16,), (16,)))
    eps = 1e-5
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    out, (gx, gw, gb), g = run(lambda x, w, b: F.layer_norm(x, w, b, eps), [x, w, b])
    check(out, xhat * w + b, dtype)
    gh = g * w
    expected_dx = (gh - gh.mean(-1, keepdims=True) - xhat * (gh * xhat).mean(-1, keepdims=True)) \
        / np.sqrt(var + eps)
    check(gx, expected_dx, dtype)
    check(gw, (g * xhat).sum(axis=(0, 1)), dtype)
    check(gb, g.sum(axis=(0, 1)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_backward_matches_the_plain_softmax_jacobian(dtype):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 3, 7, 4)).astype(dtype) for _ in range(3))
    scale = 1 / math.sqrt(4)
    s = q @ k.swapaxes(-1, -2) * scale + np.triu(np.full((7, 7), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out, (gq, gk, gv), g = run(F.scaled_dot_product_attention, [q, k, v])
    check(out, p @ v, dtype)
    dp = g @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))  # the T×T row sum the fast op avoids
    check(gq, ds @ k * scale, dtype)
    check(gk, ds.swapaxes(-1, -2) @ q * scale, dtype)
    check(gv, p.swapaxes(-1, -2) @ g, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_log_softmax_and_pick(dtype):
    rng = np.random.default_rng(6)
    z = (rng.standard_normal((40, 11)) * 4).astype(dtype)
    t = rng.integers(0, 11, 40)
    t[::7] = -100
    weight = rng.uniform(0.5, 2, 11).astype(dtype)
    out, (gz,), g = run(lambda z: F.cross_entropy(z, t, weight=weight), [z])
    counted = t != -100
    safe = np.where(counted, t, 0)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    w = counted * weight[safe]
    check(out, -(w * logp[np.arange(40), safe]).sum() / w.sum(), dtype)
    onehot = np.eye(11, dtype=dtype)[safe]
    check(gz, (np.exp(logp) - onehot) * (g * w / w.sum())[:, None], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_matches_add_at(dtype):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 13, 200)  # repeats, and ids 0..12 not all present
    rows = rng.standard_normal((200, 5)).astype(dtype)
    target = rng.standard_normal((13, 5)).astype(dtype)
    expected = target.copy()
    np.add.at(expected, ids, rows)
    backend.index_add_rows(target, ids, rows)
    check(target, expected, dtype)
    backend.index_add_rows(target, ids[:0], rows[:0])  # no ids: nothing to add
    check(target, expected, dtype)


def test_embedding_backward_adds_repeated_ids():
    weight = Tensor(np.zeros((4, 3), dtype=np.float32), requires_grad=True)
    ids = np.array([[1, 3, 1], [1, 0, 3]])
    F.embedding(ids, weight).sum().backward()
    np.testing.assert_array_equal(weight.grad[:, 0], [1, 3, 0, 2])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the malloc setting is glibc's")
def test_keep_freed_host_memory_reports_glibc_accepts_it():
    assert backend.keep_freed_host_memory(False) is True
    assert backend.keep_freed_host_memory(True) is True

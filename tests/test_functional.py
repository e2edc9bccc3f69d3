"""Fused ops: finite-difference checks, numerical stability, and the conventions PyTorch uses."""
import numpy as np
import pytest

from lora_numpy import Tensor
from lora_numpy import functional as F
from lora_numpy.gradcheck import gradcheck


def test_softmax_and_log_softmax(t64):
    x = t64(2, 3, 5)
    assert gradcheck(lambda x: F.softmax(x, axis=-1), [x])
    assert gradcheck(lambda x: F.softmax(x, axis=1), [x])
    assert gradcheck(lambda x: F.log_softmax(x), [x])
    np.testing.assert_allclose(F.softmax(x).data.sum(-1), 1.0)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_cross_entropy(t64, rng, shape):
    logits = t64(*shape)
    targets = rng.integers(0, 5, size=shape[:-1])
    assert gradcheck(lambda z: F.cross_entropy(z, targets), [logits])
    # the plain mean of -log p[target]
    logp = F.log_softmax(logits).data.reshape(-1, 5)
    expected = -logp[np.arange(logp.shape[0]), targets.reshape(-1)].mean()
    assert F.cross_entropy(logits, targets).item() == pytest.approx(expected)


def test_cross_entropy_ignore_index_and_class_weights(t64, rng):
    logits = t64(8, 4)
    targets = np.array([0, 1, -100, 3, 2, -100, 1, 0])
    weight = np.array([1.0, 2.0, 0.5, 3.0])
    assert gradcheck(lambda z: F.cross_entropy(z, targets, weight=weight), [logits])
    assert gradcheck(lambda z: F.cross_entropy(z, targets), [logits])
    kept = targets != -100
    logp = F.log_softmax(logits).data[kept, targets[kept]]
    w = weight[targets[kept]]
    assert F.cross_entropy(logits, targets, weight=weight).item() == pytest.approx(-(w * logp).sum() / w.sum())
    assert F.cross_entropy(logits, targets).item() == pytest.approx(-logp.mean())
    logits.grad = None
    F.cross_entropy(logits, targets).backward()
    assert np.all(logits.grad[~kept] == 0)  # ignored rows get no gradient


def test_cross_entropy_rejects_out_of_range_targets(t64):
    with pytest.raises(ValueError, match=r"target ids \[7\] are outside \[0, 4\)"):
        F.cross_entropy(t64(2, 4), np.array([1, 7]))


def test_layer_norm(t64):
    x, w, b = t64(2, 3, 6), t64(6), t64(6)
    assert gradcheck(lambda x, w, b: F.layer_norm(x, w, b), [x, w, b])
    assert gradcheck(lambda x: F.layer_norm(x), [x])
    y = F.layer_norm(x).data
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)  # var/(var+eps), eps = 1e-5


def test_gelu_is_the_tanh_form(t64):
    x = t64(3, 7, scale=2.0)
    assert gradcheck(F.gelu, [x])
    a = x.data
    expected = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    np.testing.assert_allclose(F.gelu(x).data, expected)


def test_dropout(t64):
    x = t64(4, 50)
    assert gradcheck(lambda x: F.dropout(x, 0.3, True, np.random.default_rng(0)), [x])
    assert F.dropout(x, 0.3, False, None) is x
    y = F.dropout(Tensor(np.ones((200, 200), dtype=np.float32)), 0.25, True, np.random.default_rng(1)).data
    assert abs((y == 0).mean() - 0.25) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)  # survivors scaled up
    assert y.dtype == np.float32
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, 1.0, True, np.random.default_rng(0))


def test_embedding_with_repeated_ids(t64):
    weight = t64(5, 3)
    ids = np.array([[0, 2, 2], [4, 2, 0]])
    assert gradcheck(lambda w: F.embedding(ids, w), [weight])
    weight.grad = None
    F.embedding(ids, weight).sum().backward()
    np.testing.assert_allclose(weight.grad[:, 0], [2, 0, 3, 0, 1])  # uses of each row
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        F.embedding(np.array([5]), weight)


def test_linear_and_frozen_weight(t64):
    x, w, b = t64(2, 3, 4), t64(5, 4), t64(5)
    assert gradcheck(F.linear, [x, w, b])
    np.testing.assert_allclose(F.linear(x, w, b).data, x.data @ w.data.T + b.data)
    w.requires_grad, w.grad, x.grad = False, None, None
    F.linear(x, w, b).sum().backward()
    assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("causal", [True, False])
def test_scaled_dot_product_attention(t64, causal):
    q, k, v = t64(2, 2, 5, 4), t64(2, 2, 5, 4), t64(2, 2, 5, 3)
    assert gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal), [q, k, v])


def test_attention_is_causal_and_scaled(t64):
    q, k, v = t64(1, 4, 8), t64(1, 4, 8), t64(1, 4, 8)
    p = F.attention_weights(q, k, causal=True)[0]
    assert np.all(np.triu(p, k=1) == 0)  # no query sees a later key
    scores = q.data[0] @ k.data[0].T / np.sqrt(8)
    e = np.exp(scores[1, :2] - scores[1, :2].max())
    np.testing.assert_allclose(p[1, :2], e / e.sum())
    out = F.scaled_dot_product_attention(q, k, v).data
    v2 = v.data.copy()
    v2[0, 3] += 100.0  # changing the last position's value leaves earlier outputs alone
    out2 = F.scaled_dot_product_attention(q, k, Tensor(v2)).data
    np.testing.assert_allclose(out[0, :3], out2[0, :3])


def test_ops_stay_finite_for_huge_logits():
    big = Tensor(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], dtype=np.float32), requires_grad=True)
    for y in (F.softmax(big), F.log_softmax(big), F.gelu(big), F.layer_norm(big)):
        y.backward(np.ones(y.shape, dtype=np.float32))
        assert np.all(np.isfinite(y.data)) and np.all(np.isfinite(big.grad))
        big.grad = None
    loss = F.cross_entropy(big, np.array([1, 2]))
    loss.backward()
    assert loss.item() == pytest.approx(1e4 * 2 / 2) and np.all(np.isfinite(big.grad))
    q = Tensor(np.full((1, 3, 2), 1e2, dtype=np.float32), requires_grad=True)
    att = F.scaled_dot_product_attention(q, q * -1.0, q)
    att.sum().backward()
    assert np.all(np.isfinite(att.data)) and np.all(np.isfinite(q.grad))


def test_fused_ops_keep_float32():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 8)).astype(np.float32), requires_grad=True)
    w = Tensor(np.ones(8, dtype=np.float32), requires_grad=True)
    y = F.layer_norm(F.gelu(x), w, w)
    y = F.scaled_dot_product_attention(y, y, y)
    loss = F.cross_entropy(F.log_softmax(y), np.zeros((2, 4), dtype=np.int64))
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


def test_one_seed_gives_bit_identical_runs():
    def run(seed):
        rng = np.random.default_rng(seed)
        x = Tensor(rng.standard_normal((4, 16)).astype(np.float32), requires_grad=True)
        w = Tensor(rng.standard_normal((8, 16)).astype(np.float32), requires_grad=True)
        h = F.dropout(F.gelu(F.linear(x, w)), 0.5, True, rng)
        loss = F.cross_entropy(h, rng.integers(0, 8, size=4))
        loss.backward()
        return loss.data, x.grad, w.grad
    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()
    assert first[0].tobytes() != other[0].tobytes()


def test_attention_broadcasts_batch_axes_like_matmul():
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 5, 4)).astype(np.float32)  # one k for both batch rows
    p = F.attention_weights(Tensor(q), Tensor(k))
    np.testing.assert_allclose(p[1], F.attention_weights(Tensor(q[1:]), Tensor(k))[0], rtol=1e-6)
    assert p.shape == (2, 3, 5, 5)
    out = F.scaled_dot_product_attention(Tensor(q, requires_grad=True), Tensor(k, requires_grad=True),
                                         Tensor(k, requires_grad=True))
    assert out.shape == (2, 3, 5, 4)

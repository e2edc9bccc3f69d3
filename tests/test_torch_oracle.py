"""PyTorch as an optional oracle: the same inputs through both engines, values and gradients
compared. Skipped when torch is not installed; nothing else depends on it."""
import numpy as np
import pytest

from lora_numpy import Tensor
from lora_numpy import functional as F

torch = pytest.importorskip("torch", exc_type=ImportError)
TF = torch.nn.functional


def pair(array):
    return Tensor(array.copy(), requires_grad=True), torch.tensor(array.copy(), requires_grad=True)


def test_attention_block_matches_torch():
    rng = np.random.default_rng(0)
    x_np, w_np, b_np = rng.standard_normal((2, 6, 8)), rng.standard_normal((24, 8)) * 0.3, rng.standard_normal(24)
    g_np, ln_np = rng.standard_normal(8), rng.standard_normal(8)
    targets = rng.integers(0, 8, size=(2, 6))
    targets[0, :2] = -100
    class_weight = rng.random(8) + 0.5

    def ours():
        x, w, b, g, ln = (Tensor(a, requires_grad=True) for a in (x_np, w_np, b_np, g_np, ln_np))
        h = F.layer_norm(x, g, ln)
        qkv = F.linear(h, w, b).reshape(2, 6, 3, 2, 4)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        att = F.scaled_dot_product_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 6, 8)
        logits = F.gelu(att) + x
        loss = F.cross_entropy(logits, targets, weight=class_weight)
        loss.backward()
        return loss.item(), [t.grad for t in (x, w, b, g, ln)]

    def theirs():
        x, w, b, g, ln = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np, g_np, ln_np))
        h = TF.layer_norm(x, (8,), g, ln, eps=1e-5)
        qkv = TF.linear(h, w, b).reshape(2, 6, 3, 2, 4)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        att = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 8)
        logits = TF.gelu(att, approximate="tanh") + x
        loss = TF.cross_entropy(logits.reshape(-1, 8), torch.tensor(targets).reshape(-1),
                                weight=torch.tensor(class_weight), ignore_index=-100)
        loss.backward()
        return loss.item(), [t.grad.numpy() for t in (x, w, b, g, ln)]

    (loss_a, grads_a), (loss_b, grads_b) = ours(), theirs()
    assert loss_a == pytest.approx(loss_b, rel=1e-10)
    for ga, gb in zip(grads_a, grads_b):
        np.testing.assert_allclose(ga, gb, rtol=1e-8, atol=1e-10)


def test_broadcast_matmul_and_embedding_match_torch():
    rng = np.random.default_rng(1)
    a, ta = pair(rng.standard_normal((2, 1, 3, 4)))
    b, tb = pair(rng.standard_normal((5, 4, 2)))
    e, te = pair(rng.standard_normal((7, 3)))
    ids = rng.integers(0, 7, size=(4, 5))
    upstream = rng.standard_normal((2, 5, 3, 2))
    ((a @ b) * upstream).sum().backward()
    ((ta @ tb) * torch.tensor(upstream)).sum().backward()
    np.testing.assert_allclose(a.grad, ta.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(b.grad, tb.grad.numpy(), rtol=1e-10)
    (F.embedding(ids, e) ** 2).sum().backward()
    (TF.embedding(torch.tensor(ids), te) ** 2).sum().backward()
    np.testing.assert_allclose(e.grad, te.grad.numpy(), rtol=1e-10)

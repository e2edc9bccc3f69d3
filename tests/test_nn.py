"""Floor 4: Module bookkeeping (names, modes, state dicts), the layers' forward passes and
PyTorch default inits, and a float64 gradient check of every layer."""
import math

import numpy as np
import pytest

from lora_numpy import Tensor, backend
from lora_numpy.gradcheck import gradcheck
from lora_numpy.nn import (Dropout, Embedding, LayerNorm, Linear, LoadResult, Module, ModuleList,
                           Parameter)


def _np(a):
    return backend.to_numpy(a)


class Pair(Module):
    """Two parameters assigned in the order b, a (not alphabetical) and a child Linear."""

    def __init__(self, rng):
        self.b = Parameter(backend.asarray(rng.standard_normal((3,)).astype(np.float32)))
        self.a = Parameter(backend.asarray(rng.standard_normal((2, 3)).astype(np.float32)))
        self.note = "not a parameter"
        self.proj = Linear(3, 4, rng=rng)

    def forward(self, x):
        return self.proj(x * self.b + x @ self.a.T @ self.a)


class Stack(Module):
    """A ModuleList of Linears plus a head; ``tie`` makes blocks[1] share blocks[0]'s weight."""

    def __init__(self, rng, tie=False):
        self.blocks = ModuleList([Linear(3, 3, rng=rng), Linear(3, 3, bias=False, rng=rng)])
        self.head = Linear(3, 2, rng=rng)
        if tie:
            self.blocks[1].weight = self.blocks[0].weight

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# ---- names and registration -----------------------------------------------------------------
def test_parameters_register_in_assignment_order(rng):
    """Attribute assignment registers Parameters and sub-modules in assignment order; other
    attributes are ignored."""
    m = Pair(rng)
    assert [n for n, _ in m.named_parameters()] == ["b", "a", "proj.weight", "proj.bias"]
    assert [p for p in m.parameters()] == [m.b, m.a, m.proj.weight, m.proj.bias]
    assert m.num_parameters() == 3 + 6 + 12 + 4


def test_named_parameters_use_dotted_paths_with_list_indices(rng):
    """ModuleList children are named by index, so paths read ``blocks.0.weight``; a bias=False
    Linear has no bias entry."""
    m = Stack(rng)
    assert [n for n, _ in m.named_parameters()] == [
        "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "head.weight", "head.bias"]
    assert [n for n, _ in m.named_modules()] == ["", "blocks", "blocks.0", "blocks.1", "head"]
    assert dict(m.named_modules())["blocks.1"] is m.blocks[1]
    assert len(m.blocks) == 2 and list(m.blocks) == [m.blocks[0], m.blocks[1]]


def test_shared_parameter_appears_once(rng):
    """A parameter reachable under two names is listed (and counted) once, under the name met
    first in module order (PyTorch's rule for tied weights)."""
    m = Stack(rng, tie=True)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["blocks.0.weight", "blocks.0.bias", "head.weight", "head.bias"]
    assert len(m.parameters()) == 4
    assert m.num_parameters() == Stack(rng).num_parameters() - 9
    assert list(m.state_dict()) == names


def test_get_submodule(rng):
    """``get_submodule`` follows dotted paths, list indices included; "" is the root."""
    m = Stack(rng)
    assert m.get_submodule("") is m
    assert m.get_submodule("blocks.1") is m.blocks[1]
    assert m.get_submodule("head") is m.head
    with pytest.raises(AttributeError):
        m.get_submodule("blocks.7")


def test_module_list_index_out_of_range_raises(rng):
    """Like a Python list (and torch.nn.ModuleList), an index past the end is an IndexError
    while -1 is the last element."""
    blocks = ModuleList([Linear(2, 2, rng=rng), Linear(2, 2, rng=rng)])
    assert blocks[-1] is blocks[1]
    with pytest.raises(IndexError):
        blocks[2]


# ---- Linear, Embedding, LayerNorm, Dropout -------------------------------------------------
def test_linear_shapes_and_forward(rng):
    """weight is (out, in), bias (out,), and forward is x @ W.T + b over any leading axes."""
    lin = Linear(5, 3, rng=rng)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (3,)
    assert lin.weight.dtype == np.float32
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    y = lin(Tensor(x))
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(_np(y.data), x @ _np(lin.weight.data).T + _np(lin.bias.data),
                               rtol=1e-5, atol=1e-6)
    nobias = Linear(5, 3, bias=False, rng=rng)
    assert nobias.bias is None
    assert [n for n, _ in nobias.named_parameters()] == ["weight"]
    np.testing.assert_allclose(_np(nobias(Tensor(x)).data), x @ _np(nobias.weight.data).T,
                               rtol=1e-5, atol=1e-6)


def test_linear_init_is_pytorch_uniform():
    """weight and bias lie in ±1/sqrt(in) and are uniform: std ≈ bound/sqrt(3), values reach the
    bound, and a seeded rng reproduces them."""
    n_in, n_out = 256, 512
    lin = Linear(n_in, n_out, rng=np.random.default_rng(0))
    bound = 1 / math.sqrt(n_in)
    w, b = _np(lin.weight.data), _np(lin.bias.data)
    for values in (w, b):
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.98 * bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.02
    assert abs(w.mean()) < 0.02 * bound
    assert abs(b.std() / (bound / math.sqrt(3)) - 1) < 0.15
    # uniform, not normal: the kurtosis of U(-a, a) is 1.8 (a normal's is 3)
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert abs(kurtosis - 1.8) < 0.05
    again = Linear(n_in, n_out, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(_np(again.weight.data), w)


def test_embedding_init_and_lookup():
    """Embedding weight starts N(0, 1) and forward picks rows by id."""
    emb = Embedding(1000, 64, rng=np.random.default_rng(0))
    w = _np(emb.weight.data)
    assert w.shape == (1000, 64) and w.dtype == np.float32
    assert abs(w.std() - 1) < 0.02 and abs(w.mean()) < 0.02
    ids = np.array([[3, 999, 3], [0, 1, 2]])
    np.testing.assert_array_equal(_np(emb(ids).data), w[ids])


def test_layer_norm_init_and_eps():
    """LayerNorm starts with weight 1 and bias 0 and uses eps = 1e-5 inside the square root."""
    ln = LayerNorm(4)
    np.testing.assert_array_equal(_np(ln.weight.data), np.ones(4))
    np.testing.assert_array_equal(_np(ln.bias.data), np.zeros(4))
    assert ln.eps == 1e-5
    # a tiny variance (1.25e-7) makes eps matter: the result differs visibly from eps = 0
    x = np.array([[0.0, 1e-3, 2e-3, 3e-3 / 3]], dtype=np.float64)
    ln.to("float64")
    xc = x - x.mean(-1, keepdims=True)
    expected = xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(_np(ln(Tensor(x)).data), expected, rtol=1e-10)
    assert not np.allclose(expected, xc / np.sqrt((xc ** 2).mean(-1, keepdims=True)), rtol=1e-2)


def test_dropout_eval_identity_and_train_masks():
    """Dropout is the identity in eval mode; in train mode it zeroes about p of the elements
    and scales the rest by 1/(1-p); the same seed draws the same mask."""
    x = Tensor(np.ones((200, 100), dtype=np.float32))
    drop = Dropout(0.3, rng=np.random.default_rng(0))
    drop.eval()
    np.testing.assert_array_equal(_np(drop(x).data), _np(x.data))
    drop.train()
    y = _np(drop(x).data)
    assert abs((y == 0).mean() - 0.3) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    y2 = _np(Dropout(0.3, rng=np.random.default_rng(0))(x).data)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(y, _np(drop(x).data))  # the generator moves on: a new mask
    with pytest.raises(ValueError):
        Dropout(1.0)


# ---- modes, gradients, dtypes ------------------------------------------------------------------
def test_train_eval_propagate_to_children(rng):
    """train()/eval() set ``training`` on every module in the tree and return the module."""
    m = Stack(rng)
    assert m.eval() is m
    assert all(not mod.training for _, mod in m.named_modules())
    assert m.train() is m
    assert all(mod.training for _, mod in m.named_modules())
    m.train(False)
    assert not m.blocks[1].training and not m.head.training


def test_requires_grad_and_zero_grad(rng):
    """requires_grad_(False) freezes every parameter (no graph is recorded); zero_grad clears
    the gradients a backward left."""
    m = Stack(rng)
    x = Tensor(rng.standard_normal((4, 3)).astype(np.float32))
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    assert m.requires_grad_(False) is m
    assert all(not p.requires_grad for p in m.parameters())
    assert m.num_parameters(trainable_only=True) == 0
    assert not m(x).requires_grad
    m.requires_grad_(True)
    assert m.num_parameters(trainable_only=True) == m.num_parameters()


def test_to_float64_casts_values_and_drops_grads(rng):
    """to("float64") casts every parameter without changing its value and clears grads."""
    m = Stack(rng)
    before = {k: _np(v).copy() for k, v in m.state_dict().items()}
    m(Tensor(rng.standard_normal((2, 3)).astype(np.float32))).sum().backward()
    m.to("float64")
    for name, p in m.named_parameters():
        assert p.dtype == np.float64 and p.grad is None
        np.testing.assert_array_equal(_np(p.data), before[name].astype(np.float64))
    assert m(Tensor(np.ones((1, 3)), dtype="float64")).dtype == np.float64


# ---- state dicts -----------------------------------------------------------------------------
def test_state_dict_round_trip_into_fresh_module():
    """Loading a state dict into a differently initialised module makes every array equal,
    as a copy (later changes to the source do not leak)."""
    src = Stack(np.random.default_rng(1))
    dst = Stack(np.random.default_rng(2))
    assert not np.array_equal(_np(src.head.weight.data), _np(dst.head.weight.data))
    result = dst.load_state_dict(src.state_dict())
    assert isinstance(result, LoadResult)
    assert result.missing_keys == [] and result.unexpected_keys == []
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert list(sd_src) == list(sd_dst)
    for k in sd_src:
        np.testing.assert_array_equal(_np(sd_dst[k]), _np(sd_src[k]))
    src.head.weight.data[...] = 0
    assert np.any(_np(dst.head.weight.data) != 0)
    x = Tensor(np.ones((2, 3), dtype=np.float32))
    src2 = Stack(np.random.default_rng(1))
    np.testing.assert_array_equal(_np(dst(x).data), _np(src2(x).data))


def test_load_state_dict_strict_reports_every_problem_and_writes_nothing():
    """A strict load with a missing key, an unexpected key and a shape mismatch raises one
    error naming all three, and leaves every parameter unchanged."""
    m = Stack(np.random.default_rng(1))
    other = Stack(np.random.default_rng(2)).state_dict()
    before = {k: _np(v).copy() for k, v in m.state_dict().items()}
    bad = dict(other)
    del bad["blocks.1.weight"]
    bad["extra.weight"] = np.zeros((2, 2), dtype=np.float32)
    bad["head.weight"] = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(RuntimeError) as info:
        m.load_state_dict(bad)
    message = str(info.value)
    assert "blocks.1.weight" in message and "missing" in message
    assert "extra.weight" in message and "unexpected" in message
    assert "head.weight" in message and "(5, 3)" in message and "(2, 3)" in message
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(_np(v), before[k])


def test_load_state_dict_non_strict_returns_missing_and_unexpected():
    """strict=False loads the keys that fit and returns the missing and unexpected names."""
    m = Stack(np.random.default_rng(1))
    other = Stack(np.random.default_rng(2)).state_dict()
    untouched = _np(m.blocks[1].weight.data).copy()
    partial = {k: v for k, v in other.items() if k != "blocks.1.weight"}
    partial["extra"] = np.zeros(3, dtype=np.float32)
    result = m.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["blocks.1.weight"]
    assert result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(_np(m.head.weight.data), _np(other["head.weight"]))
    np.testing.assert_array_equal(_np(m.blocks[1].weight.data), untouched)
    with pytest.raises(RuntimeError, match="head.bias"):  # shapes must fit even when not strict
        m.load_state_dict({"head.bias": np.zeros(7, dtype=np.float32)}, strict=False)


# ---- gradient checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck(t64, bias):
    """Linear's backward matches finite differences for the input, weight and bias."""
    lin = Linear(4, 3, bias=bias, rng=np.random.default_rng(0)).to("float64")
    x = t64(2, 5, 4)
    params = [lin.weight] + ([lin.bias] if bias else [])
    assert gradcheck(lambda x, *ps: lin(x), [x, *params])


def test_embedding_gradcheck():
    """Embedding's backward (repeated ids included) matches finite differences."""
    emb = Embedding(6, 4, rng=np.random.default_rng(0)).to("float64")
    ids = np.array([[0, 2, 2, 5], [5, 1, 0, 0]])
    assert gradcheck(lambda w: emb(ids), [emb.weight])


def test_layer_norm_gradcheck(t64):
    """LayerNorm's backward matches finite differences for input, weight and bias (with
    non-trivial weight and bias)."""
    ln = LayerNorm(5).to("float64")
    ln.weight.data[...] = backend.asarray(np.random.default_rng(0).standard_normal(5))
    ln.bias.data[...] = backend.asarray(np.random.default_rng(1).standard_normal(5))
    x = t64(3, 2, 5)
    assert gradcheck(lambda x, w, b: ln(x), [x, ln.weight, ln.bias])


def test_dropout_gradcheck(t64):
    """Dropout's backward (a fixed mask, re-drawn from the same seed each call) matches finite
    differences."""
    drop = Dropout(0.4)
    x = t64(4, 6)

    def fn(x):
        drop.rng = np.random.default_rng(7)
        return drop(x)
    assert (fn(x).data == 0).any()
    assert gradcheck(fn, [x])

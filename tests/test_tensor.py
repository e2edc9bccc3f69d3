"""The autograd engine: every elementary op against finite differences, and the engine's
promises (no wasted gradients, long chains, freed graphs, accumulation, clear errors)."""
import gc
import sys
import tracemalloc

import numpy as np
import pytest

from lora_numpy import Tensor, backend, cat, no_grad, stack, where
from lora_numpy.gradcheck import GradcheckError, gradcheck
from lora_numpy.tensor import matmul

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b * b + 1.0),
}
# (shape of a, shape of b): equal, broadcast of a row, of a column, of a scalar, of leading axes
BROADCASTS = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), ()), ((4,), (2, 3, 4))]


@pytest.mark.parametrize("op", sorted(BINARY))
@pytest.mark.parametrize("shapes", BROADCASTS)
def test_binary_ops_with_broadcasting(t64, op, shapes):
    a, b = t64(*shapes[0]), t64(*shapes[1])
    assert gradcheck(BINARY[op], [a, b])
    assert a.grad.shape == a.shape and b.grad.shape == b.shape  # summed back to the operand


UNARY = {
    "neg": lambda x: -x,
    "exp": lambda x: x.exp(),
    "log": lambda x: (x * x + 0.5).log(),
    "tanh": lambda x: x.tanh(),
    "sqrt": lambda x: (x * x + 0.5).sqrt(),
    "relu": lambda x: x.relu(),
    "pow": lambda x: (x * x + 0.5) ** 1.5,
    "reshape": lambda x: x.reshape(4, 6),
    "transpose": lambda x: x.transpose(0, 2),
    "T": lambda x: x.T,
    "sum_all": lambda x: x.sum(),
    "sum_axis": lambda x: x.sum(axis=1),
    "sum_keepdims": lambda x: x.sum(axis=-1, keepdims=True),
    "sum_tuple": lambda x: x.sum(axis=(0, 2)),
    "mean_all": lambda x: x.mean(),
    "mean_axis": lambda x: x.mean(axis=0, keepdims=True),
    "max_all": lambda x: x.max(),
    "max_axis": lambda x: x.max(axis=-1),
    "slice": lambda x: x[1:, ::2, 0],
    "int_index": lambda x: x[0],
    "fancy_repeated": lambda x: x[np.array([0, 1, 0, 0])],
    "fancy_tuple": lambda x: x[np.array([1, 1, 0]), :, np.array([2, 2, 3])],
    "masked_fill": lambda x: x.masked_fill(np.arange(4) % 2 == 0, 7.0),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_and_shape_ops(t64, op):
    x = t64(2, 3, 4)
    if op == "relu":  # keep values away from the kink at 0, where the derivative jumps
        x.data += np.sign(x.data) * 0.1
    assert gradcheck(UNARY[op], [x])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                                    ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 5)), ((3, 4), (4,)),
                                    ((4,), (4,))])
def test_batched_matmul(t64, shapes):
    a, b = t64(*shapes[0]), t64(*shapes[1])
    assert gradcheck(lambda a, b: a @ b, [a, b])
    assert (a @ b).shape == np.matmul(a.data, b.data).shape


def test_cat_stack_where(t64):
    a, b, c = t64(2, 3), t64(2, 5), t64(2, 3)
    assert gradcheck(lambda a, b: cat([a, b], axis=1), [a, b])
    assert gradcheck(lambda a, c: cat([a, c], axis=0), [a, c])
    assert gradcheck(lambda a, c: stack([a, c], axis=1), [a, c])
    cond = np.array([[True, False, True], [False, False, True]])
    assert gradcheck(lambda a, c: where(cond, a, c), [a, c])


def test_gradcheck_catches_a_wrong_backward(t64):
    x = t64(3, 4)

    def wrong_square(x):  # claims d(x²)/dx = x instead of 2x
        out = Tensor.from_op(x.data ** 2, (x,), lambda g: (g * x.data,), "bad")
        return out
    with pytest.raises(GradcheckError, match="gradient mismatch"):
        gradcheck(wrong_square, [x])


def test_gradcheck_refuses_float32():
    x = Tensor(np.ones(3), requires_grad=True, dtype="float32")
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * 2, [x])


# ---- the engine's promises ------------------------------------------------------------

def test_frozen_weight_gets_no_gradient_and_no_dW_is_computed(rng):
    """x @ W.T with W frozen: backward builds dX and never allocates a W-sized dW."""
    d = 1024  # W is 4 MiB in float32; x is 8 KiB
    W = Tensor(rng.standard_normal((d, d)).astype(np.float32))
    x = Tensor(rng.standard_normal((2, d)).astype(np.float32), requires_grad=True)

    def peak_backward_bytes(W):
        y = (x @ W.T).sum()
        tracemalloc.start()
        y.backward()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    frozen_peak = peak_backward_bytes(W)
    assert W.grad is None and x.grad is not None
    assert frozen_peak < W.data.nbytes / 4, frozen_peak

    W.requires_grad = True  # the same computation with W trainable does allocate dW
    assert peak_backward_bytes(W) >= W.data.nbytes
    assert W.grad.shape == W.shape


def test_backward_skips_branches_that_need_no_gradient():
    calls = []
    frozen = Tensor(np.ones(3))
    x = Tensor(np.ones(3), requires_grad=True)
    y = frozen * 2  # no input requires grad: no node is recorded
    assert not y.requires_grad and y._backward is None
    z = Tensor.from_op(x.data + y.data, (x, y), lambda g: (calls.append(1) or g, None), "probe")
    z.sum().backward()
    assert calls == [1] and frozen.grad is None


def test_from_op_checks_the_count_and_shapes_of_the_gradients():
    x = Tensor(np.ones(3), requires_grad=True)
    y = Tensor(np.ones((2, 3)), requires_grad=True)
    too_few = Tensor.from_op(x.data + y.data, (x, y), lambda g: (g.sum(axis=0),), "too_few")
    with pytest.raises(RuntimeError, match="returned 1 gradients for 2 inputs"):
        too_few.sum().backward()
    swapped = Tensor.from_op(x.data + y.data, (x, y), lambda g: (g, g.sum(axis=0)), "swapped")
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\) for an input of shape \(3,\)"):
        swapped.sum().backward()
    right = Tensor.from_op(x.data + y.data, (x, y), lambda g: (g.sum(axis=0), g), "add_rows")
    right.sum().backward()
    assert np.array_equal(x.grad, [2.0, 2.0, 2.0]) and np.array_equal(y.grad, np.ones((2, 3)))


def test_ten_thousand_op_chain_backpropagates():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    assert sys.getrecursionlimit() < 10_000 * 2
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 10_000, rtol=1e-4)


def test_graph_memory_is_released_after_backward(rng):
    """The loss is still referenced, yet every array the forward pass saved is freed."""
    gc.collect()
    tracemalloc.start()
    x = Tensor(rng.standard_normal((256, 256)).astype(np.float32), requires_grad=True)
    base = tracemalloc.get_traced_memory()[0]
    h = x
    for _ in range(20):  # 20 intermediates of 256 KiB each stay alive through the graph
        h = (h * 0.5).tanh()
    loss = h.sum()
    held = tracemalloc.get_traced_memory()[0] - base
    del h
    loss.backward()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert held > 20 * x.data.nbytes
    assert after < 2.5 * x.data.nbytes, (held, after)  # x.grad plus small change
    assert loss._prev == () and loss._backward is None


def test_second_backward_through_freed_graph_is_a_clear_error():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()
    h = x * 3
    h.sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (h * 2).sum().backward()  # a new op on a tensor whose graph was freed


def test_retain_graph_allows_a_second_backward_and_gradients_accumulate():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * 2 * x.data)  # 2x, twice
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, 4 * x.data + 3)


def test_shared_subexpression_gradients_sum():
    x = Tensor(np.array(3.0), requires_grad=True)
    a = x * x
    (a + a * x).backward()  # d/dx (x² + x³) = 2x + 3x²
    assert x.grad == pytest.approx(2 * 3 + 3 * 9)


def test_no_grad_records_nothing_and_detach_cuts_the_graph():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y._prev == ()
    z = (x * 2).detach() * x
    z.sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 2.0])  # the detached factor is a constant


def test_retain_grad_keeps_an_intermediate_gradient():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)


def test_default_dtype_is_float32_and_numbers_do_not_promote():
    x = Tensor([1.0, 2.0], requires_grad=True)
    assert x.dtype == np.float32
    y = (x * np.float64(2.0) + 1.5) / 3 - np.sqrt(2.0)
    y = (y ** 2).exp().log().tanh().sqrt().mean()
    assert y.dtype == np.float32
    y.backward()
    assert x.grad.dtype == np.float32


@pytest.mark.parametrize("other", [np.arange(1, 4), Tensor(np.arange(1, 4)), np.int64(2), 2,
                                   np.array([True, False, True])], ids=["array", "tensor", "np-int", "int", "bool"])
@pytest.mark.parametrize("op", ["add", "radd", "sub", "rsub", "mul", "rmul", "div", "rdiv", "matmul", "where"])
def test_float32_with_integers_stays_float32_gradients_included(op, other):
    """PyTorch's promotion rule: a float32 tensor combined with an integer (or bool) array,
    tensor or number is float32, and so is the gradient (NumPy alone would give float64)."""
    x = Tensor(np.array([0.5, 1.5, 2.5], np.float32), requires_grad=True)
    fns = {"add": lambda a, b: a + b, "radd": lambda a, b: b + a, "sub": lambda a, b: a - b,
           "rsub": lambda a, b: b - a, "mul": lambda a, b: a * b, "rmul": lambda a, b: b * a,
           "div": lambda a, b: a / (b + 1), "rdiv": lambda a, b: (b + 1) / a,
           "matmul": lambda a, b: a.reshape(1, 3) @ (b + Tensor(np.zeros((3, 1), np.int64))),
           "where": lambda a, b: where(np.array([True, False, True]), a, b)}
    y = fns[op](x, other)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_integer_tensors_divide_to_float32_and_keep_float_numbers():
    """int / int is a float32 tensor (true division, as torch), and an int tensor times 2.5 is
    not truncated to 2; int + int stays an integer."""
    i, j = Tensor(np.array([1, 2, 3])), Tensor(np.array([2, 4, 4]))
    assert (i / j).dtype == np.float32
    np.testing.assert_array_equal((i / j).data, np.array([0.5, 0.5, 0.75], np.float32))
    np.testing.assert_array_equal((i * 2.5).data, np.array([2.5, 5.0, 7.5], np.float32))
    assert (i + j).dtype.kind == "i" and (i * 2).dtype.kind == "i"


def test_clear_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(4, 5\)"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match="non-scalar"):
        (x * 2).backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(2)).sum().backward()
    with pytest.raises(TypeError, match="exponent"):
        x ** x


def test_mixing_numpy_and_cupy_arrays_is_a_clear_error(monkeypatch):
    """Simulated without a GPU: an array type from the cupy module meets a NumPy array."""
    fake_cupy_array = type("ndarray", (np.ndarray,), {"__module__": "cupy._core.core"})
    a = Tensor(np.ones(3))
    b = Tensor(np.ones(3))
    b.data = np.ones(3).view(fake_cupy_array)
    with pytest.raises(TypeError, match="cannot mix a NumPy array and a CuPy array"):
        a + b
    with pytest.raises(TypeError, match="CuPy array while the backend is 'numpy'"):
        backend.asarray(b.data)


def test_set_backend_errors_clearly():
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        backend.set_backend("torch")
    if backend.name == "numpy":
        try:
            import cupy  # noqa: F401
            cupy.cuda.runtime.getDeviceCount()
        except Exception:
            with pytest.raises(RuntimeError, match="cupy"):
                backend.set_backend("cupy")
            assert backend.name == "numpy"

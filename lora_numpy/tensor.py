"""Floor 2: ``Tensor`` and the elementary ops, each with its local derivative.

Every op computes its result from ``.data`` and, when some input requires a gradient, records
a node: the inputs (``_prev``) and a closure (``_backward``) that maps the gradient of the
output to the gradient of each input. A closure computes the gradient of an input only if that
input requires one, so ``x @ W.T`` with a frozen ``W`` never builds ``dW`` (this is where LoRA
saves work). How ``backward()`` walks these nodes is in autograd.py.
"""
from __future__ import annotations

import numpy as np

from . import autograd
from . import backend
from .autograd import unbroadcast, run_backward


def _to_array(data, dtype=None):
    """Python numbers and lists become float32 (ints stay ints); arrays keep their dtype."""
    if isinstance(data, Tensor):
        data = data.data
    if dtype is None and not hasattr(data, "dtype"):
        array = backend.xp.asarray(data)
        if array.dtype.kind == "f":
            array = array.astype(backend.DEFAULT_DTYPE)
        return array
    return backend.asarray(data, dtype=dtype)


def _check_same_device(a, b):
    if type(a) is not type(b) and backend.is_cupy_array(a) != backend.is_cupy_array(b):
        raise TypeError(
            "cannot mix a NumPy array and a CuPy array in one op; move both to one device "
            "(backend.to_numpy(...) for the host, backend.asarray(...) for the current backend)"
        )


class Tensor:
    """An array with an optional gradient and the op that made it.

    ``data`` is a NumPy or CuPy array; ``grad`` is an array of the same shape (or None), set by
    ``backward()`` on leaves (tensors made by the user, such as parameters) and accumulated
    across calls until the user clears it.
    """

    __slots__ = ("data", "grad", "requires_grad", "_prev", "_backward", "_op", "_saved", "_freed",
                 "_retains_grad", "__weakref__")
    # Make `ndarray + Tensor` call Tensor.__radd__ instead of NumPy's elementwise loop.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _to_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only floating tensors can require grad, got dtype {self.data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._prev = ()
        self._backward = None
        self._op = ""
        self._saved = ()
        self._freed = False
        self._retains_grad = False

    # ---- basic properties -------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = f", grad_fn={self._op}" if self._op else (", requires_grad=True" if self.requires_grad else "")
        values = np.array2string(backend.to_numpy(self.data), precision=4, separator=", ")
        return f"Tensor({values}{grad})"

    def item(self) -> float:
        return self.data.item()

    def numpy(self):
        """The data as a NumPy array on the host (a copy when it lives on a GPU)."""
        return backend.to_numpy(self.data)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph: no gradient flows through the result."""
        return Tensor(self.data)

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward (for inspection)."""
        self._retains_grad = True

    # ---- graph recording --------------------------------------------------------------
    def _lift(self, other) -> "Tensor":
        if isinstance(other, Tensor):
            _check_same_device(self.data, other.data)
            return other
        if getattr(other, "ndim", 0) > 0:
            return Tensor(other)
        if self.data.dtype.kind != "f" and isinstance(other, (float, np.floating)):
            return Tensor(other)  # int tensor · 2.5: the number must not be truncated to 2
        # A plain number takes the tensor's dtype (PyTorch's rule), so `x * np.sqrt(2)`
        # keeps float32 instead of silently promoting to float64.
        return Tensor(backend.xp.asarray(other, dtype=self.data.dtype))

    def _operands(self, other) -> tuple:
        """(self, other) as tensors of one dtype family, by PyTorch's rule: a float tensor
        combined with an integer or bool one keeps the float dtype (NumPy would give float64
        for float32 + int64). The integer side never requires grad, so casting it is free."""
        a, b = self, self._lift(other)
        a_float, b_float = a.data.dtype.kind == "f", b.data.dtype.kind == "f"
        if a_float and not b_float:
            b = Tensor(b.data.astype(a.data.dtype))
        elif b_float and not a_float:
            a = Tensor(a.data.astype(b.data.dtype))
        return a, b

    @staticmethod
    def from_op(data, parents: tuple, backward, op: str, saved: tuple = ()) -> "Tensor":
        """The output of an op: how every op in tensor.py and functional.py records itself.

        ``data`` is the result array; ``parents`` the input tensors; ``backward(g)`` maps the
        gradient of the output to one gradient per parent, in the order of ``parents`` (None
        for a parent that needs none; autograd checks the count and the shapes); ``op`` names
        the node. ``saved`` lists every other array the backward reads, beyond the parents'
        data and ``data`` itself (PyTorch's ``ctx.save_for_backward``): the graph keeps them
        alive until backward, and memory.py counts them. The node is recorded only if a
        gradient can flow back.
        """
        out = Tensor.__new__(Tensor)
        out.data, out.grad, out._freed, out._retains_grad = data, None, False, False
        if autograd.grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad, out._prev, out._backward, out._op = True, tuple(parents), backward, op
            out._saved = tuple(saved)
        else:
            out.requires_grad, out._prev, out._backward, out._op, out._saved = False, (), None, "", ()
        return out

    # ---- backward ---------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the upstream gradient, needed when ``self`` is not a scalar.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input "
                               "of the ops that made it has requires_grad=True")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs a gradient: "
                    "reduce it to a scalar first (.sum(), .mean()) or pass grad= of that shape")
            grad = backend.xp.ones_like(self.data)
        else:
            grad = _to_array(grad, dtype=self.data.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape} but the tensor has shape {self.shape}")

        run_backward(self, grad, retain_graph)

    # ---- arithmetic -------------------------------------------------------------------
    def __add__(self, other):
        a, b = self._operands(other)

        def backward(g):  # d(a+b)/da = 1, d(a+b)/db = 1
            return (unbroadcast(g, a.shape) if a.requires_grad else None,
                    unbroadcast(g, b.shape) if b.requires_grad else None)
        return Tensor.from_op(a.data + b.data, (a, b), backward, "add")

    def __sub__(self, other):
        a, b = self._operands(other)

        def backward(g):  # d(a-b)/da = 1, d(a-b)/db = -1
            return (unbroadcast(g, a.shape) if a.requires_grad else None,
                    unbroadcast(-g, b.shape) if b.requires_grad else None)
        return Tensor.from_op(a.data - b.data, (a, b), backward, "sub")

    def __mul__(self, other):
        a, b = self._operands(other)

        def backward(g):  # d(ab)/da = b, d(ab)/db = a
            return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                    unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
        return Tensor.from_op(a.data * b.data, (a, b), backward, "mul")

    def __truediv__(self, other):
        a, b = self._operands(other)
        if a.data.dtype.kind != "f":  # int / int is a float tensor (default dtype), as in PyTorch
            a, b = Tensor(a.data, dtype=backend.DEFAULT_DTYPE), Tensor(b.data, dtype=backend.DEFAULT_DTYPE)

        def backward(g):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b²
            return (unbroadcast(g / b.data, a.shape) if a.requires_grad else None,
                    unbroadcast(-g * a.data / (b.data * b.data), b.shape) if b.requires_grad else None)
        return Tensor.from_op(a.data / b.data, (a, b), backward, "div")

    def __rsub__(self, other):
        return self._lift(other) - self

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def __neg__(self):
        a = self

        def backward(g):  # d(-a)/da = -1
            return (-g,)
        return Tensor.from_op(-a.data, (a,), backward, "neg")

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor) or not isinstance(exponent, (int, float)):
            raise TypeError(f"the exponent must be a Python number, got {type(exponent).__name__}; "
                            "for a tensor exponent write (b * a.log()).exp()")
        a = self

        def backward(g):  # d(a^p)/da = p a^(p-1)
            return (g * (exponent * a.data ** (exponent - 1)),)
        return Tensor.from_op(a.data ** exponent, (a,), backward, "pow")

    __radd__ = __add__  # a + b = b + a, exactly, in floating point too
    __rmul__ = __mul__

    def __matmul__(self, other):
        return matmul(*self._operands(other))

    def __rmatmul__(self, other):
        return matmul(*self._operands(other)[::-1])

    # ---- elementwise functions --------------------------------------------------------
    def exp(self):
        a, out = self, backend.xp.exp(self.data)

        def backward(g):  # d(e^a)/da = e^a
            return (g * out,)
        return Tensor.from_op(out, (a,), backward, "exp")

    def log(self):
        a = self

        def backward(g):  # d(log a)/da = 1/a
            return (g / a.data,)
        return Tensor.from_op(backend.xp.log(a.data), (a,), backward, "log")

    def tanh(self):
        a, out = self, backend.xp.tanh(self.data)

        def backward(g):  # d(tanh a)/da = 1 - tanh²(a)
            return (g * (1 - out * out),)
        return Tensor.from_op(out, (a,), backward, "tanh")

    def sqrt(self):
        a, out = self, backend.xp.sqrt(self.data)

        def backward(g):  # d(√a)/da = 1 / (2√a)
            return (g * 0.5 / out,)
        return Tensor.from_op(out, (a,), backward, "sqrt")

    def relu(self):
        a = self

        def backward(g):  # d(max(a,0))/da = 1 where a > 0, else 0
            return (g * (a.data > 0),)
        return Tensor.from_op(backend.xp.maximum(a.data, 0), (a,), backward, "relu")

    def masked_fill(self, mask, value: float):
        """Put ``value`` where ``mask`` is True; no gradient flows to the filled places."""
        a = self
        mask = mask.data if isinstance(mask, Tensor) else backend.asarray(mask)

        def backward(g):  # 0 where filled, 1 elsewhere
            return (unbroadcast(backend.xp.where(mask, 0, g), a.shape),)
        return Tensor.from_op(backend.xp.where(mask, backend.xp.asarray(value, dtype=a.dtype), a.data),
                              (a,), backward, "masked_fill", saved=(mask,))

    # ---- reductions -------------------------------------------------------------------
    def sum(self, axis=None, keepdims: bool = False):
        a = self

        def backward(g):  # every summed element gets the output's gradient
            if not keepdims and axis is not None:
                g = backend.xp.expand_dims(g, axis)
            return (backend.xp.broadcast_to(g, a.shape).copy(),)
        return Tensor.from_op(a.data.sum(axis=axis, keepdims=keepdims), (a,), backward, "sum")

    def mean(self, axis=None, keepdims: bool = False):
        total = self.sum(axis=axis, keepdims=keepdims)
        return total * (total.data.size / self.data.size)  # sum / number of elements summed

    def max(self, axis=None, keepdims: bool = False):
        a = self
        top = a.data.max(axis=axis, keepdims=True)

        def backward(g):  # the gradient goes to the maximum (split evenly between ties)
            if not keepdims and axis is not None:
                g = backend.xp.expand_dims(g, axis)
            hit = a.data == top
            return (g * hit / hit.sum(axis=axis, keepdims=True),)
        out = top if keepdims else (top.reshape(()) if axis is None else top.squeeze(axis))
        return Tensor.from_op(out, (a,), backward, "max")

    # ---- shape ------------------------------------------------------------------------
    def reshape(self, *shape):
        a = self
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape

        def backward(g):  # reshaping moves no values, so neither does its gradient
            return (g.reshape(a.shape),)
        return Tensor.from_op(a.data.reshape(shape), (a,), backward, "reshape")

    def transpose(self, dim0: int = -2, dim1: int = -1):
        """Swap two axes (PyTorch's ``transpose``); a view, no copy."""
        a = self

        def backward(g):  # swapping back routes each gradient to its element
            return (g.swapaxes(dim0, dim1),)
        return Tensor.from_op(a.data.swapaxes(dim0, dim1), (a,), backward, "transpose")

    @property
    def T(self):
        """All axes reversed (for a matrix, the transpose)."""
        a = self

        def backward(g):
            return (g.T,)
        return Tensor.from_op(a.data.T, (a,), backward, "T")

    def __getitem__(self, index):
        a = self
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)

        def backward(g):  # scatter back; repeated indices add up
            full = backend.xp.zeros_like(a.data)
            if _is_basic_index(index):
                full[index] = g
            else:
                backend.scatter_add(full, index, g)
            return (full,)
        index_arrays = [i for i in (index if isinstance(index, tuple) else (index,)) if hasattr(i, "shape")]
        return Tensor.from_op(a.data[index], (a,), backward, "getitem", saved=index_arrays)


def _is_basic_index(index) -> bool:
    """Slices, ints, None and Ellipsis select each element at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with NumPy's rules: 1-D operands are promoted, leading axes broadcast."""
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul needs at least 1-D operands, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape} (the last axis of the first "
                         f"must equal the {'second-to-last' if b.ndim > 1 else 'only'} axis of the second)")
    _check_same_device(a.data, b.data)
    a2 = a.data if a.ndim > 1 else a.data[None, :]
    b2 = b.data if b.ndim > 1 else b.data[:, None]

    out2 = backend.xp.matmul(a2, b2)

    def backward(g):  # d(AB)/dA = G Bᵀ, d(AB)/dB = Aᵀ G, summed over broadcast batch axes
        g2 = g.reshape(out2.shape)
        ga = gb = None
        if a.requires_grad:
            ga = unbroadcast(backend.xp.matmul(g2, b2.swapaxes(-1, -2)), a2.shape).reshape(a.shape)
        if b.requires_grad:
            gb = unbroadcast(backend.xp.matmul(a2.swapaxes(-1, -2), g2), b2.shape).reshape(b.shape)
        return ga, gb
    # Output shape, NumPy's rule: broadcast batch axes, then (rows of a) if a is a matrix, then
    # (columns of b) if b is a matrix; the axis added above to a 1-D operand is dropped again,
    # so (n,) @ (n, m) -> (m,), (k, n) @ (n,) -> (k,), (n,) @ (n,) -> ().
    out_shape = out2.shape[:-2] + out2.shape[-2:-1] * (a.ndim > 1) + out2.shape[-1:] * (b.ndim > 1)
    return Tensor.from_op(out2.reshape(out_shape), (a, b), backward, "matmul")

"""Floor 2: ops that combine several tensors into one (``cat``, ``stack``, ``where``), each with
its local derivative, beside ``Tensor``'s own methods in tensor.py."""
from __future__ import annotations

from . import backend
from .autograd import unbroadcast
from .tensor import Tensor


def cat(tensors, axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    tensors = tuple(tensors)
    axis = axis % tensors[0].ndim
    bounds = [0]
    for t in tensors:
        bounds.append(bounds[-1] + t.shape[axis])
    lead = (slice(None),) * axis

    def backward(g):  # each input gets its own slice of the gradient
        return tuple(g[lead + (slice(lo, hi),)] if t.requires_grad else None
                     for t, lo, hi in zip(tensors, bounds[:-1], bounds[1:]))
    return Tensor.from_op(backend.xp.concatenate([t.data for t in tensors], axis=axis), tensors,
                          backward, "cat")


def stack(tensors, axis: int = 0) -> Tensor:
    """Join tensors along a new axis."""
    tensors = tuple(tensors)

    def backward(g):  # input i gets slice i of the new axis
        return tuple(backend.xp.take(g, i, axis=axis) if t.requires_grad else None
                     for i, t in enumerate(tensors))
    return Tensor.from_op(backend.xp.stack([t.data for t in tensors], axis=axis), tensors,
                          backward, "stack")


def where(condition, a, b) -> Tensor:
    """Elementwise ``a`` where ``condition`` is True, else ``b``."""
    condition = condition.data if isinstance(condition, Tensor) else backend.asarray(condition)
    a = a if isinstance(a, Tensor) else Tensor(a)
    a, b = a._operands(b)

    def backward(g):  # the gradient follows whichever operand was picked
        return (unbroadcast(backend.xp.where(condition, g, 0), a.shape) if a.requires_grad else None,
                unbroadcast(backend.xp.where(condition, 0, g), b.shape) if b.requires_grad else None)
    return Tensor.from_op(backend.xp.where(condition, a.data, b.data), (a, b), backward, "where",
                          saved=(condition,))

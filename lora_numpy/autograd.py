"""Floor 2: how gradients flow backwards through the graph that ``Tensor`` ops record.

Each node holds its inputs (``_prev``) and a closure (``_backward``) mapping the gradient of its
output to the gradients of its inputs (tensor.py). ``run_backward`` walks the nodes once in
reverse topological order, so a node's gradient is complete, summed over every use, before it
is passed on; then each node drops its closure and inputs, which frees every array the forward
pass saved (unless ``retain_graph=True``), so memory does not grow from step to step.
This file knows nothing about what the ops compute: only nodes and arrays.
"""
from __future__ import annotations

import contextlib

grad_enabled = True  # False inside no_grad(): ops then record nothing


@contextlib.contextmanager
def no_grad():
    """Run ops without recording a graph (evaluation, parameter updates)."""
    global grad_enabled
    previous, grad_enabled = grad_enabled, False
    try:
        yield
    finally:
        grad_enabled = previous


def is_grad_enabled() -> bool:
    return grad_enabled


def unbroadcast(grad, shape):
    """Sum ``grad`` back to ``shape``: an operand broadcast along an axis was used once per
    position on it, so its gradient is the sum over that axis."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def topological_order(root) -> list:
    """Nodes that need a gradient, inputs before outputs, by an iterative depth-first search
    (recursion would stop at Python's limit on a long chain)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node._prev if p.requires_grad and id(p) not in visited)
    return order


def run_backward(root, grad, retain_graph: bool = False) -> None:
    """Accumulate d(root)/d(leaf), starting from ``grad`` = d(loss)/d(root), into every leaf's
    ``.grad``. Intermediate gradients live only in a dict and leave it once passed on."""
    order = topological_order(root)
    for node in order:
        if node._freed:
            raise RuntimeError(
                f"the graph behind this tensor (at op '{node._op}') was already freed by an "
                "earlier backward(); call that backward(retain_graph=True) to backpropagate "
                "through it twice, or run the forward pass again")

    grads = {id(root): grad}
    for node in reversed(order):  # outputs before inputs: each node's grad is complete
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if node._backward is None:  # a leaf
            node.grad = g if node.grad is None else node.grad + g
            continue
        if node._retains_grad:
            node.grad = g if node.grad is None else node.grad + g
        parent_grads = tuple(node._backward(g))
        if len(parent_grads) != len(node._prev):  # zip would silently drop the extra ones
            raise RuntimeError(f"the backward of op '{node._op}' returned {len(parent_grads)} "
                               f"gradients for {len(node._prev)} inputs: return one per parent, "
                               "in the order of the parents given to Tensor.from_op (None if unused)")
        for parent, parent_grad in zip(node._prev, parent_grads):
            if parent_grad is not None and parent.requires_grad:
                if parent_grad.shape != parent.data.shape:
                    raise RuntimeError(f"the backward of op '{node._op}' returned a gradient of "
                                       f"shape {parent_grad.shape} for an input of shape "
                                       f"{parent.data.shape}: check the order of its gradients")
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
        if not retain_graph:  # drop the closure and with it every array it saved
            node._backward, node._prev, node._saved, node._freed = None, (), (), True

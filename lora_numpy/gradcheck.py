"""Floor 3: check analytic gradients against central finite differences.

For a function ``f`` of tensors and a *random* upstream gradient ``G`` (same shape as the
output), the scalar ``L = Σ f(x) ⊙ G`` has ``dL/dx_i ≈ (L(x + ε e_i) - L(x - ε e_i)) / 2ε``.
A random ``G`` matters: with ``f(x).sum()`` every output gets weight 1, and a backward that,
say, mixes up two outputs' gradients would still pass. Run in float64: in float32 the
rounding error of the difference quotient is as large as the errors we look for.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .autograd import no_grad
from .tensor import Tensor


class GradcheckError(AssertionError):
    pass


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
              seed: int = 0, max_elements: int | None = None) -> bool:
    """Compare ``backward()`` with finite differences for every input that requires grad.

    fn: called as ``fn(*inputs)``, returns a Tensor. Inputs are perturbed in place, so ``fn``
    may also read them from elsewhere (a model's parameters, for instance).
    inputs: float64 Tensors; those with ``requires_grad`` are checked.
    max_elements: check at most this many randomly chosen elements per input (None: all).
    Returns True, or raises GradcheckError naming the input, the element and both values.
    """
    inputs = list(inputs)
    checked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad, so there is nothing to check")
    for t in checked:
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs (float32 rounding swamps the "
                            f"differences); got {t.dtype}: make it with Tensor(x, dtype='float64')")
    for t in checked:  # perturbing through a flat view needs contiguous memory
        t.data = backend.xp.ascontiguousarray(t.data)
    rng = np.random.default_rng(seed)

    out = fn(*inputs)
    upstream = backend.asarray(rng.standard_normal(out.shape))
    for t in checked:
        t.grad = None
    out.backward(upstream)
    analytic = [backend.to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape) for t in checked]

    def loss() -> float:
        with no_grad():
            return float((fn(*inputs).data * upstream).sum())

    for n, (t, grad) in enumerate(zip(checked, analytic)):
        flat = t.data.reshape(-1)  # a view: writing to it perturbs the input
        picks = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            picks = rng.choice(flat.size, size=max_elements, replace=False)
        for i in picks:
            original = float(flat[i])
            flat[i] = original + eps
            plus = loss()
            flat[i] = original - eps
            minus = loss()
            flat[i] = original
            numeric = (plus - minus) / (2 * eps)
            exact = grad.reshape(-1)[i]
            if abs(numeric - exact) > atol + rtol * abs(numeric):
                raise GradcheckError(
                    f"gradient mismatch for input {n} (shape {t.shape}) at flat index {i}: "
                    f"backward gives {exact:.8g}, finite differences give {numeric:.8g}")
    return True

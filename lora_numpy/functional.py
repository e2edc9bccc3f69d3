"""Floor 3: fused ops with hand-derived backward passes (imported as ``F``).

Building softmax or layer norm from elementary ops would work, but each elementary op saves
its own inputs and adds a node; here one node saves only what its backward needs and the
backward is a few whole-array expressions. Each op states its derivative in one comment.

Shapes: ``...`` means any number of leading (batch) axes.
"""
from __future__ import annotations

import math

from . import backend, parallel
from .attention import attention_weights, causal_bias, scaled_dot_product_attention  # noqa: F401
from .tensor import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # GELU's tanh form: tanh(√(2/π) (x + 0.044715 x³))
_GELU_CUBIC = 0.044715                       # the cubic term that fits tanh to the normal CDF


def _data(x):
    return x.data if isinstance(x, Tensor) else backend.asarray(x)


# Reductions as matrix-vector products. NumPy's own reductions walk the array with its generic
# loop; BLAS's gemv does the same sum several times faster (and on every BLAS thread).
# Measured, interleaved, median of 41, 1 thread: sum over the rows of 2048x128 0.31x the time of
# a.sum(axis=0), of 2048x384 0.58x; mean over the last axis of 2048x128 0.21x, of 2048x384 0.26x.
def _sum_rows(a2):
    """Σ over the rows of a 2-D array: (N, D) -> (D,), computed as 1ᵀ a."""
    return backend.xp.ones(a2.shape[0], dtype=a2.dtype) @ a2


def _token_rows(a):
    """(..., D) -> (N, D), a view where it can be: fused ops cut their bands by tokens, not by
    sequences (a batch of 16 sequences is too few rows for bands cut at ROW_TILE)."""
    return a.reshape(-1, a.shape[-1] if a.ndim else 1)


def _mean_last(a):
    """Mean over the last axis, kept as an axis of size 1: (..., D) -> (..., 1), as a · (1/D)."""
    d = a.shape[-1]
    return (a.reshape(-1, d) @ backend.xp.full(d, 1.0 / d, dtype=a.dtype)).reshape(a.shape[:-1] + (1,))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ weightᵀ + bias``; x (..., in), weight (out, in), bias (out,) -> y (..., out).

    Fused so the weight gradient is one 2-D matmul over all rows, and so a frozen weight
    (``requires_grad=False``) costs no ``dW`` at all.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features (shape {x.shape}) but weight "
                         f"of shape {weight.shape} expects {weight.shape[1]}")
    # Flatten the batch axes: one 2-D GEMM is several times faster than NumPy's batched matmul.
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.data.reshape(-1, d_in)
    out = parallel.matmul(x2, weight.data.T, None if bias is None else bias.data)
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):  # dx = g W, dW = gᵀ x (summed over rows), db = Σ_rows g
        dx, dW, db, _, _ = _linear_backward(g.reshape(-1, g.shape[-1]), x2, weight.data,
                                            x.requires_grad, weight.requires_grad,
                                            bias is not None and bias.requires_grad)
        grads = [None if dx is None else dx.reshape(lead + (d_in,)), dW]
        return grads if bias is None else grads + [db]
    out = out.reshape(lead + (weight.shape[0],))
    return Tensor.from_op(out, parents, backward, "linear", saved=(x2,))  # x2: a copy if x was strided


def _linear_backward(g2, x2, W, need_dx: bool, need_dW: bool, need_db: bool, lora=None):
    """The gradients of ``y = x Wᵀ + b`` (+ LoRA's ``s · (x ⊙ m) Aᵀ Bᵀ``), in one dispatch.

    g2 = dy (N, d_out), x2 (N, d_in), W (d_out, d_in) or None when dx is not needed. ``lora``:
    None or (A (r, d_in), B (d_out, r), s, u = (x ⊙ m) Aᵀ (N, r), m (N, d_in) or None).
    Returns dx (N, d_in), dW, db (d_out,), s (g B) (N, r) and dB = s gᵀ u (d_out, r), None where
    not needed. Each band takes a slice of the tokens (dx = g W + s (g B) A ⊙ m) and a slice of
    the output features (dW = gᵀ x). The r-wide products s (g B) and s gᵀ u run whole, before and
    after the bands: cut into bands, a product only r columns wide can take another of BLAS's
    kernels in a band than in the whole (OpenBLAS's small-matrix kernels), and other last bits.
    db = Σ_rows g and dA = s (g B)ᵀ (x ⊙ m) sum over every token: db is taken after the bands,
    dA by the caller.
    """
    xp = backend.xp
    (n, d_out), d_in = g2.shape, x2.shape[1]
    A, B, s, u, m = lora if lora is not None else (None, None, 0.0, None, None)
    r = 0 if lora is None else A.shape[0]
    sgB = None if lora is None else (g2 @ B) * s                 # s (g B)
    # A result that is not needed gets a 0-wide stand-in: it is cut like the others, costs nothing.
    dx = xp.empty((n, d_in if need_dx else 0), dtype=g2.dtype)
    sgB_or_none = xp.empty((n, 0), dtype=g2.dtype) if sgB is None else sgB
    mask = xp.empty((n, 0), dtype=g2.dtype) if m is None else m
    dW = xp.empty((d_out, d_in if need_dW else 0), dtype=g2.dtype)

    def band(g_rows, sgB, dx, mask, gT_rows, dW):
        if need_dx:
            xp.matmul(g_rows, W, out=dx)                         # g W
            if r:
                lora_dx = sgB @ A
                if m is not None:
                    lora_dx *= mask
                dx += lora_dx                                    # + s (g B) A ⊙ m
        if need_dW:
            xp.matmul(gT_rows, x2, out=dW)
    work = n * d_out * d_in * (need_dx + need_dW) + n * r * d_in * need_dx
    parallel.over_rows(band, g2, sgB_or_none, dx, mask, g2.T, dW,
                       bands=parallel.bands_for(work, parallel.MIN_MULTIPLY_ADDS))
    dB = None if lora is None else (g2.T @ u) * s                # s gᵀ u
    return (dx if need_dx else None, dW if need_dW else None, _sum_rows(g2) if need_db else None,
            sgB, dB)


def lora_linear(x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_mask=None) -> Tensor:
    """A LoRA-adapted Linear in one node: ``h = x Wᵀ + b + s · (x ⊙ m) Aᵀ Bᵀ``.

    x (..., d_in), weight (d_out, d_in), lora_A (r, d_in), lora_B (d_out, r), dropout_mask
    (..., d_in) or None -> h (..., d_out). One node saves only the rank-r intermediate
    ``u = (x ⊙ m) Aᵀ``; built from separate ops, the graph would also keep the d_out-wide LoRA
    output and the sum for every token, more activation memory than LoRA saves elsewhere.

    ``weight`` is W as a Tensor or, for a 4-bit base (QLoRA), a function returning W's array:
    then W is dequantized for the product, dropped, and dequantized again in backward (as
    bitsandbytes does), so no float copy of W lives between the passes; it gets no gradient.
    """
    frozen_fn = callable(weight)
    W_of = weight if frozen_fn else (lambda: weight.data)
    xp = backend.xp
    lead, d_in = x.shape[:-1], x.shape[-1]
    A, B = lora_A.data, lora_B.data
    x2 = x.data.reshape(-1, d_in)
    m = None if dropout_mask is None else dropout_mask.reshape(-1, d_in)
    xd = x2 if m is None else x2 * m
    W = W_of()
    (n, r), d_out = (x2.shape[0], A.shape[0]), W.shape[0]
    u = xd @ A.T                  # u = (x ⊙ m) Aᵀ, whole: r wide (see _linear_backward)
    out = xp.empty((n, d_out), dtype=x.dtype)

    def forward(x_rows, u, out):  # a band of tokens through the whole layer
        xp.matmul(x_rows, W.T, out=out)
        if bias is not None:
            out += bias.data
        out += (u * scaling) @ B.T                             # + s · u Bᵀ
    work = n * d_out * (d_in + r)
    parallel.over_rows(forward, x2, u, out, bands=parallel.bands_for(work, parallel.MIN_MULTIPLY_ADDS))
    del W  # a 4-bit base's float W is dequantized again in backward, not kept
    weight_parent = () if frozen_fn else (weight,)
    parents = (x, *weight_parent, lora_A, lora_B) + ((bias,) if bias is not None else ())

    def backward(g):
        # dx = g W + s (g B) A ⊙ m;  dW = gᵀ x;  dA = s (g B)ᵀ (x ⊙ m);  dB = s gᵀ u;  db = Σ g
        dx, dW, db, sgB, dB = _linear_backward(
            g.reshape(-1, g.shape[-1]), x2, W_of() if x.requires_grad else None,
            x.requires_grad, not frozen_fn and weight.requires_grad,
            bias is not None and bias.requires_grad, lora=(A, B, scaling, u, m))
        grads = [None if dx is None else dx.reshape(lead + (d_in,)), *([] if frozen_fn else [dW]),
                 parallel.matmul(sgB.T, xd) if lora_A.requires_grad else None,
                 dB if lora_B.requires_grad else None]
        return grads if bias is None else grads + [db]
    return Tensor.from_op(out.reshape(lead + (out.shape[-1],)), parents, backward, "lora_linear",
                          saved=(x2, xd, u) + (() if m is None else (m,)))


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``exp(x) / Σ exp(x)`` along ``axis``, computed on ``x - max`` so it never overflows."""
    y = backend.xp.exp(x.data - x.data.max(axis=axis, keepdims=True))
    y *= 1.0 / y.sum(axis=axis, keepdims=True)  # one division per row, then products

    def backward(g):  # dx = y ⊙ (g - Σ g⊙y)
        return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)
    return Tensor.from_op(y, (x,), backward, "softmax")


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``x - logsumexp(x)`` along ``axis``, stable for logits of any size."""
    y = x.data - x.data.max(axis=axis, keepdims=True)
    y -= backend.xp.log(backend.xp.exp(y).sum(axis=axis, keepdims=True))

    def backward(g):  # dx = g - softmax(x) Σ g
        return (g - backend.xp.exp(y) * g.sum(axis=axis, keepdims=True),)
    return Tensor.from_op(y, (x,), backward, "log_softmax")


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100, weight=None) -> Tensor:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``.

    logits (..., C), targets (...) integer class ids. Targets equal to ``ignore_index`` do not
    count. With class weights ``weight`` (C,) the mean is weighted, as in PyTorch:
    ``loss = Σ_i w[t_i] · (-log p_i[t_i]) / Σ_i w[t_i]``.
    """
    n_classes = logits.shape[-1]
    z = logits.data.reshape(-1, n_classes)
    t = _data(targets).reshape(-1)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {t.dtype} "
                        "(cast them with .astype(np.int64); soft labels are not supported)")
    if weight is not None and tuple(_data(weight).shape) != (n_classes,):
        raise ValueError(f"cross_entropy: weight has shape {tuple(_data(weight).shape)}, but there "
                         f"are {n_classes} classes: give one weight per class, shape ({n_classes},)")
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape "
                         f"{logits.shape[:-1]}, got {_data(targets).shape}")
    counted = t != ignore_index
    safe_t = backend.xp.where(counted, t, 0)
    if bool(((safe_t < 0) | (safe_t >= n_classes)).any()):
        bad = backend.to_numpy(t[counted & ((t < 0) | (t >= n_classes))])[:5]
        raise ValueError(f"cross_entropy: target ids {bad.tolist()} are outside [0, {n_classes}) "
                         f"and are not ignore_index={ignore_index}")
    w = counted.astype(z.dtype)
    if weight is not None:
        w = w * _data(weight).astype(z.dtype)[safe_t]
    total = w.sum()
    if not bool(total > 0):  # PyTorch returns 0/0 = nan here; a training loop would call it divergence
        why = (f"every target equals ignore_index={ignore_index}" if not bool(counted.any())
               else "every counted target has class weight 0")
        raise ValueError(f"cross_entropy: {why}, so there is nothing to average (the loss would be "
                         "0/0): check how the batch's targets were masked")
    # -log p[t] = log Σ_c e^(z_c - m) - (z_t - m), m = max_c z_c. Only the target's log-prob is
    # needed, so no full log-softmax array: 4 passes over the logits instead of 6, and the
    # backward reuses e = e^(z - m) instead of exponentiating again.
    rows = backend.xp.arange(z.shape[0])
    e = z - z.max(axis=-1, keepdims=True)
    picked = e[rows, safe_t]                                   # z_t - m
    backend.xp.exp(e, out=e)
    sum_e = e @ backend.xp.ones(n_classes, dtype=e.dtype)      # Σ_c e^(z_c - m), as a gemv
    loss = (w * (backend.xp.log(sum_e) - picked)).sum() / total

    def backward(g):  # dz = (softmax(z) - onehot(t)) · w / Σw,  softmax(z) = e / Σe
        row_scale = g * w / total
        dz = e * (row_scale / sum_e)[:, None]
        dz[rows, safe_t] -= row_scale
        return (dz.reshape(logits.shape),)
    return Tensor.from_op(loss, (logits,), backward, "cross_entropy", saved=(e, sum_e, w, rows, safe_t))


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise the last axis to zero mean, unit variance, then scale and shift.

    x (..., D), weight and bias (D,). ``y = (x - μ) / sqrt(σ² + eps) · weight + bias``.
    Rows are independent, so both passes run in bands of rows on every core (parallel.py).
    """
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (d,):
            raise ValueError(f"layer_norm: {name} has shape {p.shape}, but x {x.shape} needs ({d},) "
                             "(one entry per feature of the last axis)")
    xp = backend.xp
    w = weight.data if weight is not None else xp.ones(d, dtype=x.dtype)
    x2 = _token_rows(x.data)                                            # (N, D): bands cut tokens
    xhat, y = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)

    def forward(x, xhat, rstd, y):
        xp.subtract(x, _mean_last(x), out=xhat)                         # x - μ
        var = xp.einsum("...i,...i->...", xhat, xhat)[..., None] / d    # one pass, no x² temporary
        xp.divide(1.0, xp.sqrt(var + eps), out=rstd)
        xhat *= rstd                                                    # x̂ = (x - μ) / √(σ² + ε)
        xp.multiply(xhat, w, out=y)
        if bias is not None:
            y += bias.data
    parallel.over_rows(forward, x2, xhat, rstd, y)
    parents = tuple(p for p in (x, weight, bias) if p is not None)

    def backward(g):
        # dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ ⊙ x̂)), ĝ = g · weight;  dweight = Σ_rows g ⊙ x̂;
        # dbias = Σ_rows g (the two sums run over every row: they are taken after the bands).
        g2 = _token_rows(g)
        dx = xp.empty_like(g2)

        def band(g, xhat, rstd, dx):
            gh = g * w                                                          # ĝ
            xp.multiply(xhat, xp.einsum("...i,...i->...", gh, xhat)[..., None] / d, out=dx)
            xp.subtract(gh, dx, out=dx)
            dx -= _mean_last(gh)
            dx *= rstd
        if x.requires_grad:
            parallel.over_rows(band, g2, xhat, rstd, dx)
        grads = [dx.reshape(x.shape) if x.requires_grad else None]
        if weight is not None:
            grads.append(xp.einsum("ni,ni->i", g2, xhat) if weight.requires_grad else None)
        if bias is not None:
            grads.append(_sum_rows(g2) if bias.requires_grad else None)
        return grads
    y = y.reshape(x.shape)
    return Tensor.from_op(y, parents, backward, "layer_norm", saved=(xhat, rstd, w))


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh form (GPT-2's): ``y = ½ x (1 + tanh(u))``, ``u = √(2/π) (x + 0.044715 x³)``."""
    # Written in place into two buffers, in bands of rows on every core (parallel.py). The
    # forward keeps s = ½(1 + tanh u), which it needs anyway, so that the backward takes 9
    # passes over the array instead of 12 with tanh u (forward + backward, interleaved, median
    # of 61, 1 thread: 0.84x the time at 2048x512, 0.86x at 2048x1536 and at 512x256).
    xp = backend.xp
    a2 = _token_rows(x.data)
    s, y = xp.empty_like(a2), xp.empty_like(a2)

    def forward(a, s, y):
        xp.multiply(a, a, out=s)
        s *= _GELU_CUBIC * _SQRT_2_OVER_PI
        s += _SQRT_2_OVER_PI
        s *= a                              # u = √(2/π) (x + 0.044715 x³)
        xp.tanh(s, out=s)
        s += 1.0
        s *= 0.5                            # s = ½ (1 + tanh u)
        xp.multiply(a, s, out=y)
    parallel.over_rows(forward, a2, s, y, align=1)  # elementwise: any cut gives the same bits

    def backward(g):
        # dy/dx = s + x s' with s' = 2 s (1 - s) u' (as 1 - tanh²u = 4 s (1 - s)), so
        # dy/dx = s (1 + 2 x (1 - s) √(2/π) (1 + 3·0.044715 x²))
        g2 = _token_rows(g)
        d = xp.empty_like(g2)

        def band(a, s, g, d):
            xp.multiply(a, a, out=d)
            d *= 6 * _GELU_CUBIC * _SQRT_2_OVER_PI
            d += 2 * _SQRT_2_OVER_PI
            d *= a                          # 2 x √(2/π) (1 + 3·0.044715 x²)
            d *= xp.subtract(1.0, s)
            d += 1.0
            d *= s
            d *= g
        parallel.over_rows(band, a2, s, g2, d, align=1)
        return (d.reshape(x.shape),)
    return Tensor.from_op(y.reshape(x.shape), (x,), backward, "gelu", saved=(s,))


def dropout_mask(shape, p: float, rng, dtype):
    """Keep each element with probability 1-p, scaled by 1/(1-p) (inverted dropout), so that
    evaluation needs no rescaling. Drawn on the host: a seed gives one mask on every backend."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = rng.random(shape, dtype="float32") >= p
    return backend.asarray(keep, dtype=dtype) * (1.0 / (1.0 - p))


def dropout(x: Tensor, p: float, training: bool, rng) -> Tensor:
    """Zero each element with probability ``p``, scale survivors by ``1/(1-p)``; identity when
    not training or ``p == 0``. ``rng`` is a ``numpy.random.Generator``."""
    if not training or p == 0.0:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        return x
    mask = dropout_mask(x.shape, p, rng, x.dtype)

    def backward(g):  # dy/dx = mask / (1-p)
        return (g * mask,)
    return Tensor.from_op(x.data * mask, (x,), backward, "dropout", saved=(mask,))


def embedding(idx, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (V, D) picked by integer ids ``idx`` (...) -> (..., D)."""
    ids = _data(idx)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise IndexError(f"embedding ids must be in [0, {weight.shape[0]}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")

    def backward(g):  # dW[v] = Σ of g over every position whose id is v (ids repeat)
        dw = backend.xp.zeros_like(weight.data)
        backend.index_add_rows(dw, ids.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (dw,)
    return Tensor.from_op(weight.data[ids], (weight,), backward, "embedding", saved=(ids,))

"""Floor 3: scaled dot-product attention, the fused op of a Transformer's attention layer.

``softmax(q kᵀ / √d + mask) v`` in one node with a hand-derived backward (FlashAttention's
row-sum identity), run in bands of sequences on every core (parallel.py). ``functional``
re-exports these names, so models call them as ``F.scaled_dot_product_attention``, as in PyTorch.

Shapes: ``...`` means any number of leading (batch, head) axes.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend, parallel
from .autograd import unbroadcast
from .tensor import Tensor


_causal_bias_cache: dict = {}


def causal_bias(t_q: int, t_k: int, dtype):
    """(t_q, t_k) array: 0 where a query may look, -inf at keys after the query's position
    (queries are the last ``t_q`` of ``t_k`` positions). Added to the scores, it masks them in
    one broadcast pass; made once per shape and reused."""
    key = (t_q, t_k, str(dtype), backend.name)
    if key not in _causal_bias_cache:
        future = backend.xp.triu(backend.xp.ones((t_q, t_k), dtype=bool), k=1 + t_k - t_q)
        _causal_bias_cache[key] = backend.xp.where(future, -backend.xp.inf, 0).astype(dtype)
    return _causal_bias_cache[key]


def attention_weights(q: Tensor, k: Tensor, causal: bool = True):
    """The softmax attention matrix as a plain array (..., Tq, Tk), for plots and tests."""
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    p = backend.xp.empty(lead + (q.shape[-2], k.shape[-2]), dtype=q.dtype)
    _softmax_scores(q.data, k.data, causal, p)
    return p


def _softmax_scores(q, k, causal: bool, p) -> None:
    """Write P = softmax(q kᵀ / √d + mask) into ``p`` (..., Tq, Tk), row by row."""
    xp = backend.xp
    # Scale q (T·d numbers) rather than the scores (T·T numbers).
    xp.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.swapaxes(-1, -2), out=p)
    if causal:
        p += causal_bias(q.shape[-2], k.shape[-2], p.dtype)
    p -= p.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p *= 1.0 / p.sum(axis=-1, keepdims=True)  # Tq divisions, then Tq·Tk products


def _over_batch(kernel, *arrays) -> None:
    """Attention's bands: over the first (batch) axis when there is one, so that a band never
    cuts through one sequence's keys; 2-D (Tq, d) inputs run as one band. Each sequence's
    products are BLAS calls of their own, so a band may start at any sequence (align=1)."""
    if arrays[0].ndim > 2:
        parallel.over_rows(kernel, *arrays, align=1)
    else:
        kernel(*arrays)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """``softmax(q kᵀ / √d) v``; q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv) -> (..., Tq, dv).

    With ``causal`` each query attends only to keys at its own position or before it. One node
    saves q, k, v and the attention matrix P; the scores are not kept. The sequences of a batch
    are independent, so forward and backward run in bands of sequences on every core.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape}")
    xp = backend.xp
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])  # shapes only: any backend
    # Broadcast views (no copies) give every array the same batch axes, so bands line up.
    qb, kb, vb = (xp.broadcast_to(t.data, lead + t.shape[-2:]) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = xp.empty(lead + (q.shape[-2], k.shape[-2]), dtype=q.dtype)
    # The output and the gradients take the memory layout of q, k, v (empty_like keeps it): when
    # the heads are (B, T, H, d) memory seen as (B, H, T, d), merging them back is then a view,
    # not a copy (measured at medium: the head reshapes 4.6 -> 0.3 ms of a step).
    out = xp.empty_like(qb, shape=lead + (q.shape[-2], v.shape[-1]))

    def forward(q, k, v, p, out):
        _softmax_scores(q, k, causal, p)
        xp.matmul(p, v, out=out)
    _over_batch(forward, qb, kb, vb, p, out)

    def backward(g):
        # dv = Pᵀ g;  dP = g vᵀ;  dS = P ⊙ (dP - D);  dq = dS k / √d;  dk = dSᵀ q / √d, where
        # D_i = Σ_k dP_ik P_ik = Σ_k Σ_j g_ij v_kj P_ik = Σ_j g_ij out_ij: a row sum over the
        # (Tq, dv) product g ⊙ out instead of the (Tq, Tk) one (FlashAttention's identity), and the
        # 1/√d applied to dq and dk (T·d numbers) rather than dS (T·T): two T·T passes fewer.
        need_v, need_qk = v.requires_grad, q.requires_grad or k.requires_grad
        gq, gk, gv = (xp.empty_like(a) for a in (qb, kb, vb))

        def band(g, q_, k_, v_, p, out, gq, gk, gv):
            if need_v:
                xp.matmul(p.swapaxes(-1, -2), g, out=gv)
            if need_qk:
                ds = g @ v_.swapaxes(-1, -2)                               # dP
                ds -= xp.einsum("...ij,...ij->...i", g, out)[..., None]
                ds *= p
                xp.matmul(ds, k_, out=gq)
                gq *= scale
                xp.matmul(ds.swapaxes(-1, -2), q_, out=gk)
                gk *= scale
        _over_batch(band, xp.broadcast_to(g, out.shape), qb, kb, vb, p, out, gq, gk, gv)
        return (unbroadcast(gq, q.shape) if q.requires_grad else None,
                unbroadcast(gk, k.shape) if k.requires_grad else None,
                unbroadcast(gv, v.shape) if v.requires_grad else None)
    return Tensor.from_op(out, (q, k, v), backward, "attention", saved=(p,))

"""Floor 4: the layers a GPT is built from, with PyTorch's names, shapes and default inits."""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import functional as F
from .module import Module, Parameter


def _check_sizes(layer: str, **sizes) -> None:
    """Every size a positive integer, named in the error (a 0 would build an empty weight)."""
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{layer}: {name} must be a positive integer, got {n!r}")


def _uniform(rng, bound: float, shape):
    return backend.asarray(rng.uniform(-bound, bound, size=shape).astype(backend.DEFAULT_DTYPE))


class Linear(Module):
    """``y = x @ weightᵀ + bias``; weight (out_features, in_features), bias (out_features,).

    Default init is PyTorch's: ``kaiming_uniform_(a=√5)``, which works out to
    ``U(-1/√in, 1/√in)`` for the weight, and the same bound for the bias.
    ``rng`` (a numpy Generator) makes the init reproducible; None draws fresh entropy.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        _check_sizes("Linear", in_features=in_features, out_features=out_features)
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features)))
        self.bias = Parameter(_uniform(rng, bound, (out_features,))) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table ``weight`` (num_embeddings, embedding_dim); init ``N(0, 1)`` as PyTorch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None):
        _check_sizes("Embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        rng = rng if rng is not None else np.random.default_rng()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(backend.asarray(
            rng.standard_normal((num_embeddings, embedding_dim)).astype(backend.DEFAULT_DTYPE)))

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the last axis; ``weight`` starts at 1 and ``bias`` at 0; eps 1e-5."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True):
        _check_sizes("LayerNorm", normalized_shape=normalized_shape)
        if not eps > 0:
            raise ValueError(f"LayerNorm: eps must be > 0 (it keeps 1/√(σ²+eps) finite), got {eps}")
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = Parameter(backend.xp.ones(normalized_shape, dtype=backend.DEFAULT_DTYPE))
        self.bias = Parameter(backend.xp.zeros(normalized_shape, dtype=backend.DEFAULT_DTYPE)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"({self.normalized_shape},), eps={self.eps}"


class Dropout(Module):
    """Inverted dropout while training, identity in eval mode.

    ``rng`` is the Generator that draws the masks; a model passes one shared generator to all
    its Dropout layers so that a checkpoint can save and restore its state.
    """

    def __init__(self, p: float = 0.0, rng=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self):
        return f"p={self.p}"

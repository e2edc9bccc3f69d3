"""Floor 6: ``LoraEmbedding``, LoRA on a lookup table (PEFT's ``lora.Embedding``).

An ``Embedding`` holds W0 (num_embeddings, embedding_dim) and returns row ``W0[id]`` for each id.
The update follows the table's layout, so the factors are the transpose of a Linear's:

    A  (r, num_embeddings)    lora_embedding_A[name], starts at 0
    B  (embedding_dim, r)     lora_embedding_B[name], starts N(0, 1) (nn.Embedding's own init)
    ΔW = (B A)ᵀ · s           (num_embeddings, embedding_dim), added to the table
    h  = W0[ids] + s · (Aᵀ[ids]) Bᵀ

A starts at zero here (B for a Linear), so the model is still unchanged at step 0; loralib
and PEFT do the same. The lookup of Aᵀ is an ``embedding`` op, so only the rows of the ids in
the batch get a gradient. PEFT applies no dropout on this path, and neither does this layer.
"""
from __future__ import annotations

from .. import backend
from .. import functional as F
from ..nn import Embedding, Parameter, ParameterDict
from .config import LoraConfig
from .layer import check_rank
from .tuner import LoraLayer


class LoraEmbedding(LoraLayer):
    """An ``Embedding`` plus named low-rank updates ``lora_embedding_A``, ``lora_embedding_B``."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: Embedding, config: LoraConfig, rng, adapter_name: str = "default"):
        super().__init__(base_layer)
        self.lora_embedding_A, self.lora_embedding_B = ParameterDict(), ParameterDict()
        self.update_layer(adapter_name, config, rng)
        self.set_adapter(adapter_name)

    @staticmethod
    def adapter_shapes(base_layer, config: LoraConfig) -> dict:
        """What one adapter adds to a (num_embeddings, embedding_dim) table, by parameter path."""
        if config.use_dora:
            raise ValueError("use_dora=True on an Embedding is not implemented here; leave the "
                             "embedding out of target_modules or train it with plain LoRA")
        n, d = base_layer.weight.shape
        check_rank(config.r, (d, n))
        return {"lora_embedding_A.{name}": (config.r, n), "lora_embedding_B.{name}": (d, config.r)}

    def update_layer(self, name: str, config: LoraConfig, rng) -> None:
        self.adapter_shapes(self.base_layer, config)
        self._add_common(name, config, rng)
        n, d = self.base_weight().shape
        dtype = self.base_weight().dtype
        A = rng.standard_normal((config.r, n))
        B = rng.standard_normal((d, config.r))
        if config.init_lora_weights is not False:  # every other init, PiSSA's too, as PEFT does
            A[...] = 0
        self.lora_embedding_A[name] = Parameter(backend.asarray(A, dtype=dtype))
        self.lora_embedding_B[name] = Parameter(backend.asarray(B, dtype=dtype))

    def factors(self, name: str):
        """(A (r, num_embeddings), B (embedding_dim, r)) of adapter ``name`` as arrays."""
        return self.lora_embedding_A[name].data, self.lora_embedding_B[name].data

    def delta_weight(self, name: str | None = None):
        """ΔW = (B A)ᵀ · s, shape (num_embeddings, embedding_dim), as an array."""
        name = self.active_adapter if name is None else name
        A, B = self.factors(name)
        return (B @ A).T * self.scaling[name]

    def set_factors(self, name: str, A, B) -> None:
        dtype, trainable = self.base_weight().dtype, self.lora_embedding_A[name].requires_grad
        if A.shape[0] != self.r[name] or B.shape[1] != self.r[name]:
            raise ValueError(f"factors of rank {A.shape[0]}/{B.shape[1]} for adapter {name!r} of rank {self.r[name]}")
        self.lora_embedding_A[name] = Parameter(backend.asarray(A, dtype=dtype), requires_grad=trainable)
        self.lora_embedding_B[name] = Parameter(backend.asarray(B, dtype=dtype), requires_grad=trainable)

    def _lora_term(self, ids, name: str):
        """s · Aᵀ[ids] Bᵀ (..., embedding_dim)."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        return (F.embedding(ids, A.T) @ B.T) * self.scaling[name]

    def _adapted_forward(self, ids, name: str):
        return self.base_layer(ids) + self._lora_term(ids, name)

    def _merge_one(self, name: str) -> None:
        self._write_base_weight(self.base_weight().data + self.delta_weight(name))

    def _unmerge_one(self, name: str) -> None:
        self._write_base_weight(self.base_weight().data - self.delta_weight(name))

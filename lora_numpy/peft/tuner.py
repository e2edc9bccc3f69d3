"""Floor 6: ``LoraLayer``, what every adapted layer shares: several named adapters on one
frozen base layer (PEFT's ``LoraLayer``).

A layer holds, per adapter name, its rank ``r[name]``, ``lora_alpha[name]`` and scale
``scaling[name]``, its factors (``lora_A[name]``, ``lora_B[name]`` in the subclass) and its
dropout. One adapter is active at a time; the others stay in memory, frozen, ready to be
switched to, combined, or used row by row in a mixed batch. The math of one adapter lives in
the subclasses (``LoraLinear`` in layer.py, ``LoraEmbedding`` in embedding.py).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from .. import backend
from ..combine import cat
from ..nn import Dropout, Module, ModuleDict, Parameter
from ..tensor import Tensor
from .svd import split_factors, truncate_product

BASE = "__base__"  # the name that routes a batch row through the base layer alone


class LoraLayer(Module):
    """Per-adapter bookkeeping around ``base_layer``; a subclass adds the factors and the math."""

    adapter_layer_names: tuple = ()   # the subclass's per-adapter parameter containers

    def __init__(self, base_layer: Module):
        self.base_layer = base_layer.requires_grad_(False)  # W0 (and b) stay as pretrained
        self.r, self.lora_alpha, self.scaling, self.use_rslora = {}, {}, {}, {}
        self.lora_dropout = ModuleDict()
        self.active_adapter = None      # the adapter forward uses (one at a time, as PEFT's API)
        self.merged_adapters = []       # adapters folded into base_layer.weight, in order
        self.disable_adapters = False   # forward as the base layer alone (disable_adapter)
        self.batch_adapter_names = None  # one adapter name per batch row, while routing a mixed batch

    # ---- the frozen weight: read and written in one place each -----------------------------
    def base_weight(self):
        """W0 as a Tensor (frozen). A quantized base layer returns its dequantized weight here."""
        return self.base_layer.weight

    def _write_base_weight(self, new_weight) -> None:
        """Overwrite W0 in place (merge, unmerge, PiSSA's residual). Only a plain float weight can
        take it: a quantized base exposes no Parameter to write into, and is refused."""
        if self.base_is_quantized:
            raise RuntimeError(
                f"the base layer is a 4-bit {type(self.base_layer).__name__}: writing W + s·B A into it "
                "would mean re-quantizing the sum to 16 levels per block, whose steps (about absmax/10) "
                "round away the adapter's small change. Keep the adapter unmerged, or call "
                "lora_numpy.nn.dequantize_linears(model) (merge_and_unload(dequantize=True)) first. "
                "For QPiSSA, run PiSSA on the float model, then quantize_linears.")
        weight = self.base_layer.weight
        if not isinstance(weight, Parameter):
            raise TypeError(f"cannot write into the weight of a {type(self.base_layer).__name__}: it "
                            "is not a plain float Parameter; keep the adapter unmerged")
        weight.data[...] = new_weight.astype(weight.dtype)

    @property
    def base_is_quantized(self) -> bool:
        """True for a 4-bit base (QLoRA): W0 exists only as codes, dequantized when used."""
        return getattr(self.base_layer, "is_quantized", False)

    # ---- adapters -------------------------------------------------------------------------
    def _add_common(self, name: str, config, rng) -> None:
        """Rank, scale and dropout of a new adapter; the subclass adds its factors."""
        if name in self.r:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = config.r, config.lora_alpha, config.use_rslora
        self.scaling[name] = config.scaling
        self.lora_dropout[name] = Dropout(config.lora_dropout, np.random.default_rng(rng.integers(2**63)))

    def _rescale(self, name: str, r: int) -> None:
        """A new rank for adapter ``name`` with its lora_alpha kept: s = alpha/r (rsLoRA alpha/√r)."""
        self.r[name] = r
        self.scaling[name] = self.lora_alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)

    def truncate(self, name: str, k: int) -> None:
        """Replace adapter ``name`` by the best rank-k update (Eckart–Young, via the SVD of
        ΔW = s·B A without forming it), re-factored at the new scale for (k, lora_alpha)."""
        A, B = self.factors(name)
        s = self.scaling[name]
        U, S, Vt = truncate_product(B, A, k)
        self._rescale(name, k)
        B_k, A_k = split_factors(U, S * s, Vt, self.scaling[name])
        self.set_factors(name, A_k, B_k)

    def adapter_params(self, name: str) -> list:
        """The trainable parameters of adapter ``name`` in this layer."""
        params = []
        for container in self.adapter_layer_names:
            entry = getattr(self, container)
            if name in entry:
                value = entry[name]
                params.extend([value] if isinstance(value, Parameter) else value.parameters())
        return params

    def set_adapter(self, name: str | None, trainable: bool = True) -> None:
        """Make ``name`` the active adapter: its parameters train (unless ``trainable`` is False),
        every other adapter's are frozen, as PEFT's ``set_adapter`` does."""
        for other in self.r:
            for p in self.adapter_params(other):
                p.requires_grad = trainable and other == name
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name``. If it was active, the first remaining name (sorted) becomes
        active, with a warning, as in PEFT."""
        for container in self.adapter_layer_names + ("lora_dropout",):
            entry = getattr(self, container)
            if name in entry:
                del entry[name]
        for entry in self._per_adapter_dicts():
            entry.pop(name, None)
        if self.active_adapter == name:
            remaining = sorted(self.r)
            if remaining:
                warnings.warn(f"Adapter {name} was active which is now deleted. Setting active "
                              f"adapter to {remaining[0]}.")
            self.set_adapter(remaining[0] if remaining else None)

    def _per_adapter_dicts(self) -> list:
        return [self.r, self.lora_alpha, self.scaling, self.use_rslora]

    # ---- merging --------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names=None) -> None:
        """Fold the active adapter (or the named ones) into W0: afterwards the layer costs exactly
        what the base layer costs."""
        names = [self.active_adapter] if adapter_names is None else list(adapter_names)
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                self._merge_one(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter back out of W0, last merged first."""
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x):
        if self.disable_adapters:
            return self.base_layer(x)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, self.batch_adapter_names)
        name = self.active_adapter
        if self.merged or name not in self.r:  # merged, or an adapter this layer does not hold
            return self.base_layer(x)
        return self._adapted_forward(x, name)

    def _mixed_batch_forward(self, x, adapter_names):
        """Each batch row through its own adapter (``"__base__"``: none): the base output for
        the whole batch, plus each adapter's LoRA term computed on its own rows only."""
        result = self.base_layer(x)
        rows_of = {}
        for row, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(row)
        pieces, order = [], []
        for name, rows in rows_of.items():
            if name in self.r:
                pieces.append(self._lora_term(x[backend.asarray(rows)], name))
            else:  # the base model for these rows (or an adapter this layer does not hold)
                pieces.append(Tensor(backend.xp.zeros((len(rows),) + result.shape[1:], dtype=result.dtype)))
            order.extend(rows)
        back = backend.asarray(np.argsort(order))  # row i of the batch sits at position back[i]
        return result + cat(pieces, axis=0)[back]

    def extra_repr(self):
        adapters = ", ".join(f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}, "
                             f"scaling={self.scaling[n]:.4g}" for n in self.r)
        return f"{{{adapters}}}, active={self.active_adapter!r}, merged={self.merged}"

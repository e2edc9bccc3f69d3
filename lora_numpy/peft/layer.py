"""Floor 6: ``LoraLinear``, a thin wrapper around the ``Linear`` it adapts (loralib's design).

    h = x W0ᵀ + b  +  s · dropout(x) Aᵀ Bᵀ          W0 (d_out, d_in) frozen
                                                    A (r, d_in), B (d_out, r) trained
                                                    s = lora_alpha / r  (rsLoRA: / √r)

The update ΔW = s·B A has rank at most r, and costs r·(d_in + d_out) parameters instead of
d_in·d_out. B starts at 0, so the adapted model starts exactly equal to the base model.
PiSSA instead starts A, B on W0's top-r singular directions and freezes the residual.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Dropout, Linear, Module, Parameter
from .config import LoraConfig, pissa_niter
from .svd import randomized_svd, split_factors


def check_rank(r: int, linear: Linear, name: str = "") -> None:
    """A rank-r update of a (d_out, d_in) weight needs r <= min(d_in, d_out)."""
    d_out, d_in = linear.weight.shape
    if r > min(d_in, d_out):
        where = f" {name}" if name else ""
        raise ValueError(f"r={r} exceeds min(d_in, d_out) = {min(d_in, d_out)} for the {d_in}->{d_out} "
                         f"Linear{where}: a rank-r update needs r <= both sides")


class LoraLinear(Module):
    """A ``Linear`` plus a low-rank update. Owns ``base_layer``, ``lora_A``, ``lora_B``."""

    def __init__(self, base_layer: Linear, config: LoraConfig, rng):
        check_rank(config.r, base_layer)
        d_out, d_in = base_layer.weight.shape
        self.base_layer = base_layer.requires_grad_(False)  # W0 (and b) stay as pretrained
        self.r, self.lora_alpha = config.r, config.lora_alpha
        self.scaling = config.scaling
        self.lora_dropout = Dropout(config.lora_dropout, np.random.default_rng(rng.integers(2**63)))
        dtype = base_layer.weight.dtype
        self.lora_A = Parameter(backend.xp.zeros((config.r, d_in), dtype=dtype))
        self.lora_B = Parameter(backend.xp.zeros((d_out, config.r), dtype=dtype))
        self.merged = False    # ΔW folded into base_layer.weight
        self.disabled = False  # forward as the base layer alone (disable_adapter)
        self.initial_A = self.initial_B = self.initial_scaling = None  # PiSSA's start (for conversion)
        self._init_weights(config.init_lora_weights, rng)

    def _init_weights(self, init, rng) -> None:
        d_in = self.lora_A.shape[1]
        if init is True:
            # Kaiming-uniform with a=√5, as PEFT and loralib: U(-1/√d_in, 1/√d_in). B stays 0.
            bound = 1.0 / math.sqrt(d_in)
            self.lora_A.data[...] = backend.asarray(rng.uniform(-bound, bound, self.lora_A.shape))
        elif init == "gaussian":
            self.lora_A.data[...] = backend.asarray(rng.normal(0.0, 1.0 / self.r, self.lora_A.shape))
        elif init is False:
            # B random too, so ΔW ≠ 0 from the start: only for tests and experiments.
            bound = 1.0 / math.sqrt(d_in)
            self.lora_A.data[...] = backend.asarray(rng.uniform(-bound, bound, self.lora_A.shape))
            self.lora_B.data[...] = backend.asarray(rng.uniform(-bound, bound, self.lora_B.shape))
        else:
            self._init_pissa(pissa_niter(init), rng)

    def _init_pissa(self, niter: int, rng) -> None:
        """PiSSA: W0 = U S Vᵀ; A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s); the frozen base becomes
        W_res = W0 − s·B A, so W_res + s·B A = W0 and the output is unchanged at step 0.
        (The PiSSA paper names the factors the other way round; these are PEFT's names.)"""
        W = self.base_layer.weight.data
        if niter < 0:
            U, S, Vt = backend.xp.linalg.svd(W.astype("float64"), full_matrices=False)
        else:
            # Its own fixed seed: reloading the adapter must rebuild exactly the same W_res.
            U, S, Vt = randomized_svd(W.astype("float64"), self.r, niter, rng=np.random.default_rng(0))
        Bf, Af = split_factors(U[:, :self.r], S[:self.r], Vt[:self.r], self.scaling)
        self.lora_A.data[...] = Af
        self.lora_B.data[...] = Bf
        W -= (self.scaling * (Bf @ Af)).astype(W.dtype)  # W_res, in place: no copy of the base
        # Kept to convert the trained adapter to plain LoRA form later (ΔW = s(B'A' − B0 A0)).
        self.initial_A, self.initial_B = self.lora_A.data.copy(), self.lora_B.data.copy()
        self.initial_scaling = self.scaling

    def delta_weight(self):
        """ΔW = s · B A, shape (d_out, d_in), as an array."""
        return (self.lora_B.data @ self.lora_A.data) * self.scaling

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base_layer(x)
        drop = self.lora_dropout
        mask = F.dropout_mask(x.shape, drop.p, drop.rng, x.dtype) if drop.training and drop.p > 0 else None
        return F.lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A,
                             self.lora_B, self.scaling, mask)

    def merge(self) -> None:
        """W ← W + s·B A: afterwards the layer costs exactly what the base Linear costs."""
        if not self.merged:
            self.base_layer.weight.data += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        """W ← W − s·B A: back to the frozen base plus a separate adapter."""
        if self.merged:
            self.base_layer.weight.data -= self.delta_weight()
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}"

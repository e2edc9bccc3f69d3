"""Floor 6: ``LoraLinear``, LoRA, PiSSA and DoRA for one ``Linear`` (loralib's ``layers.py``,
PEFT's ``lora.Linear``). Everything that happens to one adapted layer happens here.

    h = x W0ᵀ + b  +  s · dropout(x) Aᵀ Bᵀ          W0 (d_out, d_in) frozen
                                                    A  (r, d_in)      lora_A[name].weight
                                                    B  (d_out, r)     lora_B[name].weight
                                                    s = lora_alpha / r  (rsLoRA: / √r)

The update ΔW = s·B A has rank at most r and costs r·(d_in + d_out) parameters instead of
d_in·d_out. Each factor is a bias-free ``Linear`` (as in PEFT), so state-dict keys read
``q_proj.lora_A.default.weight``. A layer holds any number of named adapters (tuner.py).

Initialisations (``init_lora_weights``):

* ``True`` (default): A keeps ``Linear``'s own default init, Kaiming-uniform with a=√5, i.e.
  U(−1/√d_in, 1/√d_in), as PEFT and loralib do (the LoRA paper says "random Gaussian");
  B = 0, so the adapted model starts exactly equal to the base model.
* ``"gaussian"``: A ~ N(0, std=1/r), B = 0.
* ``False``: A and B both keep ``Linear``'s default init, so ΔW ≠ 0 from the start (for tests).
* ``"pissa"`` / ``"pissa_niter_K"`` (Meng et al. 2024): with W0 = U S Vᵀ,
  A = √(S_r/s) V_rᵀ  (r, d_in),  B = U_r √(S_r/s)  (d_out, r), and W0 is replaced by the residual
  W_res = W0 − s·B A, so the output is unchanged at step 0 and training moves the principal
  directions. The PiSSA paper writes the weight as (d_in, d_out) with Y = X W, and its
  A = U_r S_r^½ of that matrix is (d_in, r): the *input-side* factor, i.e. our ``lora_A``
  transposed (not ``lora_B``); its B = S_r^½ V_rᵀ (r, d_out) is our ``lora_B`` transposed.
  ``_K`` uses a randomized SVD with K power iterations.

DoRA (``use_dora=True``, Liu et al. 2024) splits the adapted weight into a magnitude and a
direction, ``W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row``, with a trained ``m`` (d_out,) starting at
the row norms, so the layer is unchanged at step 0. The norm is a constant in backward (paper
§4.3; PEFT). The paper's "column norm" is our row norm: it writes W as (d_in, d_out).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Linear, Module, ModuleDict, Parameter
from .config import LoraConfig, pissa_niter
from .svd import randomized_svd, split_factors
from .tuner import LoraLayer


@dataclass
class PissaStart:
    """PiSSA's initial factors, kept to convert the trained adapter to plain LoRA form."""
    A: object        # (r0, d_in)
    B: object        # (d_out, r0)
    scaling: float   # s0


class DoraMagnitude(Module):
    """DoRA's magnitude m (d_out,) as ``weight`` (PEFT's key: ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, weight):
        self.weight = Parameter(weight)


def check_rank(r: int, shape, name: str = "") -> None:
    """A rank-r update of a (d_out, d_in) weight needs r <= min(d_in, d_out)."""
    d_out, d_in = shape
    if r > min(d_in, d_out):
        where = f" {name}" if name else ""
        raise ValueError(f"r={r} exceeds min(d_in, d_out) = {min(d_in, d_out)} for the {d_in}->{d_out} "
                         f"layer{where}: a rank-r update needs r <= both sides")


class LoraLinear(LoraLayer):
    """A ``Linear`` plus named low-rank updates: ``base_layer``, ``lora_A``, ``lora_B``
    (and ``lora_magnitude_vector`` for DoRA), each a dict keyed by adapter name."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: Linear, config: LoraConfig, rng, adapter_name: str = "default"):
        super().__init__(base_layer)
        self.lora_A, self.lora_B, self.lora_magnitude_vector = ModuleDict(), ModuleDict(), ModuleDict()
        self.use_dora, self.pissa_start, self.dora_merge_norm = {}, {}, {}
        self.update_layer(adapter_name, config, rng)
        self.set_adapter(adapter_name)

    @staticmethod
    def adapter_shapes(base_layer, config: LoraConfig) -> dict:
        """What one adapter adds to a (d_out, d_in) Linear, by parameter path below the layer,
        with ``{name}`` for the adapter name: r·(d_in + d_out) numbers, + d_out with DoRA."""
        d_out, d_in = base_layer.weight.shape
        check_rank(config.r, (d_out, d_in))
        shapes = {"lora_A.{name}.weight": (config.r, d_in), "lora_B.{name}.weight": (d_out, config.r)}
        if config.use_dora:
            shapes["lora_magnitude_vector.{name}.weight"] = (d_out,)
        return shapes

    def _per_adapter_dicts(self) -> list:
        return super()._per_adapter_dicts() + [self.use_dora, self.pissa_start, self.dora_merge_norm]

    # ---- a new adapter: factors and their initialisation ------------------------------------
    def update_layer(self, name: str, config: LoraConfig, rng) -> None:
        d_out, d_in = self.base_weight().shape
        check_rank(config.r, (d_out, d_in))
        self._add_common(name, config, rng)
        dtype = self.base_weight().dtype
        # nn.Linear's default init for both factors: A ~ U(±1/√d_in), B ~ U(±1/√r)
        self.lora_A[name] = Linear(d_in, config.r, bias=False, rng=rng).to(dtype)
        self.lora_B[name] = Linear(config.r, d_out, bias=False, rng=rng).to(dtype)
        A, B = self.lora_A[name].weight.data, self.lora_B[name].weight.data
        init = config.init_lora_weights
        if init == "gaussian":
            A[...] = backend.asarray(rng.normal(0.0, 1.0 / config.r, A.shape))
        if init is True or init == "gaussian":
            B[...] = 0
        elif init is not False:
            self._init_pissa(name, pissa_niter(init))
        self.use_dora[name] = config.use_dora
        if config.use_dora:  # after the factors: m starts at ‖W0 + s·B A‖_row, so W' = W at step 0
            self.lora_magnitude_vector[name] = DoraMagnitude(self._row_norm(name))

    def _init_pissa(self, name: str, niter: int) -> None:
        """W0 = U S Vᵀ; A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s); the frozen base becomes
        W_res = W0 − s·B A, so W_res + s·B A = W0 and the output is unchanged at step 0."""
        W, r, s = self.base_weight().data.astype("float64"), self.r[name], self.scaling[name]
        if niter < 0:
            U, S, Vt = backend.xp.linalg.svd(W, full_matrices=False)
        else:
            # Its own fixed seed: reloading the adapter must rebuild exactly the same W_res.
            U, S, Vt = randomized_svd(W, r, niter, rng=np.random.default_rng(0))
        B, A = split_factors(U[:, :r], S[:r], Vt[:r], s)
        self.lora_A[name].weight.data[...] = A
        self.lora_B[name].weight.data[...] = B
        self._write_base_weight(W - s * (B @ A))  # W_res, in place: no copy of the base
        A0, B0 = self.lora_A[name].weight.data, self.lora_B[name].weight.data
        self.pissa_start[name] = PissaStart(A0.copy(), B0.copy(), s)

    # ---- the update -------------------------------------------------------------------------
    def factors(self, name: str):
        """(A (r, d_in), B (d_out, r)) of adapter ``name`` as arrays."""
        return self.lora_A[name].weight.data, self.lora_B[name].weight.data

    def delta_weight(self, name: str | None = None):
        """ΔW = s · B A, shape (d_out, d_in), as an array (the active adapter by default)."""
        name = self.active_adapter if name is None else name
        A, B = self.factors(name)
        return (B @ A) * self.scaling[name]

    def _row_norm(self, name: str):
        """‖W0 + s·B A‖ per output row (d_out,), an array: DoRA treats it as a constant."""
        W = self.base_weight().data
        return backend.xp.linalg.norm(W + self.delta_weight(name).astype(W.dtype), axis=1)

    def set_factors(self, name: str, A, B) -> None:
        """New factors for adapter ``name``, of rank ``r[name]`` (``_rescale`` first to change it)."""
        if A.shape[0] != self.r[name] or B.shape[1] != self.r[name]:
            raise ValueError(f"factors of rank {A.shape[0]}/{B.shape[1]} for adapter {name!r} of rank {self.r[name]}")
        dtype, trainable = self.base_weight().dtype, self.lora_A[name].weight.requires_grad
        for factor, value in ((self.lora_A[name], A), (self.lora_B[name], B)):
            factor.weight = Parameter(backend.asarray(value, dtype=dtype), requires_grad=trainable)
            factor.out_features, factor.in_features = value.shape

    def pissa_to_lora_factors(self, name: str):
        """A trained PiSSA adapter (A', B') at scale s' as a LoRA adapter on the original W0:
        ΔW = s'B'A' − s0 B0 A0 = s' · [B' | −(s0/s') B0] [A' ; A0], rank r + r0."""
        start, (A, B) = self.pissa_start[name], self.factors(name)
        ratio = start.scaling / self.scaling[name]
        return (backend.xp.concatenate([A, start.A], axis=0),
                backend.xp.concatenate([B, -ratio * start.B], axis=1))

    # ---- forward ----------------------------------------------------------------------------
    def _lora_term(self, x, name: str):
        """s · dropout(x) Aᵀ Bᵀ, the LoRA path alone (..., d_out)."""
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    def _adapted_forward(self, x, name: str):
        b = self.base_layer.bias
        if not self.use_dora[name]:
            # QLoRA: hand the fused op the 4-bit layer's decoder, not a float W0, so W0 is decoded
            # for each product and dropped instead of staying alive until backward
            W = self.base_layer.dequantized_weight if self.base_is_quantized else self.base_weight()
            drop = self.lora_dropout[name]
            mask = F.dropout_mask(x.shape, drop.p, drop.rng, x.dtype) if drop.training and drop.p > 0 else None
            return F.lora_linear(x, W, b, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name], mask)
        # DoRA, as PEFT computes it on top of the base output (bias added once, not rescaled):
        # y = x W0ᵀ + b + (m/‖·‖ − 1) ⊙ (x W0ᵀ) + (m/‖·‖) ⊙ s·(x Aᵀ Bᵀ)
        W = self.base_weight()
        scale = self.lora_magnitude_vector[name].weight / self._row_norm(name)  # norm: a constant
        base_out = F.linear(x, W)
        xd = self.lora_dropout[name](x)
        # with dropout active, PEFT feeds the dropped-out input to the (m/‖·‖ − 1) term as well
        direction_in = base_out if xd is x else F.linear(xd, W)
        lora_out = self.lora_B[name](self.lora_A[name](xd)) * self.scaling[name]
        out = base_out + (scale - 1.0) * direction_in + scale * lora_out
        return out if b is None else out + b

    def _mixed_batch_forward(self, x, adapter_names):
        dora = sorted({n for n in adapter_names if self.use_dora.get(n)})
        if dora:
            raise ValueError(f"adapters {dora} use DoRA, which mixed-batch serving does not support "
                             "(as in PEFT): serve them one at a time with set_adapter")
        return super()._mixed_batch_forward(x, adapter_names)

    # ---- merge / unmerge --------------------------------------------------------------------
    def _merge_one(self, name: str) -> None:
        """LoRA: W ← W + s·B A. DoRA: W ← (m/‖W + s·B A‖_row) ⊙ (W + s·B A), norm kept for unmerge."""
        W, delta = self.base_weight().data, self.delta_weight(name)
        if self.use_dora[name]:
            norm = self._row_norm(name)
            self.dora_merge_norm[name] = norm
            factor = (self.lora_magnitude_vector[name].weight.data / norm)[:, None]
            self._write_base_weight(factor * (W + delta))
        else:
            self._write_base_weight(W + delta)

    def _unmerge_one(self, name: str) -> None:
        """The exact inverse: W ← W − s·B A, or for DoRA W ← W / (m/‖·‖) − s·B A."""
        W, delta = self.base_weight().data, self.delta_weight(name)
        if self.use_dora[name]:
            factor = (self.lora_magnitude_vector[name].weight.data / self.dora_merge_norm.pop(name))[:, None]
            self._write_base_weight(W / factor - delta)
        else:
            self._write_base_weight(W - delta)

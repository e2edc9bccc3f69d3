"""Floor 4: ``Linear4bit``, a frozen Linear stored in 4 bits (the base layer of QLoRA).

The weight lives as packed 4-bit codes plus its quantization statistics (lora_numpy.quant);
nothing in float32 is kept. Each forward pass dequantizes it, multiplies, and drops the float
copy; backward dequantizes again to pass the gradient to the input (as bitsandbytes'
``matmul_4bit`` does), so no float copy of W is held between the two. There is never a weight
gradient: the codes cannot be trained. LoRA on top of such layers is QLoRA.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..quant import dequantize_4bit, quantize_4bit
from ..tensor import Tensor
from .layers import Linear
from .module import Module, Parameter

# The output heads of the models (language model, sequence and token classification): "all-linear"
# LoRA and 4-bit quantization both leave them alone, as PEFT and QLoRA do.
HEAD_NAMES = ("lm_head", "score", "classifier")
# What quantize_linears leaves in float: the output heads, and a LoRA adapter's own factors
# (stored as Linears named lora_A / lora_B): they are what trains.
FLOAT_PARTS = HEAD_NAMES + ("lora_A", "lora_B")


def matmul_4bit(x: Tensor, packed, quant_state, bias: Tensor | None = None) -> Tensor:
    """``y = x @ deq(W)ᵀ + bias``; x (..., in), W (out, in) as 4-bit codes -> y (..., out).
    bitsandbytes' name. The codes are not a graph input: they get no gradient."""
    W = dequantize_4bit(packed, quant_state)
    lead, d_in = x.shape[:-1], x.shape[-1]
    out = x.data.reshape(-1, d_in) @ W.T
    if bias is not None:
        out = out + bias.data
    del W  # freed now; backward dequantizes again

    def backward(g):  # dx = g deq(W); db = Σ_rows g; no dW
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g2 @ dequantize_4bit(packed, quant_state)).reshape(lead + (d_in,)) if x.requires_grad else None
        if bias is None:
            return [dx]
        return [dx, g2.sum(axis=0) if bias.requires_grad else None]
    parents = (x,) if bias is None else (x, bias)
    # saves nothing: the codes and statistics it reads again are the layer's stored weights
    return Tensor.from_op(out.reshape(lead + (out.shape[-1],)), parents, backward, "matmul_4bit")


class Linear4bit(Linear):
    """A frozen ``Linear`` whose weight is stored as 4-bit codes (bitsandbytes' ``Linear4bit``).

    ``packed`` uint8 (ceil(out·in / 2), 1) and ``quant_state`` hold W (out_features,
    in_features); ``bias`` (out_features,) stays a float Parameter. It is a ``Linear``, so LoRA
    finds it as a target; ``weight`` is a read-only property giving the dequantized weight as a
    frozen Tensor (its array is not writeable: code that would change W in place, a LoRA merge
    or PiSSA's residual, fails loudly instead of editing a temporary copy).
    """
    is_quantized = True

    def __init__(self, packed, quant_state, bias: Parameter | None = None):
        self.out_features, self.in_features = quant_state.shape
        self.packed, self.quant_state = packed, quant_state
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: Linear, blocksize: int = 64, quant_type: str = "nf4",
                    compress_statistics: bool = True) -> "Linear4bit":
        packed, state = quantize_4bit(linear.weight.data, blocksize, quant_type, compress_statistics)
        return cls(packed, state, linear.bias)

    def dequantized_weight(self):
        """W (out_features, in_features) as a fresh float array, decoded from the codes."""
        return dequantize_4bit(self.packed, self.quant_state)

    @property
    def weight(self) -> Tensor:
        W = self.dequantized_weight()
        if isinstance(W, np.ndarray):
            W.flags.writeable = False
        return Tensor(W)  # requires_grad=False: never trained

    def forward(self, x):
        return matmul_4bit(x, self.packed, self.quant_state, self.bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight: packed codes plus statistics (the bias is counted with
        the float parameters)."""
        return int(self.packed.nbytes) + self.quant_state.nbytes

    def dequantize(self) -> Linear:
        """A plain float ``Linear`` with the dequantized weight (the same bias Parameter): the
        explicit way back before merging a LoRA adapter into the weight."""
        linear = Linear.__new__(Linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = Parameter(backend.xp.array(self.weight.data), requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self):
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={s.quant_type}, blocksize={s.blocksize}, "
                f"compress_statistics={s.nested}")


def _replace(model: Module, name: str, module: Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_linears(model: Module, skip=FLOAT_PARTS, blocksize: int = 64, quant_type: str = "nf4",
                     compress_statistics: bool = True) -> Module:
    """Replace, in place, every float ``Linear`` whose path has no part named in ``skip`` by a
    ``Linear4bit``; returns the model. Walks all modules, so the ``base_layer`` inside a LoRA
    layer is found too (PiSSA first, then quantize: that is QPiSSA)."""
    targets = [name for name, m in model.named_modules()
               if name and type(m) is Linear and not set(name.split(".")) & set(skip)]
    for name in targets:
        _replace(model, name, Linear4bit.from_linear(model.get_submodule(name), blocksize,
                                                     quant_type, compress_statistics))
    return model


def dequantize_linears(model: Module) -> Module:
    """Replace, in place, every ``Linear4bit`` by its dequantized float ``Linear``; returns the
    model. After this a LoRA adapter can be merged (into the dequantized weight)."""
    for name in [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        _replace(model, name, model.get_submodule(name).dequantize())
    return model


def frozen_nbytes(model: Module) -> int:
    """Bytes of the frozen base: 4-bit layers' codes and statistics, plus every float
    parameter that does not train. (LoRA's trainable arrays are left out.)"""
    quantized = sum(m.nbytes for _, m in model.named_modules() if isinstance(m, Linear4bit))
    frozen = sum(int(p.data.nbytes) for p in model.parameters() if not p.requires_grad)
    return quantized + frozen

"""Floor 4: modules. ``Module``/``Parameter`` in module.py, the layers in layers.py, the 4-bit
frozen layer of QLoRA in quantized.py."""
from .layers import Dropout, Embedding, LayerNorm, Linear
from .module import LoadResult, Module, ModuleDict, ModuleList, Parameter, ParameterDict
from .quantized import Linear4bit, dequantize_linears, frozen_nbytes, matmul_4bit, quantize_linears

__all__ = ["Dropout", "Embedding", "LayerNorm", "Linear", "Linear4bit", "LoadResult", "Module",
           "ModuleDict", "ModuleList", "Parameter", "ParameterDict", "dequantize_linears",
           "frozen_nbytes", "matmul_4bit", "quantize_linears"]

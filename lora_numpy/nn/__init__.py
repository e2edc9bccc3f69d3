"""Floor 4: modules. ``Module``/``Parameter`` in module.py, the layers in layers.py."""
from .layers import Dropout, Embedding, LayerNorm, Linear
from .module import LoadResult, Module, ModuleDict, ModuleList, Parameter, ParameterDict

__all__ = ["Dropout", "Embedding", "LayerNorm", "Linear", "LoadResult", "Module", "ModuleDict",
           "ModuleList", "Parameter", "ParameterDict"]

"""lora_numpy: LoRA, taught by building it, in Python and NumPy.

The package is a staircase; each module imports only from the floors below it:
backend -> tensor -> functional -> nn -> models -> peft -> train -> cli.
"""
from . import backend
from .backend import set_backend, to_numpy
from .autograd import is_grad_enabled, no_grad
from .combine import cat, stack, where
from .tensor import Tensor

__version__ = "0.1.0"
__all__ = ["Tensor", "backend", "cat", "is_grad_enabled", "no_grad", "set_backend", "stack",
           "to_numpy", "where"]

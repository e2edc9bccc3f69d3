"""Shared fixtures. Tests run on NumPy unless LORA_NUMPY_BACKEND=cupy picks the GPU backend."""
import numpy as np
import pytest

from lora_numpy import Tensor, backend


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def t64(rng):
    """Make a float64 tensor (requiring grad by default) from a shape, for gradchecks."""
    def make(*shape, requires_grad=True, scale=1.0):
        return Tensor(backend.asarray(rng.standard_normal(shape) * scale), requires_grad=requires_grad,
                      dtype="float64")
    return make

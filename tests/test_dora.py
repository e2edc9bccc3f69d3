"""DoRA (Liu et al. 2024) on ``LoraLinear``: the forward formula PEFT computes, a no-op at init,
an exact merge/unmerge, gradients with the row norm held constant (paper §4.3), DoRA in a GPT."""
import numpy as np
import pytest

from lora_numpy import Tensor, backend
from lora_numpy.gradcheck import GradcheckError, gradcheck
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.nn import Linear
from lora_numpy.peft import LoraConfig, LoraLinear, get_peft_model


def _np(a):
    return backend.to_numpy(a)


def dora_layer(init=False, d_in=7, d_out=5, r=3, alpha=6.0, bias=True, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    base = Linear(d_in, d_out, bias=bias, rng=rng).to(dtype)
    layer = LoraLinear(base, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init, use_dora=True), rng)
    return layer.to(dtype)


def parts(layer):
    W = _np(layer.base_layer.weight.data)
    b = _np(layer.base_layer.bias.data) if layer.base_layer.bias is not None else 0.0
    A, B = (_np(a) for a in layer.factors("default"))
    m = _np(layer.lora_magnitude_vector["default"].weight.data)
    return W, b, A, B, m, layer.scaling["default"]


def test_magnitude_starts_at_row_norms_of_the_adapted_weight():
    layer = dora_layer(init=False)  # B ≠ 0: the norm is of W0 + s·B A, not of W0
    W, b, A, B, m, s = parts(layer)
    np.testing.assert_allclose(m, np.linalg.norm(W + s * B @ A, axis=1), rtol=1e-12)
    assert m.shape == (5,)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_forward_equals_the_formula(bias):
    layer = dora_layer(bias=bias)
    rng = np.random.default_rng(3)
    layer.lora_magnitude_vector["default"].weight.data[...] = rng.uniform(0.5, 2.0, 5)  # as after training
    W, b, A, B, m, s = parts(layer)
    x = rng.standard_normal((2, 4, 7))
    norm = np.linalg.norm(W + s * B @ A, axis=1)
    expected = x @ W.T + b + (m / norm - 1) * (x @ W.T) + (m / norm) * (s * (x @ A.T) @ B.T)
    got = _np(layer(Tensor(x)).data)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # the same thing as one weight: magnitude ⊙ direction, bias not rescaled
    np.testing.assert_allclose(got, x @ ((m / norm)[:, None] * (W + s * B @ A)).T + b, rtol=1e-10, atol=1e-12)


def test_dora_is_a_no_op_at_init():
    x = np.random.default_rng(1).standard_normal((3, 7))
    for init in (True, False):  # B = 0: the base; B random: exactly LoRA's output
        layer = dora_layer(init=init)
        W, b, A, B, m, s = parts(layer)
        np.testing.assert_allclose(_np(layer(Tensor(x)).data), x @ (W + s * B @ A).T + b, rtol=1e-12, atol=1e-12)


def test_dora_merge_unmerge_exact():
    layer = dora_layer()
    layer.lora_magnitude_vector["default"].weight.data[...] *= np.linspace(0.5, 1.5, 5)
    x = Tensor(np.random.default_rng(2).standard_normal((3, 7)))
    W0 = _np(layer.base_layer.weight.data).copy()
    before = _np(layer(x).data)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(_np(layer(x).data), before, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(layer.base_layer(x).data), before, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(_np(layer.base_layer.weight.data), W0, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(_np(layer(x).data), before, rtol=1e-12, atol=1e-12)


def test_dora_gradcheck_with_the_norm_held_constant():
    layer = dora_layer()
    layer.lora_magnitude_vector["default"].weight.data[...] *= np.linspace(0.5, 1.5, 5)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = Tensor(np.random.default_rng(4).standard_normal((2, 3, 7)), requires_grad=True, dtype="float64")
    # x and m do not enter the norm: the finite differences see the same function as backward
    assert gradcheck(lambda x, m: layer(x), [x, m])
    # A and B do enter the norm, which backward treats as a constant (paper §4.3, PEFT): so the
    # full derivative differs, and with the norm frozen at its value the gradients are exact.
    with pytest.raises(GradcheckError):
        gradcheck(lambda A, B: layer(x), [A, B])
    frozen = layer._row_norm("default")
    layer._row_norm = lambda name: frozen
    assert gradcheck(lambda A, B: layer(x), [A, B])


def test_dora_in_a_gpt_trains_magnitude_and_factors():
    model = GPT(GPTConfig(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16), 0)
    ids = np.random.default_rng(0).integers(0, 15, (2, 6))
    base_logits = _np(model(ids)[0].data).copy()
    peft = get_peft_model(model, LoraConfig(r=2, use_dora=True))
    np.testing.assert_allclose(_np(peft(ids)[0].data), base_logits, rtol=1e-5, atol=1e-6)
    trainable = sorted(n for n, p in peft.base_model.named_parameters() if p.requires_grad)
    assert "blocks.0.attn.q_proj.lora_magnitude_vector.default.weight" in trainable
    assert len(trainable) == 4 * 3
    peft(ids, ids)[1].backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)

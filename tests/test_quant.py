"""Floor 3-4: 4-bit quantization (``lora_numpy.quant``) and the 4-bit frozen layer (QLoRA).

NF4's construction and bitsandbytes' table, the round-trip bound, packing, double
quantization's bytes, the 4-bit layer's input gradient and lack of a weight gradient, QLoRA
training with bit-identical codes, and QPiSSA's error. Expected values come from the formulas
of DESIGN §8; bitsandbytes' own table is the reference for NF4."""
import copy

import numpy as np
import pytest
from scipy.stats import norm

from lora_numpy import Tensor, backend, quant
from lora_numpy.gradcheck import gradcheck
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.nn import Linear, Linear4bit, Module, dequantize_linears, frozen_nbytes, quantize_linears
from lora_numpy.optim import AdamW
from lora_numpy.peft import LoraConfig, get_peft_model
from lora_numpy.peft.svd import low_rank_approximation

# bitsandbytes.functional.get_4bit_type("nf4"): the reference the derived levels must match.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _np(a):
    return backend.to_numpy(a)


# ---- the levels ---------------------------------------------------------------------------
def test_nf4_levels_have_the_properties_of_their_construction():
    levels = quant.create_normal_map().astype(np.float64)
    assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert np.count_nonzero(levels == 0.0) == 1 and levels[7] == 0.0  # exact zero, 7 below it
    # Undo the normalisation: each side is Φ⁻¹ of equally spaced probabilities, so Φ of the
    # levels (in N(0,1) units) steps by a constant amount from the outermost one to 0.5.
    for side, count in ((levels[8:], 8), (-levels[:7][::-1], 7)):
        scale = norm.ppf(quant.NF4_OFFSET) / side[-1]
        probabilities = norm.cdf(np.concatenate([[0.0], side]) * scale)
        np.testing.assert_allclose(np.diff(probabilities), (quant.NF4_OFFSET - 0.5) / count, rtol=1e-6)


def test_nf4_levels_equal_bitsandbytes_table():
    # Derived in float64; bitsandbytes rounded its quantile positions to float32 first, and
    # near 0.97 one float32 ulp of position moves Φ⁻¹ by ~4e-7 before normalisation: 2e-7.
    np.testing.assert_allclose(quant.create_normal_map(), BNB_NF4, rtol=0, atol=2e-7)


def test_fp4_levels_are_bitsandbytes_e2m1_values():
    levels = quant.create_fp4_map()
    assert levels.shape == (16,) and np.abs(levels).max() == 1.0
    np.testing.assert_array_equal(levels[8:], -levels[:8])  # the high bit is the sign
    assert sorted(np.abs(levels[:8]) * 12) == [0, 0.0625, 2, 3, 4, 6, 8, 12]


def test_dynamic_map_is_sorted_signed_and_spans_minus_one_to_one():
    code = quant.create_dynamic_map()
    assert code.shape == (256,) and np.all(np.diff(code) >= 0)
    assert code[-1] == 1.0 and 0.0 in code and code[0] < -0.99
    assert np.allclose(np.sort(-code[code < 0]), code[(code > 0) & (code < 1)])


# ---- quantize / dequantize -----------------------------------------------------------------
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
@pytest.mark.parametrize("shape", [(64, 128), (7, 33), (3, 5), (1,)])
def test_round_trip_error_is_within_half_the_local_level_spacing(quant_type, shape, rng):
    W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    packed, state = quant.quantize_4bit(W, 64, quant_type)
    W_hat = _np(quant.dequantize_4bit(packed, state))
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype
    levels = np.sort(_np(state.code))
    absmax = np.repeat(_np(state.absmax), 64)[:W.size].reshape(shape)
    scaled = W / absmax
    # Nearest-level rounding: the error is at most half the gap between the two levels around w.
    upper = np.clip(np.searchsorted(levels, scaled), 1, 15)
    half_gap = (levels[upper] - levels[upper - 1]) / 2
    assert np.all(np.abs(W - W_hat) <= half_gap * absmax * (1 + 1e-5) + 1e-12)
    # The block's largest |w| is a level (±1) times absmax: exact.
    for block, amax in zip(np.split(np.pad(W.reshape(-1), (0, -W.size % 64)), state.absmax.size),
                           _np(state.absmax)):
        assert np.abs(block).max() == amax


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 129])
def test_packing_round_trips_and_puts_the_first_code_in_the_high_nibble(n, rng):
    codes = rng.integers(0, 16, size=n).astype(np.uint8)
    packed = quant.pack_4bit(backend.asarray(codes))
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == np.uint8
    np.testing.assert_array_equal(_np(quant.unpack_4bit(packed, n)), codes)
    assert _np(packed)[0, 0] >> 4 == codes[0]


def test_zeros_stay_exactly_zero_and_an_all_zero_block_does_not_divide_by_zero():
    W = np.zeros((2, 64), np.float32)
    W[1, 5] = 0.3
    packed, state = quant.quantize_4bit(W)
    W_hat = _np(quant.dequantize_4bit(packed, state))
    assert np.all(W_hat[0] == 0) and np.all(W_hat[1, :5] == 0) and W_hat[1, 5] == np.float32(0.3)


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="blocksize=60"):
        quant.quantize_4bit(np.ones(64, np.float32), blocksize=60)
    with pytest.raises(ValueError, match="int4"):
        quant.quantize_4bit(np.ones(64, np.float32), quant_type="int4")


# ---- double quantization ---------------------------------------------------------------------
def test_double_quantization_statistics_bytes_match_the_formula(rng):
    n = 64 * 256 * 4  # 1024 blocks of 64, 4 blocks of 256 absmax values
    W = (rng.standard_normal((256, n // 256)) * 0.02).astype(np.float32)
    _, plain = quant.quantize_4bit(W, compress_statistics=False)
    _, double = quant.quantize_4bit(W, compress_statistics=True)
    assert plain.nbytes * 8 / n == quant.statistics_bits_per_parameter(64, False) == 0.5
    # + one float32 per tensor (the offset), which the per-parameter formula leaves out.
    assert (double.nbytes - 4) * 8 / n == quant.statistics_bits_per_parameter(64, True)
    assert quant.statistics_bits_per_parameter(64, True) == pytest.approx(0.127, abs=1e-3)
    assert double.absmax.dtype == np.uint8 and double.state2.blocksize == 256


def test_double_quantization_changes_the_weights_only_by_the_absmax_rounding(rng):
    W = (rng.standard_normal((32, 200)) * 0.02).astype(np.float32)
    packed, plain = quant.quantize_4bit(W)
    packed2, double = quant.quantize_4bit(W, compress_statistics=True)
    np.testing.assert_array_equal(_np(packed), _np(packed2))  # same 4-bit codes
    absmax = _np(quant.dequantize_blockwise(double.absmax, double.state2)) + double.offset
    # The centred absmax values are within half a dynamic-map step (< 1% near ±1) of the truth.
    centred = _np(plain.absmax) - double.offset
    assert np.all(np.abs(absmax - _np(plain.absmax)) <= 0.008 * np.abs(centred).max() + 1e-9)
    assert not np.array_equal(absmax, _np(plain.absmax))


# ---- the 4-bit layer ------------------------------------------------------------------------
def test_linear4bit_input_gradient_passes_gradcheck_and_no_weight_gradient_exists(t64, rng):
    linear = Linear(70, 5, rng=rng).to(np.float64)
    layer = Linear4bit.from_linear(linear, compress_statistics=True)
    layer.bias.requires_grad = True  # bias="all" trains biases even on a 4-bit base
    x = t64(2, 3, 70)
    assert gradcheck(lambda x, b: layer(x), [x, layer.bias])
    W = _np(layer.weight.data)
    np.testing.assert_allclose(_np(layer(x).data), _np(x.data) @ W.T + _np(layer.bias.data), rtol=1e-12)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the codes are no Parameter
    assert not layer.weight.requires_grad
    with pytest.raises(ValueError, match="read-only"):
        layer.weight.data[...] += 1.0  # a merge into the temporary copy would be lost: refused


def test_dequantize_gives_a_float_linear_with_the_same_function(rng):
    linear = Linear(40, 12, rng=rng)
    layer = Linear4bit.from_linear(linear)
    back = layer.dequantize()
    assert type(back) is Linear and back.bias is linear.bias
    x = Tensor(rng.standard_normal((3, 40)).astype(np.float32))
    np.testing.assert_allclose(_np(back(x).data), _np(layer(x).data), rtol=1e-5, atol=1e-6)


def _gpt(seed=0):
    return GPT(GPTConfig(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=32), seed)


def test_quantize_linears_skips_the_head_and_counts_the_bytes():
    model = quantize_linears(_gpt())
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 6 and "lm_head" not in quantized
    assert type(model.lm_head) is Linear
    d = 32  # per block: q, k, v, out (d×d) and fc1, fc2 (d×4d): 12·d² weights
    codes = 2 * 12 * d * d // 2
    stats = sum(m.quant_state.nbytes for _, m in model.named_modules() if isinstance(m, Linear4bit))
    assert sum(m.nbytes for _, m in model.named_modules() if isinstance(m, Linear4bit)) == codes + stats
    model.requires_grad_(False)
    floats = sum(p.data.nbytes for p in model.parameters())
    assert frozen_nbytes(model) == codes + stats + floats


def test_qlora_trains_while_the_packed_codes_stay_bit_identical(rng):
    model = quantize_linears(_gpt())
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = [(n, m) for n, m in peft.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 12  # each now the base_layer of a LoRA layer
    before = {n: (_np(m.packed).copy(), _np(m.quant_state.state2.absmax).copy()) for n, m in layers}
    trainable = [p for p in peft.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=1e-2, weight_decay=0.0)
    idx = rng.integers(0, 15, size=(8, 12))
    losses = []
    for _ in range(30):
        _, loss = peft(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for n, m in layers:
        np.testing.assert_array_equal(_np(m.packed), before[n][0])
        np.testing.assert_array_equal(_np(m.quant_state.state2.absmax), before[n][1])


def test_dequantize_linears_then_merge_gives_one_float_model(rng):
    model = quantize_linears(_gpt())
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    idx = rng.integers(0, 15, size=(2, 10))
    expected = _np(peft(idx)[0].data)
    dequantize_linears(peft.base_model)  # the explicit way: back to float, then merge
    merged = peft.merge_and_unload()
    assert not any(isinstance(m, Linear4bit) for _, m in merged.named_modules())
    np.testing.assert_allclose(_np(merged(idx)[0].data), expected, rtol=1e-4, atol=1e-5)


# ---- QPiSSA ------------------------------------------------------------------------------------
def test_qpissa_error_is_the_residual_quantization_error_and_smaller_on_a_heavy_spectrum(rng):
    # Low rank plus noise: the top directions carry most of the weight, as in pretrained LLMs.
    m, n, r = 96, 128, 8
    W = (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * 0.05
         + rng.standard_normal((m, n)) * 0.01).astype(np.float32)
    linear = Linear(n, m, rng=rng)
    linear.weight.data[...] = W
    holder = _Holder(linear)
    peft = get_peft_model(holder, LoraConfig(r=r, lora_alpha=r, target_modules=("proj",),
                                             init_lora_weights="pissa"))
    quantize_linears(peft.base_model)
    layer = peft.base_model.proj
    assert isinstance(layer.base_layer, Linear4bit)
    qpissa = quant.quantization_error(W, _np(layer.base_layer.weight.data) + _np(layer.delta_weight()))
    qlora = quant.quantization_error(W, _np(quant.dequantize_4bit(*quant.quantize_4bit(
        W, compress_statistics=True))))
    assert qpissa.frobenius < 0.5 * qlora.frobenius and qpissa.nuclear < 0.5 * qlora.nuclear
    # s·B A is exact, so the error is the residual's own quantization error.
    B, A = low_rank_approximation(W.astype(np.float64), r)
    W_res = (W - B @ A).astype(np.float32)
    residual = quant.quantization_error(W_res, _np(quant.dequantize_4bit(*quant.quantize_4bit(
        W_res, compress_statistics=True))))
    assert qpissa.frobenius == pytest.approx(residual.frobenius, rel=0.05)


class _Holder(Module):  # a model with one Linear named "proj"
    def __init__(self, linear):
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def test_quantization_error_norms(rng):
    W = rng.standard_normal((5, 4))
    E = np.diag([3.0, 4.0, 0.0, 0.0])[:5 - 1]
    err = quant.quantization_error(W, W - np.vstack([E, np.zeros((1, 4))]))
    assert err.frobenius == pytest.approx(5.0) and err.nuclear == pytest.approx(7.0)


def test_peft_on_a_quantized_model_copies_deeply(rng):
    model = quantize_linears(_gpt())
    twin = copy.deepcopy(model)
    a, b = model.blocks[0].attn.q_proj, twin.blocks[0].attn.q_proj
    assert a.packed is not b.packed
    np.testing.assert_array_equal(_np(a.packed), _np(b.packed))


def test_merging_into_a_4bit_base_or_pissa_on_it_fails_instead_of_editing_a_temporary_copy():
    peft = get_peft_model(quantize_linears(_gpt()), LoraConfig(r=4, target_modules="all-linear",
                                                               init_lora_weights=False))
    before = _np(peft.blocks[0].attn.q_proj.base_layer.packed).copy()
    with pytest.raises((ValueError, RuntimeError)):
        peft.merge_adapter()
    np.testing.assert_array_equal(_np(peft.blocks[0].attn.q_proj.base_layer.packed), before)
    with pytest.raises((ValueError, RuntimeError)):  # QPiSSA is PiSSA first, then quantize
        get_peft_model(quantize_linears(_gpt()), LoraConfig(r=4, init_lora_weights="pissa"))

"""Optional oracle: ``lora_numpy.quant`` against bitsandbytes' own ``quantize_4bit`` on CPU.

Skipped unless bitsandbytes (and torch) import. The 4-bit codes and the float32 absmax must
match byte for byte, and dequantized weights within float32 rounding. With double
quantization the 8-bit codes of the absmax may differ by one step in a few places: bitsandbytes'
CPU kernel finds the 8-bit code by a binary search that is not always the nearest level, where
lora_numpy takes the nearest; the dequantized weights then differ by at most that one step."""
import numpy as np
import pytest

from lora_numpy import backend, quant

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 128), (7, 33), (3, 5), (300, 77)]


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_codes_and_absmax_equal_bitsandbytes_byte_for_byte(quant_type, shape):
    W = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    W[0, :3] = 0.0
    packed, state = quant.quantize_4bit(W, 64, quant_type)
    packed_bnb, state_bnb = bnb_functional.quantize_4bit(torch.from_numpy(W), blocksize=64,
                                                          quant_type=quant_type)
    np.testing.assert_array_equal(backend.to_numpy(packed), packed_bnb.numpy())
    np.testing.assert_array_equal(backend.to_numpy(state.absmax), state_bnb.absmax.numpy())
    np.testing.assert_allclose(backend.to_numpy(quant.dequantize_4bit(packed, state)),
                               bnb_functional.dequantize_4bit(packed_bnb, state_bnb).numpy(),
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(quant.get_4bit_type(quant_type),
                               bnb_functional.get_4bit_type(quant_type, device="cpu").numpy(), atol=2e-7)


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_matches_bitsandbytes_within_one_8bit_step(quant_type, shape):
    W = (np.random.default_rng(1).standard_normal(shape) * 0.02).astype(np.float32)
    packed, state = quant.quantize_4bit(W, 64, quant_type, compress_statistics=True)
    packed_bnb, state_bnb = bnb_functional.quantize_4bit(torch.from_numpy(W), blocksize=64,
                                                          quant_type=quant_type, compress_statistics=True)
    np.testing.assert_array_equal(backend.to_numpy(packed), packed_bnb.numpy())
    # The offset is a float32 mean: torch and NumPy sum in different orders (an ulp apart).
    assert state.offset == pytest.approx(float(state_bnb.offset), rel=1e-6)
    np.testing.assert_allclose(backend.to_numpy(state.state2.absmax), state_bnb.state2.absmax.numpy(), rtol=1e-6)
    np.testing.assert_allclose(quant.create_dynamic_map(), bnb_functional.create_dynamic_map().numpy(),
                               rtol=0, atol=6e-8)
    absmax = backend.to_numpy(quant.dequantize_blockwise(state.absmax, state.state2)) + state.offset
    absmax_bnb = bnb_functional.dequantize_blockwise(state_bnb.absmax, state_bnb.state2).numpy() + float(state_bnb.offset)
    # One step of the dynamic map near ±1 is 0.9/64 ≈ 0.014 of the largest centred absmax.
    step = 0.015 * float(backend.to_numpy(state.state2.absmax).max())
    np.testing.assert_allclose(absmax, absmax_bnb, rtol=0, atol=step + 1e-6 * float(np.abs(W).max()))
    np.testing.assert_allclose(backend.to_numpy(quant.dequantize_4bit(packed, state)),
                               bnb_functional.dequantize_4bit(packed_bnb, state_bnb).numpy(),
                               rtol=0, atol=step + 1e-6 * float(np.abs(W).max()))

"""Floor 3: 4-bit blockwise quantization (QLoRA), with bitsandbytes' names and layout.

QLoRA (Dettmers et al. 2023) stores a frozen weight in 4 bits per value:

    1. cut the weight, flattened row-major, into blocks of 64 consecutive values;
    2. per block keep ``absmax = max |w|`` (float32) and scale the block into [-1, 1];
    3. replace each scaled value by the index (0..15) of the nearest of 16 levels;
    4. pack two indices per byte, the first value in the high nibble.

Dequantizing is a table lookup: ``w ≈ level[code] · absmax``. The levels are NF4
("4-bit NormalFloat"): quantiles of N(0, 1), because pretrained weights are close to normal, so
each level is used about equally often. Double quantization (``compress_statistics``) quantizes
the absmax values themselves to 8 bits, cutting their overhead from 0.5 to about 0.127 bits per
parameter. ``quantize_4bit``/``dequantize_4bit``/``QuantState`` are bitsandbytes' names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri  # Φ⁻¹, the quantile function of N(0, 1)

from . import backend

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # double quantization's block of absmax values
# NF4's outermost quantile: the mean of 1 − 1/(2·16) and 1 − 1/(2·15). Φ⁻¹(1) = ∞, so the end
# levels sit at the centre of the last of 16 (positive side) or 15 (negative side) equal-mass bins.
NF4_OFFSET = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), in bit-pattern order, before it is
# divided by its largest magnitude 12: code 0b0010 is 8, 0b0011 is 12 (= 8·1.5), and so on.
# It is a format definition, copied from bitsandbytes' get_4bit_type("fp4"), not derived.
FP4_BITPATTERN_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def create_normal_map(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NF4 levels, sorted, in [-1, 1], float32 (16,).

    8 positive levels at Φ⁻¹(linspace(offset, 0.5, 9)[:-1]) and 7 negative at
    −Φ⁻¹(linspace(offset, 0.5, 8)[:-1]), plus an exact 0 (zero padding and zero weights must
    stay exactly zero), normalised by the largest. The asymmetry buys the zero: 4 bits give 16
    codes, and a symmetric set with a zero would have an odd count. bitsandbytes derives the
    same table from float32 quantile positions; computed in float64 here, levels agree with its
    table to 2e-7 (a float32 ulp of the position near 0.97 moves Φ⁻¹ there by ~4e-7).
    """
    positive = ndtri(np.linspace(offset, 0.5, 9)[:-1])
    negative = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return (levels / levels.max()).astype(np.float32)


def create_fp4_map() -> np.ndarray:
    """bitsandbytes' FP4 levels in bit-pattern order (not sorted), scaled into [-1, 1]; (16,)."""
    values = np.array(FP4_BITPATTERN_VALUES, dtype=np.float32)
    return values / np.abs(values).max()


def create_dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit "dynamic" map (Dettmers 2015; its ``create_dynamic_map()``
    with the defaults signed=True, max_exponent_bits=7), sorted float32 (256,).

    A decimal exponent 10^(i−6), i = 0..6, times 2^i linear fractions in [0.1, 1] (the midpoints
    of 2^i equal steps), both signs: the larger the magnitude, the finer the steps, and tiny
    values are still representable. 254 such values, plus 0 and 1.
    """
    data = []
    for i in range(7):
        boundaries = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2)).astype(np.float64)
        data += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    return np.sort(np.array(data + [0.0, 1.0], dtype=np.float32))


def get_4bit_type(quant_type: str) -> np.ndarray:
    """The 16 levels of ``quant_type`` ("nf4" or "fp4"), indexed by the 4-bit code."""
    if quant_type == "nf4":
        return create_normal_map()
    if quant_type == "fp4":
        return create_fp4_map()
    raise ValueError(f"quant_type={quant_type!r}; choose one of {QUANT_TYPES}")


@dataclass
class QuantState:
    """What dequantization needs besides the codes (bitsandbytes' ``QuantState`` fields).

    absmax: float32 (n_blocks,), or with double quantization uint8 codes of ``absmax − offset``
    whose own state is ``state2``; shape/dtype: the original array's; code: the level table.
    """
    absmax: object
    shape: tuple
    dtype: object
    blocksize: int
    code: object
    quant_type: str = "dynamic"
    offset: float | None = None       # mean of the absmax values (double quantization)
    state2: "QuantState | None" = None  # how ``absmax`` itself was quantized

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the statistics stored per tensor: absmax (+ offset and the nested absmax).
        The level tables are constants shared by every tensor, so they are not counted."""
        if not self.nested:
            return int(self.absmax.nbytes)
        return int(self.absmax.nbytes) + 4 + self.state2.nbytes  # offset: one float32


def _blockwise_scale(A, blocksize: int):
    """Flatten A row-major, cut into blocks; return (absmax float32 (n_blocks,), A/absmax
    clipped to [-1, 1], flat float32 (A.size,)). The last block may be short: zero padding
    leaves its max |w| unchanged and is dropped again afterwards."""
    xp = backend.xp
    flat = xp.asarray(A, dtype=np.float32).reshape(-1)
    n_blocks = -(-flat.size // blocksize)
    blocks = xp.zeros(n_blocks * blocksize, dtype=np.float32)
    blocks[:flat.size] = flat
    blocks = blocks.reshape(n_blocks, blocksize)
    absmax = xp.abs(blocks).max(axis=1)
    # Multiply by the reciprocal as bitsandbytes does (exact same rounding); 1e-38 keeps an
    # all-zero block at 0 instead of 0/0.
    inverse = (np.float32(1.0) / xp.maximum(absmax, np.float32(1e-38)))[:, None]
    scaled = xp.clip(blocks * inverse, -1.0, 1.0).reshape(-1)[:flat.size]
    return absmax, scaled


def _nearest_level(scaled, code):
    """Index into ``code`` of the nearest level for every value (ties go to the lower level).
    The decision boundaries are the midpoints between neighbouring sorted levels."""
    xp = backend.xp
    code = xp.asarray(code)
    order = xp.argsort(code, kind="stable")  # FP4's table is in bit-pattern order, not sorted
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / np.float32(2)
    return order[xp.searchsorted(midpoints, scaled, side="left")].astype(np.uint8)


def pack_4bit(codes):
    """uint8 codes in 0..15, (n,) -> uint8 (ceil(n/2), 1): element 2k in the high nibble,
    2k+1 in the low nibble (a zero nibble pads an odd n). bitsandbytes' layout."""
    xp = backend.xp
    padded = xp.zeros(codes.size + codes.size % 2, dtype=np.uint8)
    padded[:codes.size] = codes.reshape(-1)
    return ((padded[0::2] << 4) | padded[1::2]).reshape(-1, 1)


def unpack_4bit(packed, n: int):
    """Inverse of ``pack_4bit``: uint8 (ceil(n/2), 1) -> uint8 codes (n,)."""
    xp = backend.xp
    flat = packed.reshape(-1)
    codes = xp.empty(2 * flat.size, dtype=np.uint8)
    codes[0::2], codes[1::2] = flat >> 4, flat & 0x0F
    return codes[:n]


def quantize_blockwise(A, code=None, blocksize: int = 4096):
    """8-bit blockwise quantization: uint8 codes (shape of A) and their ``QuantState``.
    ``code`` defaults to the signed dynamic map. Used here to compress the absmax values."""
    code = backend.asarray(create_dynamic_map() if code is None else code)
    absmax, scaled = _blockwise_scale(A, blocksize)
    codes = _nearest_level(scaled, code).reshape(np.shape(A))
    return codes, QuantState(absmax, tuple(np.shape(A)), np.dtype(np.float32), blocksize, code)


def _dequantize_blocks(values, absmax, blocksize: int):
    """values (n,) float32 scaled into [-1, 1] times their block's absmax -> float32 (n,)."""
    return values * backend.xp.repeat(absmax, blocksize)[:values.size]


def dequantize_blockwise(codes, quant_state: QuantState):
    """Inverse of ``quantize_blockwise``: ``code[c] · absmax`` in float32."""
    values = quant_state.code[codes.reshape(-1).astype(np.int64)]
    return _dequantize_blocks(values, quant_state.absmax, quant_state.blocksize).reshape(quant_state.shape)


def quantize_4bit(A, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False):
    """Quantize A (any shape) to 4 bits per value: (packed uint8 (ceil(A.size/2), 1), QuantState).

    compress_statistics: double quantization. The float32 absmax values, less their mean
    ``offset``, are quantized in blocks of 256 with the signed 8-bit dynamic map; the state
    keeps ``offset`` and the nested state ``state2`` (256 absmax values share one float32).
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not supported; choose one of {BLOCKSIZES}")
    code = backend.asarray(get_4bit_type(quant_type))
    dtype = np.dtype(getattr(A, "dtype", np.float32))
    if dtype.kind != "f":
        raise TypeError(f"quantize_4bit needs a floating-point array, got dtype {dtype}")
    absmax, scaled = _blockwise_scale(A, blocksize)
    if scaled.size % 2:  # an odd count: pad with a 0.0 so the last byte's low nibble codes zero
        scaled = backend.xp.concatenate([scaled, backend.xp.zeros(1, dtype=np.float32)])
    packed = pack_4bit(_nearest_level(scaled, code))
    state = QuantState(absmax, tuple(np.shape(A)), dtype, blocksize, code, quant_type)
    if compress_statistics:
        offset = absmax.mean(dtype=np.float32)  # centred: the dynamic map is dense near ±1 and 0
        state.absmax, state.state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state.offset = float(offset)
    return packed, state


def dequantize_4bit(packed, quant_state: QuantState):
    """Inverse of ``quantize_4bit``: ``level[code] · absmax``, shape and dtype of the original.
    (The product is formed in float32, as bitsandbytes does, then cast.)"""
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = dequantize_blockwise(absmax, quant_state.state2) + np.float32(quant_state.offset)
    n = int(np.prod(quant_state.shape))
    values = quant_state.code[unpack_4bit(packed, n).astype(np.int64)]
    W = _dequantize_blocks(values, absmax, quant_state.blocksize)
    return W.reshape(quant_state.shape).astype(quant_state.dtype, copy=False)


def statistics_bits_per_parameter(blocksize: int = 64, compress_statistics: bool = False,
                                  nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Overhead of the absmax statistics in bits per weight (the QLoRA paper's §3 figures):
    one float32 per block, 32/64 = 0.5; double-quantized, one byte per block plus one float32
    per 256 blocks, 8/64 + 32/(64·256) ≈ 0.127. (One more float32 per tensor, the offset, is
    negligible and left out, as in the paper.)"""
    if not compress_statistics:
        return 32 / blocksize
    return 8 / blocksize + 32 / (blocksize * nested_blocksize)


def bits_per_parameter(blocksize: int = 64, compress_statistics: bool = False) -> float:
    """Storage of a 4-bit weight including its statistics: 4.5, or ≈ 4.127 bits per weight."""
    return 4 + statistics_bits_per_parameter(blocksize, compress_statistics)


@dataclass
class QuantizationError:
    """‖W − Ŵ‖ in two norms: Frobenius (√Σ e²) and nuclear (Σ singular values of W − Ŵ)."""
    frobenius: float
    nuclear: float


def quantization_error(W, W_approx) -> QuantizationError:
    """Error of an approximation Ŵ of a matrix W (both (m, n)). For QLoRA Ŵ = deq(q(W)); for
    QPiSSA Ŵ = deq(q(W_res)) + s·B A, and since s·B A is exact this is W_res's own error."""
    E = backend.to_numpy(W).astype(np.float64) - backend.to_numpy(W_approx).astype(np.float64)
    return QuantizationError(float(np.linalg.norm(E, "fro")), float(np.linalg.norm(E, "nuc")))

"""GGUF block formats: the torch dequantisation equals the gguf package's own numpy dequantisation bit for
bit for every supported type, on random blocks; the type table matches gguf's; the plain K-quant encoders
write blocks that gguf decodes back close to the input."""

import gguf
import numpy as np
import pytest
import torch

from step1x.checkpoints.gguf_kquant import quantize_k
from step1x.models.dequant import QUANT_TYPES, dequantize

TYPES = list(QUANT_TYPES)
QUANTIZABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
K_TYPES = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
HALF_FIELDS = {"Q8_0": (0,), "Q5_1": (0, 2), "Q5_0": (0,), "Q4_1": (0, 2), "Q4_0": (0,),
               "Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,), "Q2_K": (80, 82)}
"""Byte offsets of the float16 scales in a block (random bytes there could be NaN or infinite)."""


def random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for every code and packed scale, with finite float16 block scales."""
    kind = QUANT_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, kind.type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[name]:
        scales = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16)
        raw[:, offset: offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


def bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.int32)


def test_the_type_table_matches_the_gguf_package():
    for name, kind in QUANT_TYPES.items():
        ggml = gguf.GGMLQuantizationType[name]
        assert kind.id == int(ggml)
        assert (kind.block_size, kind.type_size) == gguf.GGML_QUANT_SIZES[ggml]


@pytest.mark.parametrize("name", [t for t in TYPES if t not in ("F32", "F16", "BF16")])
def test_random_blocks_dequantise_bit_for_bit_as_gguf_does(name):
    kind = QUANT_TYPES[name]
    raw = random_blocks(name, 48, seed=kind.id)
    rows = raw.reshape(4, -1)
    expected = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[name])
    got = dequantize(torch.from_numpy(raw), name, expected.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    np.testing.assert_array_equal(bits(got.numpy()), bits(expected))


@pytest.mark.parametrize("name", QUANTIZABLE + ("BF16", "F16", "F32"))
def test_blocks_gguf_quantised_dequantise_bit_for_bit_as_gguf_does(name):
    values = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32) * 0.05
    ggml = gguf.GGMLQuantizationType[name]
    stored = np.ascontiguousarray(gguf.quants.quantize(values, ggml))
    expected = gguf.quants.dequantize(stored, ggml)
    got = dequantize(torch.from_numpy(stored.view(np.uint8).copy()), name, values.shape)
    np.testing.assert_array_equal(bits(got.numpy()), bits(expected))


def test_dequantisation_casts_to_the_requested_dtype_after_the_float32_arithmetic():
    raw = torch.from_numpy(random_blocks("Q4_K", 2, seed=3))
    full = dequantize(raw, "Q4_K", (2, 256))
    torch.testing.assert_close(dequantize(raw, "Q4_K", (2, 256), torch.bfloat16), full.to(torch.bfloat16),
                               atol=0, rtol=0)


def test_a_wrong_byte_count_names_the_type_and_the_sizes():
    with pytest.raises(ValueError, match=r"Q8_0 data for shape \(2, 64\) must be 136 uint8 bytes, got 100"):
        dequantize(torch.zeros(100, dtype=torch.uint8), "Q8_0", (2, 64))


def test_an_unsupported_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match="GGML type 'IQ4_XS' is not supported; supported: F32, F16, BF16, Q8_0"):
        dequantize(torch.zeros(136, dtype=torch.uint8), "IQ4_XS", (2, 64))


@pytest.mark.parametrize("name, bound", [("Q6_K", 0.03), ("Q5_K", 0.05), ("Q4_K", 0.1), ("Q3_K", 0.2),
                                         ("Q2_K", 0.4)])
def test_the_plain_k_quant_encoders_write_blocks_gguf_decodes_close_to_the_input(name, bound):
    values = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32) * 0.02
    values[3] = np.abs(values[3])  # all-positive and all-negative rows use the min/max paths
    values[4] = -np.abs(values[4])
    stored = quantize_k(values, name)
    assert stored.shape == (16, 2 * QUANT_TYPES[name].type_size)
    decoded = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[name])
    relative_rms = np.sqrt(((decoded - values) ** 2).mean() / (values**2).mean())
    assert relative_rms < bound

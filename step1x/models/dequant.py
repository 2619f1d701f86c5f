"""GGML block formats (the tensor types of GGUF files) dequantised in torch, on whatever device the bytes are.

Each quantised tensor is a run of blocks; a block holds ``block_size`` weights in ``type_size`` bytes (scales
as float16, packed integer codes). The arithmetic is done in float32 in the same order as the ``gguf``
package's numpy reference, so the result is the same bit for bit; :func:`dequantize` then casts to the
dtype the layer computes in. Pure torch: no ``gguf`` import, so a model can run where only torch is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantType:
    name: str
    id: int
    """The GGML type number stored in the file."""
    block_size: int
    type_size: int

    def n_bytes(self, numel: int) -> int:
        return numel // self.block_size * self.type_size

    def row_bytes(self, row: int) -> int:
        if row % self.block_size:
            raise ValueError(f"a row of {row} weights is not a whole number of {self.name} blocks of {self.block_size}")
        return row // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


QUANT_TYPES = {t.name: t for t in (
    QuantType("F32", 0, 1, 4),
    QuantType("F16", 1, 1, 2),
    QuantType("BF16", 30, 1, 2),
    QuantType("Q8_0", 8, 32, 34),
    QuantType("Q5_1", 7, 32, 24),
    QuantType("Q5_0", 6, 32, 22),
    QuantType("Q4_1", 3, 32, 20),
    QuantType("Q4_0", 2, 32, 18),
    QuantType("Q6_K", 14, 256, 210),
    QuantType("Q5_K", 13, 256, 176),
    QuantType("Q4_K", 12, 256, 144),
    QuantType("Q3_K", 11, 256, 110),
    QuantType("Q2_K", 10, 256, 84),
)}
"""The types this pack reads, by GGML name."""

BY_ID = {t.id: t for t in QUANT_TYPES.values()}
DENSE = ("F32", "F16", "BF16")
"""Plain floating-point types: the bytes are the values."""


def quant_type(qtype: int | str | QuantType) -> QuantType:
    if isinstance(qtype, QuantType):
        return qtype
    found = QUANT_TYPES.get(qtype) if isinstance(qtype, str) else BY_ID.get(int(qtype))
    if found is None:
        raise ValueError(f"GGML type {qtype!r} is not supported; supported: {', '.join(QUANT_TYPES)}")
    return found


@lru_cache(maxsize=64)
def _shifts(values: tuple[int, ...], shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _half(raw: Tensor) -> Tensor:
    """Two bytes per row (little-endian float16) -> (n, 1) float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 2k) codes: all low nibbles, then all high nibbles."""
    return torch.cat((qs & 15, qs >> 4), dim=1)


def _bits32(qh: Tensor) -> Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j first-to-last."""
    n = qh.shape[0]
    return ((qh.reshape(n, 4, 1) >> _shifts(tuple(range(8)), (1, 1, 8), qh.device)) & 1).reshape(n, 32)


def _q8_0(b: Tensor) -> Tensor:
    d = _half(b[:, :2])
    return b[:, 2:].view(torch.int8).float() * d


def _q4_0(b: Tensor) -> Tensor:
    d = _half(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: Tensor) -> Tensor:
    d, m = _half(b[:, :2]), _half(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _q5_0(b: Tensor) -> Tensor:
    d = _half(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: Tensor) -> Tensor:
    d, m = _half(b[:, :2]), _half(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return d * q.float() + m


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K block from their 12 packed bytes."""
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat((a & 63, (c & 15) | ((a >> 2) & 48)), dim=1)
    low = torch.cat((b & 63, (c >> 4) | ((b >> 2) & 48)), dim=1)
    return scale, low


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
    dl = (d * (scales & 15).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b.device)) & 3
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _half(b[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts((0, 4), (1, 2, 1), b.device)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), (1, 4, 1), b.device)).reshape(n, 16)
    sc = ((low & 15) | ((high & 3) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b.device)) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> _shifts(tuple(range(8)), (1, 1, 8, 1), b.device)) & 1).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).reshape(n, 256)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dd = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _shifts((0, 4), (1, 1, 2, 1), b.device)) & 15
    return (dd * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dd = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = ((b[:, 48:].reshape(n, 4, 1, 32) >> _shifts((0, 4), (1, 1, 2, 1), b.device)) & 15).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> _shifts(tuple(range(8)), (1, 8, 1), b.device)) & 1
    q = ql | (qh << 4)
    return (dd * q.float() - dm).reshape(n, 256)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(torch.int8).float()
    d = _half(b[:, 208:210])
    dd = (d * sc).reshape(n, 16, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> _shifts((0, 4), (1, 1, 2, 1), b.device)) & 15).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b.device)) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (dd * q.reshape(n, 16, 16).float()).reshape(n, 256)


_BLOCKS = {"Q8_0": _q8_0, "Q5_1": _q5_1, "Q5_0": _q5_0, "Q4_1": _q4_1, "Q4_0": _q4_0,
           "Q6_K": _q6_k, "Q5_K": _q5_k, "Q4_K": _q4_k, "Q3_K": _q3_k, "Q2_K": _q2_k}
_DENSE_VIEWS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize(raw: Tensor, qtype: int | str | QuantType, shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weights of ``shape`` stored as GGML ``qtype`` in the uint8 tensor ``raw``, as ``dtype``, on
    ``raw``'s device."""
    kind = quant_type(qtype)
    shape = torch.Size(shape)
    expected = kind.n_bytes(shape.numel())
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise ValueError(f"{kind.name} data for shape {tuple(shape)} must be {expected} uint8 bytes, "
                         f"got {raw.numel()} of {raw.dtype}")
    raw = raw.contiguous()
    if kind.name in _DENSE_VIEWS:
        return raw.reshape(-1).view(_DENSE_VIEWS[kind.name]).reshape(shape).to(dtype)
    blocks = raw.reshape(-1, kind.type_size)
    return _BLOCKS[kind.name](blocks).reshape(shape).to(dtype)

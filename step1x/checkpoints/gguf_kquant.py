"""Plain round-to-nearest encoders for the K-quant GGUF types (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K).

The ``gguf`` package reads these types but cannot write them, so the converter does not offer them (they
are load-only; llama.cpp's quantizer, with ComfyUI-GGUF's patch, makes them). These encoders exist to build
files of those types for the tests and the latent-error measurement: each block gets its scales from the
min/max (or absolute max) of its sub-blocks and the codes by rounding to nearest. llama.cpp searches the
scales (and weights the error) and so gets a lower error; numbers measured with these encoders are an upper
bound for files made by it.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b``, 0 where ``b`` is 0."""
    out = np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float32)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _half(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bytes (n, 2), the float32 value those bytes hold (n, 1))."""
    h = x.astype(np.float16).reshape(-1, 1)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _codes(x: np.ndarray, scale: np.ndarray, offset: np.ndarray | float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(_div(x + offset, scale)), lo, hi)


def _asymmetric(sub: np.ndarray, levels: int, scale_levels: int):
    """Scales and mins of sub-blocks (n, k, m) for codes 0..levels: w = d*sc*q - dmin*mn."""
    low = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - low) / levels, -low
    d_bytes, d = _half(scale.max(-1) / scale_levels)
    m_bytes, dmin = _half(mins.max(-1) / scale_levels)
    sc = np.clip(np.rint(_div(scale, d)), 0, scale_levels)
    mn = np.clip(np.rint(_div(mins, dmin)), 0, scale_levels)
    q = _codes(sub, (d * sc)[..., None], (dmin * mn)[..., None], 0, levels)
    return d_bytes, m_bytes, sc.astype(np.uint8), mn.astype(np.uint8), q.astype(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (n, 8) into the 12 bytes Q4_K and Q5_K store."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _two_bit_pairs(q: np.ndarray) -> np.ndarray:
    """Codes (n, 256) of 2 bits into 64 bytes: element 128h + 32s + l at byte 32h + l, bits 2s."""
    q = q.reshape(-1, 2, 4, 32)
    return sum(q[:, :, s, :] << (2 * s) for s in range(4)).astype(np.uint8).reshape(-1, 64)


def _q4_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, mn, q = _asymmetric(x.reshape(n, 8, 32), 15, 63)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
    return np.concatenate([d, dmin, _pack_k_scales(sc, mn), qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, mn, q = _asymmetric(x.reshape(n, 8, 32), 31, 63)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)
    qh = sum(((q[:, k] >> 4) & 1) << k for k in range(8)).astype(np.uint8)
    return np.concatenate([d, dmin, _pack_k_scales(sc, mn), qh, qs], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, mn, q = _asymmetric(x.reshape(n, 16, 16), 3, 15)
    return np.concatenate([sc | (mn << 4), _two_bit_pairs(q.reshape(n, 256)), d, dmin], axis=1)


def _symmetric(sub: np.ndarray, code_min: int, scale_max: int):
    """Signed sub-block scales (n, k) for codes around 0 (w = d*sc*q): the weight of largest magnitude
    of each sub-block maps to the code ``code_min`` (-4 or -32), the end with one more level."""
    index = np.abs(sub).argmax(-1)[..., None]
    scale = np.take_along_axis(sub, index, -1)[..., 0] / code_min
    d_bytes, d = _half(np.abs(scale).max(-1) / scale_max)
    sc = np.clip(np.rint(_div(scale, d)), -scale_max - 1, scale_max)
    return d_bytes, d, sc


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    d_bytes, d, sc = _symmetric(sub, -32, 127)
    q = (_codes(sub, (d * sc)[..., None], 0.0, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    low, high = q & 15, q >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
    qh = sum(high[:, :, s] << (2 * s) for s in range(4)).astype(np.uint8).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d_bytes], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    d_bytes, d, sc = _symmetric(sub, -4, 31)
    q = _codes(sub, (d * sc)[..., None], 0.0, -4, 3).astype(np.int8).reshape(n, 256)
    high = (q >= 0).astype(np.uint8)
    low = (q + 4 * (1 - high)).astype(np.uint8)
    hb = high.reshape(n, 8, 32)
    hmask = sum(hb[:, b] << b for b in range(8)).astype(np.uint8)
    v = (sc + 32).astype(np.uint8)
    scales = np.concatenate([(v[:, :8] & 15) | ((v[:, 8:] & 15) << 4),
                             sum(((v[:, 4 * s: 4 * s + 4] >> 4) & 3) << (2 * s) for s in range(4)).astype(np.uint8)],
                            axis=1)
    return np.concatenate([hmask, _two_bit_pairs(low), scales, d_bytes], axis=1)


ENCODERS = {"Q6_K": _q6_k, "Q5_K": _q5_k, "Q4_K": _q4_k, "Q3_K": _q3_k, "Q2_K": _q2_k}


def quantize_k(rows: np.ndarray, name: str) -> np.ndarray:
    """Rows (..., cols) of float weights, cols a multiple of 256, as ``name`` blocks: uint8 (..., bytes per row)."""
    if name not in ENCODERS:
        raise ValueError(f"{name} is not a K-quant type; choose one of {', '.join(ENCODERS)}")
    rows = np.asarray(rows, dtype=np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"{name} needs rows of a multiple of {QK_K} weights, got {rows.shape[-1]}")
    blocks = ENCODERS[name](rows.reshape(-1, QK_K))
    return np.ascontiguousarray(blocks).reshape(*rows.shape[:-1], -1)

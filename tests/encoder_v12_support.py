"""Helpers for the v1.2 encoder tests: the reference set's source images and its tiny Qwen2.5-VL.

The v1.2 reference set (``tokens_v12.json``, ``embeds_v12.safetensors``) was made from blocky random
images, and from a tiny Qwen2.5-VL whose 151936x48 embedding is not stored but given as an integer-hash
formula (``tiny_qwen25vl/embed_rule.json``). Both are rebuilt here."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

EMBED_KEY = "model.language_model.embed_tokens.weight"
MASK32 = np.uint64(0xFFFFFFFF)


def reference_image(width: int, height: int) -> Image.Image:
    """The reference set's source image: uint8 colours from ``numpy.random.default_rng(W*7+H)`` on a grid of
    16-pixel cells, bilinearly enlarged to ``width x height``."""
    rng = np.random.default_rng(width * 7 + height)
    cells = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(cells, mode="RGB").resize((width, height), Image.Resampling.BILINEAR)


def rgb_sha256(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes()).hexdigest()


def embed_table(rows: int, cols: int) -> np.ndarray:
    """``E[i,j] = (h - 2048) / 2048`` with ``a = (40503 i + 9973 j + 12345) mod 2^32`` and
    ``h = ((2654435761 a) mod 2^32) >> 20``, in unsigned 64-bit arithmetic (wrapping is well defined)."""
    i = np.arange(rows, dtype=np.uint64)[:, None]
    j = np.arange(cols, dtype=np.uint64)[None, :]
    a = (i * np.uint64(40503) + j * np.uint64(9973) + np.uint64(12345)) & MASK32
    h = ((a * np.uint64(2654435761)) & MASK32) >> np.uint64(20)
    return ((h.astype(np.int64) - 2048) / 2048).astype(np.float32)


def check_embed_table(table: np.ndarray, rule: dict) -> None:
    """Raise unless ``table`` has the rule's shape, check rows and sha256."""
    assert list(table.shape) == rule["shape"]
    for row, values in rule["check_rows"].items():
        np.testing.assert_array_equal(table[int(row)], np.asarray(values, dtype=np.float32), err_msg=f"row {row}")
    assert hashlib.sha256(table.tobytes()).hexdigest() == rule["sha256_fp32"]


def build_fixture_qwen(v12_dir: Path, dst: Path) -> Path:
    """The reference set's tiny Qwen2.5-VL as a model folder: its config.json and weights, plus a second
    safetensors file with the rebuilt embedding table."""
    src = v12_dir / "tiny_qwen25vl"
    rule = json.loads((src / "embed_rule.json").read_text(encoding="utf-8"))
    table = embed_table(*rule["shape"])
    check_embed_table(table, rule)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    save_file({EMBED_KEY: torch.from_numpy(table)}, dst / "embed_tokens.safetensors")
    return dst

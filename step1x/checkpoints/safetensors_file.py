"""Reading safetensors files defensively: header only, size checks, and errors that name the file.

Only safetensors are read. Pickle checkpoints (.ckpt, .pt, .bin) are refused, because loading them can
run arbitrary code.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A model file that is missing, unreadable, truncated or not the kind that was asked for."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header without reading tensor data."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a single .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is a pickle checkpoint ({path.suffix}); only .safetensors files are loaded, because "
            "pickle files can run code. Download the .safetensors release of this model instead."
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is empty or truncated ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path} is not a safetensors file (or its header is cut off): download it again, or check "
                "that you picked the right file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (unexpected header)")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    end = 0
    for key, info in header.items():
        try:
            tensors[key] = TensorInfo(info["dtype"], tuple(info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path} has a malformed entry for tensor {key!r}; download it again") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end:,} bytes but the file has {size:,}. "
            "The download was probably interrupted; download it again."
        )
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def open_tensors(path: Path):
    """A lazy safetensors reader on the CPU."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {exc}") from exc

"""Finding the Qwen2.5-VL tensors of a Hugging Face folder or of one ComfyUI ``text_encoders`` file.

Only safetensors are read, headers first (with the checks of :func:`step1x.checkpoints.safetensors_file.read_header`);
tensors are read one at a time when assigned. Pickle checkpoints (.bin, .pt, .ckpt) are refused because
loading them can run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints.safetensors_file import PICKLE_SUFFIXES, CheckpointError, read_header
from . import keys as K

FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".inv_freq")


@dataclass(frozen=True)
class Entry:
    file: Path
    stored: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint:
    """Tensors of one checkpoint under canonical names (see ``keys``), with their fp8 scales."""

    path: Path
    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)
    scales: dict[str, Entry] = field(default_factory=dict)
    scaled_fp8: bool = False

    def shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.shape

    def by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for key, entry in self.entries.items():
            out.setdefault(entry.file, []).append(key)
        return out

    def read(self, handle, key: str) -> torch.Tensor:
        return handle.get_tensor(self.entries[key].stored)

    def read_scale(self, handle, key: str) -> torch.Tensor | None:
        entry = self.scales.get(key)
        return None if entry is None else handle.get_tensor(entry.stored)


def is_fp8(dtype_name: str) -> bool:
    return dtype_name.startswith("F8")


def open_checkpoint(path: str | os.PathLike, *, keep_lm_head: bool = False) -> Checkpoint:
    """The Qwen2.5-VL tensors of ``path``; ``lm_head`` is left out unless ``keep_lm_head`` (text generation)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text encoder not found: {path}")
    if path.is_dir():
        return _collect(path, "folder", _folder_files(path), keep_lm_head)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint; only .safetensors files are loaded (pickle can run code). "
            "Use qwen_2.5_vl_7b.safetensors or the safetensors shards of Qwen2.5-VL-7B-Instruct."
        )
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{path} is not a .safetensors file or a model folder; give the Qwen2.5-VL-7B-Instruct folder or "
            "ComfyUI's qwen_2.5_vl_7b*.safetensors text encoder."
        )
    return _collect(path, "file", [path], keep_lm_head)


def _folder_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: the index lists shards that are missing: {', '.join(missing[:4])}. "
                "Download the complete model folder."
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found only pickle files: {', '.join(pickles[:3])})" if pickles else ""
        raise CheckpointError(
            f"no .safetensors weights in {folder}{hint}. Download Qwen2.5-VL-7B-Instruct with its safetensors shards."
        )
    return files


def _collect(path: Path, kind: str, files: list[Path], keep_lm_head: bool = False) -> Checkpoint:
    raw: dict[str, Entry] = {}
    for file in files:
        for stored, info in read_header(file).tensors.items():
            raw[stored] = Entry(file, stored, info.shape, info.dtype)
    ckpt = Checkpoint(path=path, kind=kind)
    prefix = K.find_prefix(raw) or ""
    for stored, entry in raw.items():
        if stored == FP8_MARKER or stored == prefix + FP8_MARKER:
            ckpt.scaled_fp8 = True
            continue
        if not stored.startswith(prefix):
            continue
        name = K.canonical(stored[len(prefix) :])
        if name.endswith(IGNORED_SUFFIXES) or (K.is_dropped(name) and not keep_lm_head):
            continue
        scale_suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix:
            ckpt.scales[name[: -len(scale_suffix)] + ".weight"] = entry
            continue
        ckpt.entries[name] = entry
    return ckpt

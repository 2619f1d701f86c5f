"""Reading GGUF files (llama.cpp's format, as ComfyUI-GGUF's tools write it for image models) defensively:
the magic, the types, the sizes, and errors that name the file.

Conventions of those files: ``general.architecture`` names the model family ("flux" for FLUX-style DiTs,
Step1X-Edit included); tensor names are the original checkpoint keys; a tensor's dimensions are stored
innermost first, so the torch shape is their reverse, unless a ``comfy.gguf.orig_shape.<name>`` array gives
it (tensors reshaped before quantising); 1-D and small tensors are kept in F32, the rest in F16/BF16 or a
quantised type. The ``gguf`` package parses the file; the tensors are memory-mapped until copied out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.dequant import BY_ID, DENSE, QUANT_TYPES, QuantType, dequantize
from .safetensors_file import CheckpointError, Header, TensorInfo

GGUF_MAGIC = b"GGUF"
ARCH_KEY = "general.architecture"
CONFIG_KEY = "step1x.config"
"""A Step1X-Edit config (JSON) for sizes that cannot be inferred from the shapes (tiny and custom models)."""
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
DIT_ARCHITECTURES = ("flux",)
"""Architecture names a Step1X-Edit DiT GGUF carries (ComfyUI-GGUF's converter calls every FLUX-style DiT
"flux"); a file without the key is checked by its tensor names alone."""
INSTALL_HINT = "reading and writing .gguf files needs the gguf package: pip install gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file: by its suffix, or by its first bytes (a renamed file)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError(INSTALL_HINT) from None
    return gguf


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    name: str
    qtype: QuantType
    shape: torch.Size
    """The torch (logical) shape."""
    data: np.ndarray = field(repr=False)
    """The stored bytes (memory-mapped; typed for F32/F16)."""

    @property
    def quantized(self) -> bool:
        return self.qtype.name not in DENSE

    @property
    def n_bytes(self) -> int:
        return self.qtype.n_bytes(self.shape.numel())

    def raw(self) -> torch.Tensor:
        """A copy of the stored bytes as a uint8 tensor in the stored layout (rows..., bytes per row)."""
        return torch.from_numpy(np.array(self.data, copy=True).view(np.uint8))

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values as a float tensor of :attr:`shape` (dequantised, in torch)."""
        return dequantize(self.raw(), self.qtype, self.shape, dtype)


@dataclass(eq=False)
class GGUFFile:
    path: Path
    architecture: str | None
    metadata: dict[str, str]
    """The string-valued fields (architecture, names, :data:`CONFIG_KEY` ...)."""
    tensors: dict[str, GGUFTensor]

    def header(self) -> Header:
        """The file as a safetensors-style :class:`Header`, so the same key and shape logic reads both
        formats. Dense tensors carry their type name (F32, F16, BF16); quantised ones appear as their
        storage, U8."""
        infos = {name: TensorInfo("U8" if t.quantized else t.qtype.name, tuple(t.shape))
                 for name, t in self.tensors.items()}
        meta = {"step1x_config": self.metadata[CONFIG_KEY]} if CONFIG_KEY in self.metadata else {}
        return Header(self.path, infos, meta)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and check a GGUF file; tensor data stays memory-mapped until :meth:`GGUFTensor.raw` copies it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a single .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF'"
                              f"{'; it is empty' if size == 0 else ''}): download it again, or pick the right file")
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as exc:
        if "GGMLQuantizationType" in str(exc):
            raise CheckpointError(
                f"{path.name} has a tensor of a quantisation type the installed gguf package does not know ({exc}); "
                f"update it (pip install -U gguf) or use a file of a supported type ({', '.join(QUANT_TYPES)})"
            ) from None
        raise _damaged(path, size, exc) from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError, OSError) as exc:
        raise _damaged(path, size, exc) from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path.name} is a GGUF file of the other byte order (big-endian); convert it again on "
                              "a little-endian machine")
    metadata = {}
    for key, entry in reader.fields.items():
        if entry.types == [gguf.GGUFValueType.STRING]:
            metadata[key] = bytes(entry.parts[entry.data[-1]]).decode("utf-8", errors="replace")
    tensors = {}
    for t in reader.tensors:
        qtype = BY_ID.get(int(t.tensor_type))
        if qtype is None:
            name = getattr(t.tensor_type, "name", str(int(t.tensor_type)))
            raise CheckpointError(
                f"{path.name}: tensor {t.name} is stored as {name}, which this pack does not read. Supported types: "
                f"{', '.join(QUANT_TYPES)}; convert the model again with one of them."
            )
        shape = _orig_shape(reader, gguf, path, t.name) or torch.Size(int(n) for n in reversed(t.shape.tolist()))
        if qtype.n_bytes(shape.numel()) != t.data.nbytes or int(t.data_offset) + t.data.nbytes > size:
            raise _damaged(path, size, f"tensor {t.name} ends beyond the file or has the wrong size")
        tensors[t.name] = GGUFTensor(t.name, qtype, shape, t.data)
    architecture = metadata.get(ARCH_KEY)
    return GGUFFile(path, architecture, metadata, tensors)


def _damaged(path: Path, size: int, cause) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or damaged ({size:,} bytes; the GGUF reader says: {cause}). The download or "
        "conversion was probably interrupted; download or convert it again."
    )


def _orig_shape(reader, gguf, path: Path, name: str) -> torch.Size | None:
    entry = reader.fields.get(ORIG_SHAPE_PREFIX + name)
    if entry is None:
        return None
    if entry.types[:1] != [gguf.GGUFValueType.ARRAY]:
        raise CheckpointError(f"{path.name}: {ORIG_SHAPE_PREFIX}{name} is not an array of integers")
    return torch.Size(int(entry.parts[i][0]) for i in entry.data)

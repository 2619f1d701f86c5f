"""Writing the Step1X-Edit DiT as GGUF (``python -m step1x quantize``), in the layout ComfyUI-GGUF's tools
write for FLUX-style models: architecture "flux", the official key names, torch shapes stored innermost first.

Which tensor gets which type (:func:`planned_type`):

- the Linear weights of the 19 double and 38 single blocks (``img_attn.qkv``, ``img_attn.proj``, ``img_mlp``,
  ``img_mod.lin`` and their ``txt_`` twins, ``linear1``, ``linear2``, ``modulation.lin``: 95% of the weights)
  get the chosen type; a matrix whose rows are not a whole number of blocks falls back to F16, as
  ComfyUI-GGUF does (none in the released model);
- 1-D tensors (biases, norm scales) and tensors of at most 1,024 values stay F32, as ComfyUI-GGUF keeps them;
- every other matrix (img_in, txt_in, time_in, vector_in, final_layer and the whole connector) stays in the
  precision of the source: BF16 for the official bf16 release (lossless), F16 or F32 for such sources.

The file is written tensor by tensor into a temporary file next to the destination and renamed into place
at the end, so an interrupted run never leaves a partial file under the final name; the free disk space is
checked first. The ``gguf`` package quantises (its numpy reference code): Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 and
the float types. It cannot write the K-quants; :func:`save_gguf` writes them for tests and measurements with
the plain encoders of :mod:`.gguf_kquant`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..models.configs import DiTParams
from ..models.dequant import QUANT_TYPES, quant_type
from ..models.model import Step1XEdit
from .gguf_file import CONFIG_KEY, is_gguf
from .gguf_kquant import ENCODERS as K_ENCODERS
from .gguf_kquant import quantize_k
from .loading import _BLOCK_LINEAR, CONFIG_METADATA_KEY, _inspect_dit
from .safetensors_file import DTYPES, CheckpointError, open_tensors, read_header

ARCHITECTURE = "flux"
CONVERT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "F32")
"""The types the converter writes (those the gguf package can quantise), best first."""
LOAD_ONLY_TYPES = tuple(K_ENCODERS)
"""Read by the loader, written by llama.cpp's quantizer (ComfyUI-GGUF's tools), not by the converter."""
SMALL = 1024
"""Tensors of at most this many values stay F32."""
ALIGNMENT = 32
HEADER_ALLOWANCE = 4 * 2**20
"""Room for the header (names, metadata) when checking the free space."""


def planned_type(key: str, shape: tuple[int, ...], source: torch.dtype, qtype: str) -> str:
    """The GGUF type the tensor ``key`` (official name) of ``shape``, stored as ``source``, is written in."""
    numel = int(np.prod(shape)) if shape else 1
    if len(shape) <= 1 or numel <= SMALL:
        return "F32"
    if _BLOCK_LINEAR.match(key):
        return qtype if shape[-1] % QUANT_TYPES[qtype].block_size == 0 else "F16"
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(source, "BF16" if source.itemsize == 1 else "F32")


def encode(values: torch.Tensor, type_name: str) -> np.ndarray:
    """``values`` as the array GGUF stores for ``type_name``: float32/float16 values, or uint8 bytes of
    shape (rows..., bytes per row) for BF16 and the quantised types."""
    if type_name == "F32":
        return values.detach().float().cpu().numpy()
    if type_name == "F16":
        return values.detach().to(torch.float16).cpu().numpy()
    if type_name == "BF16":
        bits = values.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy()
        return bits.view(np.uint8)
    floats = values.detach().float().cpu().numpy()
    if type_name in K_ENCODERS:
        return quantize_k(floats, type_name)
    gguf = _gguf()
    return np.ascontiguousarray(gguf.quants.quantize(floats, gguf.GGMLQuantizationType[type_name]))


def _gguf():
    from .gguf_file import import_gguf

    return import_gguf()


@dataclass(frozen=True)
class Planned:
    name: str
    shape: tuple[int, ...]
    type_name: str
    load: Callable[[], torch.Tensor]

    @property
    def n_bytes(self) -> int:
        return quant_type(self.type_name).n_bytes(int(np.prod(self.shape)) if self.shape else 1)


@dataclass(frozen=True)
class Written:
    path: Path
    n_bytes: int
    types: dict[str, int]
    """Tensor count per GGUF type."""

    def summary(self) -> str:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        return f"wrote {self.path} ({self.n_bytes / 2**30:.2f} GiB): {sum(self.types.values())} tensors ({counts})"


def write_gguf(dst: str | os.PathLike, tensors: list[Planned], *, file_type: str, metadata: Mapping[str, str] = (),
               progress: bool = False) -> Written:
    """Write ``tensors`` (in order) as a GGUF file at ``dst``, atomically, after checking the free space."""
    gguf = _gguf()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    total = sum(_padded(t.n_bytes) for t in tensors) + HEADER_ALLOWANCE
    free = shutil.disk_usage(dst.parent).free
    if free < total:
        raise CheckpointError(f"{dst.parent} has {free / 2**30:.2f} GiB free, but the {file_type} file needs about "
                              f"{total / 2**30:.2f} GiB; free some space or write it to another disk")
    writer = gguf.GGUFWriter(None, ARCHITECTURE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    ftype = _file_type(gguf, file_type)
    if ftype is not None:
        writer.add_file_type(ftype)
    for key, value in dict(metadata).items():
        writer.add_string(key, value)
    for t in tensors:
        kind = gguf.GGMLQuantizationType[t.type_name]
        if t.type_name in ("F32", "F16"):
            dtype = np.float32 if t.type_name == "F32" else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.n_bytes)
        else:
            writer.add_tensor_info(t.name, _byte_shape(t.shape, t.type_name), np.dtype(np.uint8), t.n_bytes,
                                   raw_dtype=kind)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _bar(progress, sum(t.n_bytes for t in tensors), file_type) as bar:
            for t in tensors:
                data = encode(t.load(), t.type_name)
                if data.nbytes != t.n_bytes:
                    raise CheckpointError(f"{t.name}: encoded {data.nbytes} bytes, expected {t.n_bytes}")
                writer.write_tensor_data(data)
                bar.update(t.n_bytes)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return Written(dst, dst.stat().st_size, dict(Counter(t.type_name for t in tensors)))


def _padded(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _byte_shape(shape: tuple[int, ...], type_name: str) -> tuple[int, ...]:
    return (*shape[:-1], quant_type(type_name).row_bytes(shape[-1]))


def _file_type(gguf, type_name: str):
    names = ("ALL_F32",) if type_name == "F32" else (f"MOSTLY_{type_name}", f"MOSTLY_{type_name}_M")
    return next((gguf.LlamaFileType[n] for n in names if n in gguf.LlamaFileType.__members__), None)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(enabled: bool, total: int, type_name: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {type_name}")


# --------------------------------------------------------------------------------------------- sources


def save_gguf(state: Mapping[str, torch.Tensor], dst: str | os.PathLike, qtype: str, *,
              params: DiTParams | None = None) -> Written:
    """Write a DiT state dict (official key names) as GGUF with the block weights in ``qtype`` (any of the
    13 types; the K-quants with the plain encoders of :mod:`.gguf_kquant`). ``params`` are stored in the
    file for sizes the loader cannot infer (tiny models)."""
    quant_type(qtype)
    planned = [Planned(k, tuple(v.shape), planned_type(k, tuple(v.shape), v.dtype, qtype), lambda v=v: v)
               for k, v in state.items()]
    meta = {CONFIG_KEY: json.dumps(params.to_dict())} if params is not None else {}
    return write_gguf(dst, planned, file_type=qtype, metadata=meta)


def convert(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, overwrite: bool = False,
            progress: bool = False) -> Written:
    """Quantise the Step1X-Edit DiT ``src`` (.safetensors: bf16, fp16, fp32 or fp8) into the GGUF file ``dst``."""
    if qtype in LOAD_ONLY_TYPES:
        raise CheckpointError(f"{qtype} cannot be written here (the gguf package has no {qtype} quantizer); choose one "
                              f"of {', '.join(CONVERT_TYPES)}, or make {qtype} files with llama.cpp's quantizer")
    if qtype not in CONVERT_TYPES:
        raise CheckpointError(f"unknown type {qtype!r}; choose one of {', '.join(CONVERT_TYPES)}")
    src, dst = Path(src), Path(dst)
    if is_gguf(src):
        raise CheckpointError(f"{src.name} is already a GGUF file; quantize reads the .safetensors DiT")
    if dst.suffix.lower() != ".gguf":
        raise CheckpointError(f"the output {dst} should end in .gguf, so that the loaders list it")
    if dst.exists():
        if dst.resolve() == src.resolve():
            raise CheckpointError(f"the output {dst} is the input file; choose another name")
        if not overwrite:
            raise CheckpointError(f"{dst} exists; pass --force to replace it")
    header = read_header(src)
    info = _inspect_dit(header)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Step1XEdit(info.params).state_dict().items()}
    source = {k: header.tensors[info.prefix + k] for k in shapes if info.prefix + k in header.tensors}
    missing = sorted(shapes.keys() - source.keys())
    if missing:
        raise CheckpointError(f"{src.name} lacks {len(missing)} DiT tensors (e.g. {', '.join(missing[:3])}); the file "
                              "is incomplete. Download it again.")
    with open_tensors(src) as f:
        def load(key: str) -> torch.Tensor:
            full = info.prefix + key
            tensor = f.get_tensor(full)
            scale = full[: -len("weight")] + "scale_weight" if full.endswith(".weight") else None
            if scale in header.tensors:  # scaled fp8
                tensor = tensor.float() * f.get_tensor(scale).float()
            return tensor

        planned = [Planned(k, shapes[k], planned_type(k, shapes[k], DTYPES.get(source[k].dtype, torch.float32), qtype),
                           lambda k=k: load(k)) for k in shapes]
        meta = {}
        if CONFIG_METADATA_KEY in header.metadata:
            meta[CONFIG_KEY] = header.metadata[CONFIG_METADATA_KEY]
        meta["general.name"] = f"Step1X-Edit {info.version} DiT {qtype}"
        return write_gguf(dst, planned, file_type=qtype, metadata=meta, progress=progress)


# ----------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Bytes of a DiT converted to one type: in the file, and resident after :func:`load_dit` (quantised
    block weights as stored, everything else in the compute dtype)."""

    file: int
    quantized: int
    """Resident bytes of the block weights kept quantised (0 for the float types)."""
    dense: int
    """Resident bytes of everything else, in the compute dtype."""

    @property
    def resident(self) -> int:
        return self.quantized + self.dense


def planned_sizes(params: DiTParams, qtype: str, *, source: torch.dtype = torch.bfloat16,
                  compute: torch.dtype = torch.bfloat16) -> Sizes:
    """:class:`Sizes` of the DiT of ``params`` (stored as ``source``) converted to ``qtype``, from the shapes
    alone (the model is built on the meta device)."""
    with torch.device("meta"):
        state = Step1XEdit(params).state_dict()
    file = quantized = dense = 0
    for key, value in state.items():
        kind = quant_type(planned_type(key, tuple(value.shape), source, qtype))
        n_bytes = kind.n_bytes(value.numel())
        file += _padded(n_bytes)
        if kind.name not in ("F32", "F16", "BF16") and _BLOCK_LINEAR.match(key):
            quantized += n_bytes
        else:
            dense += value.numel() * compute.itemsize
    return Sizes(file, quantized, dense)

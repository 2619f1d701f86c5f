"""Loading the Step1X-Edit DiT from a GGUF file: the large block matrices stay quantised, the rest is
dequantised once into the compute dtype.

The file is checked with the same key and shape logic as a safetensors file (version, sizes, "this is a
FLUX.1-dev model" ...), through :meth:`GGUFFile.header`. The transformer blocks' Linear weights that the
file stores quantised (Q8_0 ... Q2_K) are kept as their raw bytes in a Linear that dequantises them per call
on the compute device (:class:`~step1x.models.quantized.QuantizedLinear`); everything else (embedders, final
layer, connector, norms, biases; F32/F16/BF16 block weights) is loaded like a safetensors file, in the compute
dtype. An explicit ``weight_dtype`` (fp8, bf16 ...) dequantises the block weights at load time into it.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..models.attention import select_backend
from ..models.model import Step1XEdit
from ..models.ops import CastOps
from ..models.quantized import QuantizedOps, holds_quantized, quantized_bytes, set_quantized
from .assign import check_file, declared_tensors
from .gguf_file import DIT_ARCHITECTURES, GGUFFile, read_gguf
from .loading import _BLOCK_LINEAR, DiTFileInfo, _inspect_dit, describe, storage_dtype, weight_dtype_for
from .safetensors_file import CheckpointError

log = logging.getLogger(__name__)

HOW_TO_MAKE = "make one from the official .safetensors with `python -m step1x quantize IN.safetensors OUT.gguf`"


def inspect_gguf_dit(path: str | os.PathLike) -> DiTFileInfo:
    """Check that ``path`` is a GGUF of the Step1X-Edit DiT; its architecture, version and storage
    (``stored_dtype`` is torch.uint8 when the block weights are quantised)."""
    return _inspect(read_gguf(path))


def _inspect(file: GGUFFile) -> DiTFileInfo:
    header = file.header()
    if file.architecture is not None and file.architecture not in DIT_ARCHITECTURES:
        raise CheckpointError(
            f"{file.path.name} is a GGUF of a '{file.architecture}' model ({describe(header)}), not of the Step1X-Edit "
            f"DiT. Pick the Step1X-Edit DiT GGUF, or {HOW_TO_MAKE}."
        )
    try:
        return _inspect_dit(header)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} This file is a GGUF: {HOW_TO_MAKE}.") from None


def _operations(operations, quantized: bool):
    if not quantized or holds_quantized(operations):
        return operations
    if operations is CastOps:
        return QuantizedOps
    raise CheckpointError(f"the layers {getattr(operations, '__name__', operations)} cannot hold quantised GGUF "
                          "weights; pass operations whose Linear dequantises (step1x.models.quantized.QuantizedOps)")


def load_gguf_dit(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.bfloat16,
    weight_dtype: str = "default",
    attention: str = "auto",
    operations=CastOps,
) -> Step1XEdit:
    """Load a Step1X-Edit DiT from a GGUF file onto ``device`` (see the module docstring for what stays
    quantised). Same arguments as :func:`step1x.checkpoints.loading.load_dit`."""
    select_backend(attention)
    file = read_gguf(path)
    info = _inspect(file)
    weight = weight_dtype_for(weight_dtype)
    keep = weight is None
    quantized = keep and any(t.quantized and _BLOCK_LINEAR.match(k[len(info.prefix):]) for k, t in file.tensors.items())
    ops = _operations(operations, quantized)
    device = torch.device(device)
    with torch.device("meta"):
        model = Step1XEdit(info.params, operations=ops)
    _assign(model, file, info.prefix, compute_dtype, weight, device)
    model.set_attention_backend(attention)
    counts = ", ".join(f"{n} {name}" for name, n in sorted(file.type_counts().items(), key=lambda kv: -kv[1]))
    log.info("loaded %s: Step1X-Edit %s, GGUF tensors %s; %.2f GiB kept quantised", file.path.name, info.version,
             counts, quantized_bytes(model) / 2**30)
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, file: GGUFFile, prefix: str, compute: torch.dtype, weight: torch.dtype | None,
            device: torch.device) -> None:
    expected = declared_tensors(model)
    present = {k[len(prefix):]: t for k, t in file.tensors.items() if k.startswith(prefix)}
    check_file(file.path.name, expected, {k: tuple(t.shape) for k, t in present.items()})
    modules = dict(model.named_modules())
    for key in sorted(expected):
        tensor = present[key]
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if tensor.quantized and weight is None and _BLOCK_LINEAR.match(key):
            set_quantized(module, tensor.raw().to(device), tensor.qtype, tensor.shape)
            continue
        dtype = storage_dtype(key, compute, compute, weight)
        setattr(module, name, nn.Parameter(tensor.dense(dtype).to(device), requires_grad=False))

"""A Linear layer whose weight may be GGUF-quantised: kept as its raw blocks, dequantised at call time.

The quantised weight is an ordinary uint8 parameter holding the file's bytes (rows, bytes per row), so
whatever counts or moves parameters (``.to(device)``, ComfyUI's model management and --lowvram streaming)
sees and moves the true quantised size. The layer keeps the GGML type (``qtype``) and the logical shape
(``weight_shape``); ``in_features``/``out_features`` stay the logical ones. Each call copies the bytes to the
input's device and dequantises them there, in torch, to the dtype the matmul runs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dequant import QuantType, dequantize, quant_type
from .ops import FP8_DTYPES, CastLinear, CastOps, cast_to, compute_dtype


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a dequantised weight is made in for input ``x`` (the autocast dtype under autocast)."""
    dtype = compute_dtype(x)
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


class QuantizedLinear(CastLinear):
    """:class:`~step1x.models.ops.CastLinear` that also holds a quantised weight (see :func:`set_quantized`)."""

    holds_quantized = True
    qtype: QuantType | None = None
    weight_shape: torch.Size | None = None

    def dequantized_weight(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        raw = self.weight.to(device, non_blocking=True)
        return dequantize(raw, self.qtype, self.weight_shape, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.qtype is None:
            return super().forward(x)
        dtype = matmul_dtype(x)
        return F.linear(x, self.dequantized_weight(x.device, dtype), cast_to(self.bias, dtype, x.device))


class QuantizedOps(CastOps):
    """:class:`~step1x.models.ops.CastOps` whose Linear may hold GGUF-quantised weights."""

    Linear = QuantizedLinear


def holds_quantized(operations) -> bool:
    return bool(getattr(operations.Linear, "holds_quantized", False))


def set_quantized(linear: nn.Module, raw: Tensor, qtype, shape) -> None:
    """Make ``linear`` hold the quantised weight ``raw`` (uint8 bytes) of GGML ``qtype`` and logical ``shape``."""
    kind = quant_type(qtype)
    shape = torch.Size(shape)
    if shape != (linear.out_features, linear.in_features):
        raise ValueError(f"a quantised weight of shape {tuple(shape)} does not fit a Linear of "
                         f"{linear.in_features} -> {linear.out_features}")
    if raw.dtype != torch.uint8 or raw.numel() != kind.n_bytes(shape.numel()):
        raise ValueError(f"{kind.name} bytes of a {tuple(shape)} weight must be {kind.n_bytes(shape.numel())} uint8")
    linear.weight = nn.Parameter(raw, requires_grad=False)
    linear.qtype = kind
    linear.weight_shape = shape


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "qtype", None) is not None


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantised weights of ``model``."""
    return sum(m.weight.numel() for m in model.modules() if is_quantized(m))


def dequant_workspace_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Device memory one call of the largest quantised layer needs beyond its bytes: the float32 weight the
    dequantisation builds and its cast to ``dtype`` (0 when nothing is quantised)."""
    largest = max((m.weight_shape.numel() for m in model.modules() if is_quantized(m)), default=0)
    return largest * (4 + dtype.itemsize)

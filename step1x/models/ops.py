"""Layer classes the models are built from.

Every model class takes an ``operations`` namespace with ``Linear``, ``LayerNorm``, ``Conv2d`` and
``GroupNorm`` (the shape of ``comfy.ops``), so the storage and casting policy of weights is decided
outside the model code. :class:`CastOps` is the default: weights may be stored in any dtype (fp8
included) and are cast per layer, at call time, to the dtype the computation runs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else ``x``'s."""
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4 has no per-device query
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return x.dtype


def cast_to(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if t is None or (t.dtype == dtype and t.device == device):
        return t
    return t.to(device=device, dtype=dtype, non_blocking=True)


class CastLinear(nn.Linear):
    """``nn.Linear`` whose weight may be stored in another dtype (e.g. fp8) or on another device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if dtype in FP8_DTYPES:
            dtype = torch.bfloat16
        return F.linear(x, cast_to(self.weight, dtype, x.device), cast_to(self.bias, dtype, x.device))


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return self._conv_forward(x, cast_to(self.weight, dtype, x.device), cast_to(self.bias, dtype, x.device))


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x, self.num_groups, cast_to(self.weight, x.dtype, x.device), cast_to(self.bias, x.dtype, x.device), self.eps
        )


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x,
            self.normalized_shape,
            cast_to(self.weight, x.dtype, x.device),
            cast_to(self.bias, x.dtype, x.device),
            self.eps,
        )


class CastOps:
    """Default operations: weights stored in any dtype, cast per layer at compute time."""

    Linear = CastLinear
    Conv2d = CastConv2d
    GroupNorm = CastGroupNorm
    LayerNorm = CastLayerNorm

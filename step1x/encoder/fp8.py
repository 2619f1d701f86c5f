"""ComfyUI ``fp8_scaled`` weights: float8 tensors with a per-layer ``scale_weight``.

A real weight is ``fp8.float() * scale_weight``. By default every fp8 tensor is dequantised once at
load time to the compute dtype. With ``keep_fp8`` the Linear weights stay float8 in memory (about half
the size of bf16) and each layer is dequantised on the fly in its forward. ``quantize`` makes the same
representation from a full-precision weight (for the bf16 text encoder of a diffusers-layout folder).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: the per-tensor scale maps the weight's largest magnitude onto it."""


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scalar scale) with ``scale = max|w| / 448``, as ComfyUI's fp8_scaled files."""
    if FP8_DTYPE is None:
        raise RuntimeError("this torch has no float8_e4m3fn; update torch (>= 2.1) to keep weights in fp8")
    scale = weight.abs().max().to(torch.float32) / FP8_MAX
    if scale == 0:
        scale = torch.ones((), dtype=torch.float32)
    return (weight.to(torch.float32) / scale).to(FP8_DTYPE), scale.reshape(())


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` computed in float32, returned in ``dtype``."""
    out = weight.to(torch.float32)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=torch.float32)
    return out.to(dtype)


class Fp8Linear(nn.Module):
    """A Linear layer that stores a float8 weight and its scale, and computes in the input's dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        scale = torch.ones((), dtype=torch.float32, device=weight.device) if scale is None else scale
        self.register_buffer("scale_weight", scale.to(device=weight.device, dtype=torch.float32).reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight, self.scale_weight, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.weight.dtype}"


def swap_linear(model: nn.Module, name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Replace the nn.Linear owning parameter ``name`` (``<module>.weight``) by an Fp8Linear."""
    path = name.rsplit(".", 1)[0]
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{path} is a {type(old).__name__}, not a Linear layer")
    setattr(parent, child, Fp8Linear(weight, scale, None if old.bias is None else old.bias.data))

"""Positional and timestep embeddings: sinusoidal timesteps, N-axis RoPE tables and their application."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000, time_factor: float = 1.0) -> Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of ``time_factor * t``, shape (N, dim), float32.

    ``time_factor * t`` is computed in ``t``'s dtype, as the official code does; the frequencies and the
    products are float32."""
    if time_factor != 1.0:
        t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one axis: (..., n, dim/2, 2, 2), computed in float64, returned float32."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """RoPE table for position ids (B, L, n_axes): (B, 1, L, head_dim/2, 2, 2) float32.

    float64 is not available on every accelerator (MPS), so the table is built on the CPU and moved;
    it is built once per sampling run, not per step."""
    device = ids.device
    ids = ids.detach().to("cpu")
    table = torch.cat([rope(ids[..., i], axes_dim[i], theta) for i in range(ids.shape[-1])], dim=-3)
    return table.unsqueeze(1).to(device)


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs of q and k (B, L, H, D) in float32 (the official order of products);
    returns (B, L, H, D) tensors in the input dtype."""
    return rotate(xq, pe), rotate(xk, pe)


def rotate(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate one (B, L, H, D) tensor by a RoPE table of the same length (queries and keys of different
    lengths, as in region attention, take different tables)."""
    x_t = x.transpose(1, 2)
    pairs = x_t.float().reshape(*x_t.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(*x_t.shape).type_as(x).transpose(1, 2)

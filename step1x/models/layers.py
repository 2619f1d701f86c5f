"""FLUX-style DiT blocks under the official Step1X-Edit state-dict names.

The operation order follows the official modules exactly (including which products happen in which
dtype under autocast), so that the same weights give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .embeddings import apply_rope
from .ops import CastOps


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``"B L (K H D) -> K B L H D"`` as three views, no copy."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)
    return q, k, v


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.silu = nn.SiLU()
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm with weight ``scale`` (no ``1 +`` offset). Computed in float32 and multiplied by the
    weight before the cast back, as the official fused kernel does."""

    def __init__(self, dim: int, *, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.scale.to(device=x.device, dtype=x.dtype).float()
        xf = x.float()
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (xf * rrms * weight).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, *, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype=dtype, device=device)
        self.key_norm = RMSNorm(dim, dtype=dtype, device=device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds ``qkv``, ``norm`` and ``proj`` of one stream; the double block drives them."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(dim // num_heads, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


def _mlp(hidden: int, mlp_hidden: int, dtype, device, operations) -> nn.Sequential:
    return nn.Sequential(
        operations.Linear(hidden, mlp_hidden, bias=True, dtype=dtype, device=device),
        nn.GELU(approximate="tanh"),
        operations.Linear(mlp_hidden, hidden, bias=True, dtype=dtype, device=device),
    )


def _rope_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, backend: str) -> Tensor:
    q, k = apply_rope(q, k, pe)
    return attention(q, k, v, backend=backend)


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, joint attention over [txt, img]."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, *, dtype=None, device=None,
        operations=CastOps,
    ):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        kw = dict(dtype=dtype, device=device)
        self.num_heads = num_heads
        self.attention_backend = "sdpa"
        self.img_mod = Modulation(hidden_size, double=True, operations=operations, **kw)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, operations=operations, **kw)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden, dtype, device, operations)
        self.txt_mod = Modulation(hidden_size, double=True, operations=operations, **kw)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, operations=operations, **kw)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden, dtype, device, operations)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift)

        q = torch.cat((txt_q, img_q), dim=1)
        k = torch.cat((txt_k, img_k), dim=1)
        v = torch.cat((txt_v, img_v), dim=1)
        del img_q, img_k, img_v, txt_q, txt_k, txt_v
        attn = _rope_attention(q, k, v, pe, self.attention_backend)
        del q, k, v
        txt_len = txt.shape[1]
        txt_attn, img_attn = attn[:, :txt_len], attn[:, txt_len:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift) * img_mod2.gate + img

        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift) * txt_mod2.gate + txt
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt, img], with attention and MLP computed in parallel from ``linear1``."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, *, dtype=None, device=None, operations=CastOps
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.attention_backend = "sdpa"
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim, **kw)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, **kw)
        self.norm = QKNorm(hidden_size // num_heads, **kw)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False, operations=operations, **kw)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        del x_mod
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = _rope_attention(q, k, v, pe, self.attention_backend)
        del q, k, v, qkv
        return self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2)) * mod.gate + x


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden_size, out_channels, bias=True, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              operations.Linear(hidden_size, 2 * hidden_size, bias=True, **kw))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)

"""The FLUX VAE (``encoder.*`` / ``decoder.*``), as shipped in Step1X-Edit's ``vae.safetensors`` and
FLUX's ``ae.safetensors``.

Latents come in two conventions:
* raw: what the encoder's Gaussian produces; ComfyUI's LATENT holds these.
* model space: ``scale * (raw - shift)``, what the DiT denoises. ``encode``/``decode`` use this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import AutoEncoderParams
from .ops import CastOps


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class AttnBlock(nn.Module):
    def __init__(self, channels: int, *, groups: int = 32, dtype=None, device=None, operations=CastOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm = operations.GroupNorm(groups, channels, eps=1e-6, affine=True, **kw)
        self.q = operations.Conv2d(channels, channels, kernel_size=1, **kw)
        self.k = operations.Conv2d(channels, channels, kernel_size=1, **kw)
        self.v = operations.Conv2d(channels, channels, kernel_size=1, **kw)
        self.proj_out = operations.Conv2d(channels, channels, kernel_size=1, **kw)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, height, width = q.shape
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3).contiguous() for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, groups: int = 32, dtype=None, device=None,
                 operations=CastOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = operations.GroupNorm(groups, in_channels, eps=1e-6, affine=True, **kw)
        self.conv1 = operations.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, **kw)
        self.norm2 = operations.GroupNorm(groups, out_channels, eps=1e-6, affine=True, **kw)
        self.conv2 = operations.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, **kw)
        if in_channels != out_channels:
            self.nin_shortcut = operations.Conv2d(in_channels, out_channels, kernel_size=1, **kw)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0, dtype=dtype,
                                      device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, dtype=dtype,
                                      device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, kw: dict) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, **kw)
    mid.attn_1 = AttnBlock(channels, **kw)
    mid.block_2 = ResnetBlock(channels, channels, **kw)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        kw = dict(groups=p.norm_groups, dtype=dtype, device=device, operations=operations)
        self.num_resolutions = len(p.ch_mult)
        self.num_res_blocks = p.num_res_blocks
        self.conv_in = operations.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1, dtype=dtype,
                                         device=device)
        in_ch_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level in range(self.num_resolutions):
            block_in = p.ch * in_ch_mult[level]
            block_out = p.ch * p.ch_mult[level]
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, **kw))
                block_in = block_out
            down.attn = nn.ModuleList()
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, dtype=dtype, device=device, operations=operations)
            self.down.append(down)
        self.mid = _mid(block_in, kw)
        self.norm_out = operations.GroupNorm(p.norm_groups, block_in, eps=1e-6, affine=True, dtype=dtype, device=device)
        self.conv_out = operations.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1,
                                          dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        kw = dict(groups=p.norm_groups, dtype=dtype, device=device, operations=operations)
        self.num_resolutions = len(p.ch_mult)
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = operations.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1, dtype=dtype,
                                         device=device)
        self.mid = _mid(block_in, kw)
        ups = []
        for level in reversed(range(self.num_resolutions)):
            block_out = p.ch * p.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, **kw))
                block_in = block_out
            up.attn = nn.ModuleList()
            if level != 0:
                up.upsample = Upsample(block_in, dtype=dtype, device=device, operations=operations)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = operations.GroupNorm(p.norm_groups, block_in, eps=1e-6, affine=True, dtype=dtype, device=device)
        self.conv_out = operations.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1, dtype=dtype,
                                          device=device)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            for block in self.up[level].block:
                h = block(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params, dtype=dtype, device=device, operations=operations)
        self.decoder = Decoder(params, dtype=dtype, device=device, operations=operations)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of the latent Gaussian for images ``x`` in [-1, 1] (B, 3, H, W)."""
        mean, logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return mean, logvar

    def encode_raw(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """Raw latent (ComfyUI's LATENT convention). ``sample=False`` takes the mean (deterministic);
        ``sample=True`` draws ``mean + exp(logvar/2) * eps`` like the official encode, with ``eps`` from
        ``noise``, else from ``generator`` (a CPU generator keeps results the same on every device)."""
        mean, logvar = self.moments(x)
        if not sample:
            return mean
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        return mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               noise: Tensor | None = None) -> Tensor:
        """Images in [-1, 1] -> model-space latent ``scale * (z - shift)``."""
        return self.to_model_space(self.encode_raw(x, sample=sample, generator=generator, noise=noise))

    def decode(self, z: Tensor) -> Tensor:
        """Model-space latent -> images in about [-1, 1]."""
        return self.decoder(self.from_model_space(z))

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def to_model_space(self, raw: Tensor) -> Tensor:
        return self.scale_factor * (raw - self.shift_factor)

    def from_model_space(self, z: Tensor) -> Tensor:
        return z / self.scale_factor + self.shift_factor

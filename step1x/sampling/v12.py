"""A plain Step1X-Edit v1.2 edit from encoded instructions, as the v1.2 reference pipeline runs it.

The instruction encoder gives one :class:`~step1x.sampling.denoise.TextConditioning` per prompt (trimmed to
its valid tokens, with ``txt_ids``, ``text_embeds`` and ``text_mask``); everything after that is here:

1. Size: the same ``size_level`` area rule as v1.1 (:func:`~step1x.geometry.size_level_dims`; default
   ``size_level`` 1024). The MLLM sees a LANCZOS resize (the encoder's job); the VAE gets its own resize of
   the *original* image: bilinear with antialiasing, in [0, 1], then ``* 2 - 1`` (:func:`vae_input`).
2. Randomness: one CPU generator seeded with ``seed``, drawn first for the VAE posterior sample of the
   reference (``mean + exp(logvar / 2) * eps``, logvar clamped to [-30, 20]), then for the initial noise.
3. Sampling: :func:`~step1x.sampling.denoise.denoise` under the v1.2 rules (:data:`.rules.V12`): cond and
   uncond as separate calls, renorm at every step with threshold 0.93 unless ``official_renorm``; with
   ``regione``, RegionE under the same rules.
4. Output: ``z / scale + shift`` decoded, ``(x / 2 + 0.5).clamp(0, 1) * 255`` **rounded** to uint8, then a
   PIL BICUBIC resize back to the input size.

Text-to-image (no image) has no reference tokens; the noise is then the generator's first draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..geometry import size_level_dims
from .denoise import LATENT_CHANNELS, Conditioning, StepInfo, denoise
from .regione_rules import RegionEConfig
from .rules import V12

LOGVAR_RANGE = (-30.0, 20.0)
"""The clamp diffusers' ``DiagonalGaussianDistribution`` puts on the VAE log-variance."""


@dataclass(frozen=True)
class V12Options:
    """The v1.2 reference pipeline's call defaults (``Step1XEditPipelineV1P2.__call__``)."""

    steps: int = 28
    cfg_scale: float = 6.0
    renorm_threshold: float = 0.93
    renorm_power: float = 0.4
    size_level: int = 1024
    seed: int = 0
    official_renorm: bool = False
    """Renorm only while ``t`` in [0, 1] exceeds the threshold, as v1.1 does; the reference compares its
    0-1000 timestep, which renorms at every step with the default 0.93."""
    regione: RegionEConfig | None = None
    """RegionE settings (None: off): after the warm-up only the edited region is computed (edits only)."""

    @property
    def rules(self):
        return V12.with_official_renorm() if self.official_renorm else V12


def working_size(image: Image.Image | None, size_level: int = 1024, size: tuple[int, int] | None = None
                 ) -> tuple[int, int]:
    """(width, height) the edit runs at: the ``size_level`` area rule for an image; for text-to-image
    ``size`` (default ``size_level`` square), floored to multiples of 16."""
    if image is not None:
        return size_level_dims(image.width, image.height, size_level)
    width, height = size or (size_level, size_level)
    return width // 16 * 16, height // 16 * 16


def vae_input(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """The VAE's input for ``image`` at ``size`` (width, height): the original RGB image in [0, 1] resized
    with bilinear antialiasing (``F.interpolate``), then mapped to [-1, 1]; (1, 3, H, W) float32."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).float().permute(2, 0, 1)[None] / 255.0
    return vae_input_pixels(pixels, size)


def vae_input_pixels(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`vae_input` of images already in [0, 1] as (B, 3, H, W) float32 (a ComfyUI IMAGE moved to
    channels first); (B, 3, h, w) in [-1, 1]."""
    pixels = F.interpolate(pixels.float(), (size[1], size[0]), mode="bilinear", antialias=True)
    return pixels * 2 - 1


def encode_reference(vae, pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Model-space reference latent from VAE input ``pixels``: a posterior sample whose noise is the
    generator's next draw (in the VAE's dtype), then ``(z - shift) * scale``."""
    param = next(vae.parameters())
    mean, logvar = vae.moments(pixels.to(device=param.device, dtype=param.dtype))
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
    z = mean + std * eps.to(mean.device)
    return (z - vae.shift_factor) * vae.scale_factor


def initial_noise(size: tuple[int, int], generator: torch.Generator, dtype: torch.dtype, batch: int = 1) -> Tensor:
    """The starting noise (B, 16, H/8, W/8) for an image of ``size`` (width, height): the generator's next
    draw, in the latent dtype."""
    width, height = size
    shape = (batch, LATENT_CHANNELS, 2 * (height // 16), 2 * (width // 16))
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)


def decode(vae, latent: Tensor) -> Tensor:
    """Model-space latent -> the decoder's output (B, 3, H, W) in about [-1, 1], float32."""
    param = next(vae.parameters())
    z = latent.to(device=param.device, dtype=param.dtype) / vae.scale_factor + vae.shift_factor
    return vae.decode_raw(z).float()


def to_uint8(decoded: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8: ``(x / 2 + 0.5).clamp(0, 1) * 255``, rounded."""
    return (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).cpu()


def restore_size(pixels: Tensor, size: tuple[int, int]) -> Image.Image:
    """One (H, W, 3) uint8 image as PIL, resized to ``size`` (width, height) with PIL's default BICUBIC."""
    image = Image.fromarray(pixels.numpy())
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.BICUBIC)


def edit(dit, vae, image: Image.Image | None, cond: Conditioning, uncond: Conditioning | None,
         options: V12Options | None = None, *, size: tuple[int, int] | None = None,
         device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
         callback: Callable[[StepInfo], None] | None = None) -> Image.Image:
    """Edit ``image`` (or generate one, with ``image=None`` at ``size``) from encoded ``cond``/``uncond``
    (the instruction and the negative prompt, encoded with the image resized to :func:`working_size`).
    Returns the result at the input size. ``dtype`` is the latent and DiT compute dtype (bf16 in the
    reference pipeline); ``device`` defaults to the DiT's."""
    options = options or V12Options()
    device = device or next(dit.parameters()).device
    work = working_size(image, options.size_level, size)
    generator = torch.Generator(device="cpu").manual_seed(int(options.seed))
    reference = None
    if image is not None:
        with torch.no_grad():
            reference = encode_reference(vae, vae_input(image, work), generator).to(dtype)
    noise = initial_noise(work, generator, dtype)
    with torch.no_grad():
        latent = denoise(dit, noise, cond, uncond, reference=reference, steps=options.steps,
                         cfg_scale=options.cfg_scale, renorm_threshold=options.renorm_threshold,
                         renorm_power=options.renorm_power, compute_dtype=dtype, device=device,
                         rules=options.rules, callback=callback, regione=options.regione)
        pixels = to_uint8(decode(vae, latent.to(dtype)))
    original = image.size if image is not None else (size or (options.size_level, options.size_level))
    return restore_size(pixels[0], original)

"""The FLUX VAE as a ComfyUI ``VAE`` object, and the checks every node applies to a VAE it is given.

:class:`Step1XVAE` speaks the interface of ComfyUI's own ``comfy.sd.VAE`` that nodes use (``encode``:
IMAGE -> raw latent, ``decode``: raw latent -> IMAGE), so it plugs into ComfyUI's VAE Decode / VAE Encode,
and our nodes take ComfyUI's VAE from its built-in loader just as well.
"""

from __future__ import annotations

import torch

from ..step1x.graph_io import DOWNSCALE, check_finite, check_image
from ..step1x.sampling.denoise import LATENT_CHANNELS
from . import _comfy as bridge

ENCODE_BYTES_PER_PIXEL = 1767
DECODE_BYTES_PER_LATENT_PIXEL = 2178 * 64
"""Activation memory per (latent) pixel and byte of dtype, the estimates ComfyUI uses for this VAE family."""


class Step1XVAE:
    latent_channels = LATENT_CHANNELS
    downscale_ratio = DOWNSCALE
    upscale_ratio = DOWNSCALE
    latent_dim = 2
    output_channels = 3

    def __init__(self, autoencoder: torch.nn.Module, patcher, name: str):
        self.autoencoder, self.patcher, self.name = autoencoder, patcher, name

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def spacial_compression_encode(self) -> int:
        return DOWNSCALE

    def spacial_compression_decode(self) -> int:
        return DOWNSCALE

    def temporal_compression_decode(self):
        return None

    def get_sd(self):
        return self.autoencoder.state_dict()

    def _load(self, memory_per_byte: int) -> torch.device:
        bridge.load([self.patcher], memory_required=memory_per_byte * self.dtype.itemsize)
        return self.patcher.load_device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, C] in [0, 1] -> raw latent (B, 16, H/8, W/8) (the Gaussian's mean). Sides that
        are not multiples of 8 are centre-cropped, as ComfyUI's VAE does."""
        pixels = _crop(check_image(pixels))
        device = self._load(ENCODE_BYTES_PER_PIXEL * pixels.shape[0] * pixels.shape[1] * pixels.shape[2])
        x = pixels.movedim(-1, 1).to(device=device, dtype=self.dtype) * 2 - 1
        return self.autoencoder.encode_raw(x).float().to(bridge.intermediate_device())

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Raw latent -> IMAGE [B, H, W, 3] in [0, 1]."""
        check_finite(samples, "the latent to decode")
        device = self._load(DECODE_BYTES_PER_LATENT_PIXEL * samples.shape[0] * samples.shape[-2] * samples.shape[-1])
        x = self.autoencoder.decode_raw(samples.to(device=device, dtype=self.dtype))
        return x.float().clamp(-1, 1).add(1).mul(0.5).movedim(1, -1).to(bridge.intermediate_device())

    @torch.no_grad()
    def sample_latent(self, pixels: torch.Tensor, generator: torch.Generator, sample: bool = True) -> torch.Tensor:
        """v1.2's reference latent (model space) of VAE input ``pixels`` (B, 3, H, W) in [-1, 1]: a posterior
        sample per image whose noise is the generator's next draw (see ``pipeline_v12.reference_latent``)."""
        from ..step1x.pipeline_v12 import reference_latent

        self._load(ENCODE_BYTES_PER_PIXEL * pixels.shape[0] * pixels.shape[-2] * pixels.shape[-1])
        return reference_latent(self.autoencoder, pixels, generator, sample).float()

    @torch.no_grad()
    def decode_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        """v1.2's decode of a model-space latent: the decoder's output (B, 3, H, W) in about [-1, 1], float32."""
        from ..step1x.sampling.v12 import decode

        self._load(DECODE_BYTES_PER_LATENT_PIXEL * latent.shape[0] * latent.shape[-2] * latent.shape[-1])
        return decode(self.autoencoder, latent).to(bridge.intermediate_device())

    def encode_tiled(self, pixels, *args, **kwargs):
        return self.encode(pixels)

    def decode_tiled(self, samples, *args, **kwargs):
        return self.decode(samples)


def _crop(pixels: torch.Tensor) -> torch.Tensor:
    h = pixels.shape[1] // DOWNSCALE * DOWNSCALE
    w = pixels.shape[2] // DOWNSCALE * DOWNSCALE
    if h == 0 or w == 0:
        raise ValueError(f"the image is {pixels.shape[2]}x{pixels.shape[1]}; the VAE needs at least 8x8 pixels")
    top, left = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
    return pixels[:, top:top + h, left:left + w, :]


def check_vae(vae) -> None:
    """Any VAE object with ComfyUI's interface that makes 16-channel, 8x latents (the FLUX VAE)."""
    if vae is None:
        raise ValueError(
            "a VAE is needed here: connect the Step1X-Edit VAE loader or ComfyUI's Load VAE (ae.safetensors)"
        )
    if not callable(getattr(vae, "encode", None)) or not callable(getattr(vae, "decode", None)):
        raise ValueError(f"the VAE input got a {type(vae).__name__}, which has no encode/decode")
    channels = getattr(vae, "latent_channels", None)
    if channels != LATENT_CHANNELS:
        raise ValueError(
            f"this VAE makes {channels}-channel latents (an SD1.x/SDXL-style VAE?); Step1X-Edit needs the 16-channel "
            "FLUX VAE: load ae.safetensors (FLUX) or vae.safetensors (Step1X-Edit)"
        )
    ratio = getattr(vae, "downscale_ratio", DOWNSCALE)
    if ratio != DOWNSCALE:
        raise ValueError(f"this VAE downscales by {ratio}; Step1X-Edit needs the FLUX VAE, which downscales by 8")

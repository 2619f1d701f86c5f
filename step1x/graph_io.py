"""Checking and converting the tensors a node graph passes around, in ComfyUI's conventions:

* IMAGE: float [B, H, W, C] in [0, 1];
* MASK: float [B, H, W] (or [H, W]), 1 where the image may change;
* LATENT samples: the raw FLUX VAE latent (B, 16, H/8, W/8), what ``ae.safetensors`` encodes and decodes.

NaN or infinite values are refused in all three, with the input named: they would flow through the VAE and the
DiT and come out as a normal-looking but meaningless image. IMAGE and MASK values outside [0, 1] are clamped to
it (ComfyUI's own nodes can overshoot slightly, e.g. after a bicubic upscale); a LATENT has no fixed range.

The DiT works in model space, ``scale * (raw - shift)``; the conversion uses the FLUX VAE constants,
which the DiT was trained with whatever VAE object produced the latent. No ComfyUI import here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .geometry import PATCH, resample_filter
from .image_io import comfy_to_pil, pil_to_comfy
from .models.configs import FLUX_VAE
from .sampling.denoise import LATENT_CHANNELS

DOWNSCALE = 8


def latent_to_model_space(raw: Tensor) -> Tensor:
    return FLUX_VAE.scale_factor * (raw.float() - FLUX_VAE.shift_factor)


def latent_from_model_space(z: Tensor) -> Tensor:
    return z.float() / FLUX_VAE.scale_factor + FLUX_VAE.shift_factor


# ---------------------------------------------------------------------------------------------- checks


def check_finite(tensor: Tensor, what: str) -> Tensor:
    """``tensor`` unchanged, unless it holds NaN or infinite values."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise ValueError(
            f"{what} holds {bad} NaN or infinite value(s) out of {tensor.numel()}; they would come out as a "
            "meaningless image. Check the node or file that produced it (for example a float image with missing "
            "pixels, or a decode that failed)."
        )
    return tensor


def check_image(image: Tensor, what: str = "image") -> Tensor:
    """A non-empty, finite IMAGE [B, H, W, C]; returns its RGB channels clamped to [0, 1]."""
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{what} must be an IMAGE [batch, height, width, channels], got {shape}")
    if image.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(image.shape)}); connect a loaded image")
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} has {image.shape[-1]} channels; expected an RGB (3) image")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return check_finite(image[..., :3], what).clamp(0, 1)


def check_mask(mask: Tensor, what: str = "mask") -> Tensor:
    """A non-empty, finite MASK as [B, H, W], clamped to [0, 1]."""
    if isinstance(mask, Tensor) and mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if not isinstance(mask, Tensor) or mask.ndim != 3 or mask.numel() == 0:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{what} must be a MASK [batch, height, width], got shape {shape}")
    return check_finite(mask.float(), what).clamp(0, 1)


def check_latent(latent, what: str = "latent") -> Tensor:
    """The samples of a LATENT (dict with "samples" or a tensor): 16 channels, even height and width, finite."""
    samples = latent.get("samples") if isinstance(latent, dict) else latent
    if not isinstance(samples, Tensor) or samples.ndim != 4:
        raise ValueError(f"{what} must be a LATENT of shape (batch, 16, height/8, width/8)")
    if samples.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(samples.shape)})")
    b, c, h, w = samples.shape
    if c != LATENT_CHANNELS:
        raise ValueError(
            f"{what} has {c} channels; Step1X-Edit needs the 16-channel FLUX latent (encode with ae.safetensors / "
            "vae.safetensors, or use an 'EmptySD3LatentImage' for text-to-image)"
        )
    if h % 2 or w % 2:
        raise ValueError(
            f"{what} is {h}x{w} latent pixels ({h * DOWNSCALE}x{w * DOWNSCALE} px); both sides must be multiples of "
            f"{PATCH} pixels. Resize the image with the Step1X-Edit resize node before encoding it."
        )
    return check_finite(samples, what)


def check_sampling(steps: int, cfg: float, renorm_threshold: float) -> None:
    """Steps, guidance scale and renorm threshold, checked alike for the sampler node and for
    :class:`step1x.pipeline.EditOptions` (the command line and scripts)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}; 28 is the official setting")
    if not math.isfinite(cfg):
        raise ValueError(f"cfg is {cfg}; set a finite number (6.0 is the official setting)")
    if not (0.0 <= renorm_threshold <= 1.0):
        raise ValueError(f"renorm_threshold must be within [0, 1], got {renorm_threshold} (0.93 official, 1.0 = off)")


def check_settings(steps: int, cfg: float, renorm_threshold: float, denoise: float) -> None:
    """The sampler node's settings: :func:`check_sampling` and ``denoise`` in [0, 1] (0 returns the start point
    unchanged, as the library's ``strength=0`` and ComfyUI's KSampler do)."""
    check_sampling(steps, cfg, renorm_threshold)
    if not (0.0 <= denoise <= 1.0):
        raise ValueError(f"denoise must be within [0, 1], got {denoise}; 1.0 edits from pure noise")


def batch_of(tensor: Tensor, batch: int, what: str, of: str) -> Tensor:
    """``tensor`` with 1 or ``batch`` rows expanded to ``batch`` rows."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{what} has a batch of {tensor.shape[0]} but {of} has {batch}; give 1 or {batch}")


def mask_to_latent(mask: Tensor, image_size: tuple[int, int], latent_size: tuple[int, int], batch: int,
                   image_what: str = "the reference image") -> Tensor:
    """A MASK at ``image_size`` (H, W) -> (batch, 1, h, w) on the latent grid, by area averaging."""
    mask = check_mask(mask)
    if tuple(mask.shape[-2:]) != tuple(image_size):
        raise ValueError(
            f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but {image_what} is {image_size[1]}x{image_size[0]}; "
            "use a mask painted on that image (e.g. the MASK output of Load Image) or resize both together"
        )
    mask = batch_of(mask, batch, "the mask", image_what)
    return F.interpolate(mask.unsqueeze(1), size=latent_size, mode="area")


def repeat_rows(tensor: Tensor, times: int) -> Tensor:
    """Each row ``times`` times in a row: (a, b) -> (a, a, b, b)."""
    return tensor if times == 1 else tensor.repeat_interleave(times, dim=0)


# ------------------------------------------------------------------------------------------------ images


def resize_images(image: Tensor, size: tuple[int, int], resample: str = "lanczos") -> Tensor:
    """Resize an IMAGE batch to ``size`` = (width, height) with PIL, as the official code resizes."""
    image = check_image(image)
    if (image.shape[2], image.shape[1]) == tuple(size):
        return image
    pils = [p.resize(tuple(size), resample_filter(resample)) for p in comfy_to_pil(image)]
    return pil_to_comfy(pils).to(image.device)


def resize_masks(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a MASK batch to ``size`` = (width, height), bilinear."""
    mask = check_mask(mask)
    out = F.interpolate(mask.unsqueeze(1), size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return out.squeeze(1).clamp(0, 1)


def to_pil_list(image: Tensor) -> list[Image.Image]:
    return comfy_to_pil(check_image(image))

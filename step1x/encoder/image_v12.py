"""The v1.2 image chain in front of the Qwen2.5-VL vision tower, with torch alone (no torchvision).

v1.2 hands the size-level (LANCZOS) resized PIL image straight to the image processor, re-created with
256·28² to 400·28² pixels; there is no ``qwen_vl_utils`` step. With the transformers releases the v1.2
pipeline needs (>= 4.52), that processor is the torchvision one ("fast"): sides rounded to multiples of 28
as usual, then a uint8 antialiased bicubic resize (``interpolate`` on the uint8 tensor, which is what
torchvision runs on the CPU), then one fused normalisation ``(x - 255·mean) / (255·std)`` in float32,
then 14-pixel patches in 2x2 merge order. This module computes exactly that, bit for bit. The PIL
processor of v1.0/v1.1 (``image_chain``) differs by up to 0.35 on upscaled images, with the same grid.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ..image_io import to_rgb
from .image_chain import ImageInputError, ResizeRule, check_aspect, smart_size

MIN_PIXELS_V12 = 256 * 28 * 28
MAX_PIXELS_V12 = 400 * 28 * 28
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255
VISION_PATCH = 28
"""Pixels per merged vision token side (14-pixel patch x 2x2 merge)."""


def processor_rule_v12(
    patch_size: int = 14, merge_size: int = 2, min_pixels: int = MIN_PIXELS_V12, max_pixels: int = MAX_PIXELS_V12
) -> ResizeRule:
    return ResizeRule(factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels,
                      floor_at_factor=False)


def blank_reference(size_level: int) -> Image.Image:
    """The black ``size_level x size_level`` image v1.2 encodes with the prompt when there is no image
    (text-to-image)."""
    if not isinstance(size_level, int) or size_level < 1:
        raise ValueError(f"size_level must be a positive integer, got {size_level!r}")
    return Image.new("RGB", (size_level, size_level))


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [1, C, H, W] -> float32, with the rescale folded into mean and std as transformers does."""
    mean = torch.tensor(IMAGE_MEAN) * (1.0 / RESCALE)
    std = torch.tensor(IMAGE_STD) * (1.0 / RESCALE)
    return (pixels.to(torch.float32) - mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _patches(x: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """[1, C, H, W] -> [grid_h*grid_w, C*temporal*patch*patch], rows in 2x2-merge order, the single frame
    repeated ``temporal`` times."""
    _, channels, height, width = x.shape
    gh, gw = height // patch, width // patch
    frames = x.unsqueeze(1).expand(1, temporal, channels, height, width)
    grid = frames.reshape(1, 1, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    grid = grid.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return grid.reshape(gh * gw, channels * temporal * patch * patch).contiguous()


def pixel_inputs_v12(
    image: Image.Image,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = MIN_PIXELS_V12,
    max_pixels: int = MAX_PIXELS_V12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [patches, C·T·P·P] float32, image_grid_thw [1, 3] int64) of one image, as the torchvision
    Qwen2-VL image processor makes them; the pixel range defaults to v1.2's encoder (256 to 400 tokens)."""
    if not isinstance(image, Image.Image):
        raise ImageInputError(
            f"the reference image must be a PIL image, got {type(image).__name__}; convert ComfyUI IMAGE tensors "
            "with step1x.image_io.comfy_to_pil."
        )
    image = to_rgb(image)
    check_aspect(image.width, image.height, "as given")
    rule = processor_rule_v12(patch_size, merge_size, min_pixels, max_pixels)
    width, height = smart_size(image.width, image.height, rule)
    check_aspect(width, height, "at the image processor's size")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).contiguous()
    if (height, width) != (image.height, image.width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    values = _patches(_normalised(pixels), patch_size, merge_size, temporal_patch_size)
    grid = torch.tensor([[1, height // patch_size, width // patch_size]], dtype=torch.long)
    return values, grid

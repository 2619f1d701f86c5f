"""The official image chain in front of the Qwen2.5-VL vision tower, without torchvision or qwen_vl_utils.

1. ``qwen_vl_utils.fetch_image``: sides rounded (half to even) to multiples of 28 within
   [4·28², 16384·28²] pixels, PIL BICUBIC resize.
2. The Qwen2-VL image processor with min 256·28² / max 324·28² pixels: the same rounding again
   (without the 28-pixel floor), BICUBIC, /255, CLIP mean/std, 14-pixel patches, 2×2 merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..image_io import to_rgb

MAX_ASPECT = 200.0


@dataclass(frozen=True)
class ResizeRule:
    factor: int
    min_pixels: int
    max_pixels: int
    floor_at_factor: bool
    """qwen_vl_utils keeps each rounded side at least ``factor``; the image processor does not."""


FETCH_RULE = ResizeRule(factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28, floor_at_factor=True)
PROCESSOR_MIN_PIXELS = 256 * 28 * 28
PROCESSOR_MAX_PIXELS = 324 * 28 * 28


class ImageInputError(ValueError):
    """An image the Qwen2.5-VL image chain cannot take."""


def processor_rule(patch_size: int = 14, merge_size: int = 2) -> ResizeRule:
    return ResizeRule(
        factor=patch_size * merge_size,
        min_pixels=PROCESSOR_MIN_PIXELS,
        max_pixels=PROCESSOR_MAX_PIXELS,
        floor_at_factor=False,
    )


def check_aspect(width: int, height: int, stage: str) -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"the reference image is {width}x{height} pixels; it must not be empty.")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise ImageInputError(
            f"the reference image is {width}x{height} pixels {stage} (aspect ratio {ratio:.0f}:1); Qwen2.5-VL "
            f"accepts at most {MAX_ASPECT:.0f}:1. Crop or pad it to a less extreme shape."
        )


def smart_size(width: int, height: int, rule: ResizeRule) -> tuple[int, int]:
    """Return the (width, height) the rule resizes to: multiples of ``rule.factor``, aspect kept, pixel
    count brought into range. Python's ``round`` (half to even) as in the official code."""
    f = rule.factor
    h_bar = round(height / f) * f
    w_bar = round(width / f) * f
    if rule.floor_at_factor:
        h_bar, w_bar = max(f, h_bar), max(f, w_bar)
    if h_bar * w_bar > rule.max_pixels:
        beta = math.sqrt(height * width / rule.max_pixels)
        h_bar = math.floor(height / beta / f) * f
        w_bar = math.floor(width / beta / f) * f
        if rule.floor_at_factor:
            h_bar, w_bar = max(f, h_bar), max(f, w_bar)
    elif h_bar * w_bar < rule.min_pixels:
        beta = math.sqrt(rule.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return w_bar, h_bar


def fetch_image(image: Image.Image) -> Image.Image:
    """RGB conversion and the ``fetch_image`` resize."""
    image = to_rgb(image)
    check_aspect(image.width, image.height, "as given")
    size = smart_size(image.width, image.height, FETCH_RULE)
    check_aspect(*size, "after rounding to multiples of 28")
    return image.resize(size, Image.Resampling.BICUBIC)


def make_image_processor(
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    *,
    min_pixels: int = PROCESSOR_MIN_PIXELS,
    max_pixels: int = PROCESSOR_MAX_PIXELS,
):
    """The transformers Qwen2-VL image processor that needs neither torchvision nor a model folder:
    ``Qwen2VLImageProcessorPil`` (transformers 5) or the NumPy ``Qwen2VLImageProcessor`` (4.49+)."""
    kwargs = dict(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        pass
    else:
        return Qwen2VLImageProcessorPil(**kwargs)
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except ImportError as exc:
        raise ImportError(
            f"no torchvision-free Qwen2-VL image processor in this transformers ({exc}). Install "
            "transformers>=4.49 (4.x) or a 5.x release that has Qwen2VLImageProcessorPil."
        ) from None
    return Qwen2VLImageProcessor(**kwargs)


def pixel_inputs(image_processor, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [patches, C·T·P·P] float32, image_grid_thw [1, 3] int64) of one fetched image."""
    rule = processor_rule(image_processor.patch_size, image_processor.merge_size)
    width, height = smart_size(image.width, image.height, rule)
    check_aspect(width, height, "at the image processor's size")
    out = image_processor(images=[image], return_tensors="np")
    pixel_values = torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))
    grid = torch.from_numpy(np.asarray(out["image_grid_thw"], dtype=np.int64)).reshape(1, 3)
    patch = image_processor.patch_size
    if grid.tolist() != [[1, height // patch, width // patch]]:
        raise RuntimeError(
            f"the image processor made a {grid.tolist()} patch grid for a {image.width}x{image.height} image; "
            f"expected [[1, {height // patch}, {width // patch}]]. Check the installed transformers version."
        )
    return pixel_values, grid

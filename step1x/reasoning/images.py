"""The image path of v1.2's thinking/reflection calls, without torchvision or qwen_vl_utils.

The reference sends each image as a PNG data URL: RGB, shrunk with PIL ``thumbnail`` to at most 1024 pixels
on the long side, PNG-encoded (lossless, so the round trip is skipped here). ``qwen_vl_utils.fetch_image``
then rounds the sides to multiples of 28 (the instruction encoder's ``fetch_image``), and the thinker's own
image processor resizes once more with 512² ≤ pixels ≤ 1024·28² (up to 1024 image tokens per image).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..encoder.image_chain import ResizeRule, check_aspect, fetch_image, make_image_processor, smart_size
from ..image_io import to_rgb

THUMBNAIL_MAX_SIDE = 1024
THINKER_MIN_PIXELS = 262144
THINKER_MAX_PIXELS = 802816


def prepare_image(image: Image.Image) -> Image.Image:
    """RGB, thumbnail to ``THUMBNAIL_MAX_SIDE``, then the ``fetch_image`` resize; the input is not modified."""
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"thinking/reflection images must be PIL images, got {type(image).__name__}; convert ComfyUI IMAGE "
            "tensors with step1x.image_io.comfy_to_pil."
        )
    rgb = to_rgb(image).copy()
    if max(rgb.size) > THUMBNAIL_MAX_SIDE:
        rgb.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE))
    return fetch_image(rgb)


def make_thinker_image_processor(patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """The encoder's torchvision-free Qwen2-VL image processor class, with the thinker's pixel bounds."""
    cls = type(make_image_processor(patch_size, merge_size, temporal_patch_size))
    return cls(
        min_pixels=THINKER_MIN_PIXELS,
        max_pixels=THINKER_MAX_PIXELS,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )


def thinker_rule(image_processor) -> ResizeRule:
    return ResizeRule(
        factor=image_processor.patch_size * image_processor.merge_size,
        min_pixels=THINKER_MIN_PIXELS,
        max_pixels=THINKER_MAX_PIXELS,
        floor_at_factor=False,
    )


def processor_size(image_processor, image: Image.Image) -> tuple[int, int]:
    """(width, height) the thinker's image processor resizes a prepared image to."""
    width, height = smart_size(image.width, image.height, thinker_rule(image_processor))
    check_aspect(width, height, "at the image processor's size")
    return width, height


def pixel_inputs(image_processor, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [patches, C·T·P·P] float32, image_grid_thw [n, 3] int64) of prepared images, in order."""
    patch = image_processor.patch_size
    expected = []
    for image in images:
        width, height = processor_size(image_processor, image)
        expected.append([1, height // patch, width // patch])
    out = image_processor(images=list(images), return_tensors="np")
    pixel_values = torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))
    grid = torch.from_numpy(np.asarray(out["image_grid_thw"], dtype=np.int64)).reshape(-1, 3)
    if grid.tolist() != expected:
        raise RuntimeError(
            f"the image processor made patch grids {grid.tolist()}; expected {expected}. Check the installed "
            "transformers version."
        )
    return pixel_values, grid

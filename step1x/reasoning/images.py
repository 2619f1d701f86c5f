"""The image path of v1.2's thinking/reflection calls, without torchvision or qwen_vl_utils.

The reference sends each image as a PNG data URL: RGB, shrunk with PIL ``thumbnail`` to at most 1024 pixels
on the long side, PNG-encoded (lossless, so the round trip is skipped here). ``qwen_vl_utils.fetch_image``
then rounds the sides to multiples of 28 (the instruction encoder's ``fetch_image``), and the thinker's own
image processor (transformers' torchvision one in the reference, whose numerics the v1.2 encoder's torch image
path reproduces) resizes once more with 512² ≤ pixels ≤ 1024·28² (up to 1024 image tokens per image).
"""

from __future__ import annotations

import torch
from PIL import Image

from ..encoder.image_chain import ResizeRule, check_aspect, fetch_image, make_image_processor, smart_size
from ..encoder.image_v12 import pixel_inputs_v12
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
    """The encoder's torchvision-free Qwen2-VL image processor, with the thinker's pixel bounds."""
    return make_image_processor(patch_size, merge_size, temporal_patch_size, min_pixels=THINKER_MIN_PIXELS,
                                max_pixels=THINKER_MAX_PIXELS)


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
    """(pixel_values [patches, C·T·P·P] float32, image_grid_thw [n, 3] int64) of prepared images, in order.

    The reference's thinker processor is transformers' torchvision ("fast") Qwen2-VL processor; its numerics
    (uint8 antialiased bicubic resize, fused normalisation) are computed here by the v1.2 encoder's torch image
    path, with the thinker's pixel bounds. ``image_processor`` gives the patch sizes."""
    values, grids = [], []
    for image in images:
        processor_size(image_processor, image)
        v, g = pixel_inputs_v12(
            image, patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
            temporal_patch_size=image_processor.temporal_patch_size, min_pixels=THINKER_MIN_PIXELS,
            max_pixels=THINKER_MAX_PIXELS,
        )
        values.append(v)
        grids.append(g)
    return torch.cat(values), torch.cat(grids)

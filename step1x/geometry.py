"""Image geometry of the official pipeline: the size_level resize and the resize back.

The official editor resizes the reference image to an area of about ``size_level**2`` pixels at the
same aspect ratio, floors each side to a multiple of 16 (one latent patch), edits at that size and
resizes the result back to the original size.
"""

from __future__ import annotations

import math

from PIL import Image

MIN_SIDE = 16
"""Smallest input side we accept; below it the image holds no editable content."""

PATCH = 16
"""Pixels per packed latent token side (VAE /8, then 2x2 packing)."""

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageSizeError(ValueError):
    """An image whose size the pipeline cannot work with."""


UPSCALE_NOTE_FACTOR = 2.0
UPSCALE_NOTE_TOKENS = 4096
"""Sizes worth a note: more than twice the image's sides, and more image tokens than at 1024x1024."""


def _working_size(width: int, height: int, size_level: int) -> tuple[int, int]:
    ratio = width / height
    if width > height:
        new_w = math.ceil(math.sqrt(size_level * size_level * ratio))
        new_h = math.ceil(new_w / ratio)
    else:
        new_h = math.ceil(math.sqrt(size_level * size_level / ratio))
        new_w = math.ceil(new_h * ratio)
    return new_w // PATCH * PATCH, new_h // PATCH * PATCH


def smallest_size_level(width: int, height: int) -> int:
    """The smallest size_level at which ``width x height`` keeps both sides at least 16 pixels (larger ones do too:
    the working size grows with size_level)."""
    level = max(PATCH, math.floor((PATCH - 2) * math.sqrt(max(width, height) / min(width, height))))
    while min(_working_size(width, height, level)) < PATCH:
        level += 1
    return level


def size_level_dims(width: int, height: int, size_level: int = 512) -> tuple[int, int]:
    """Return (width, height) for editing ``width x height`` at ``size_level``.

    Same arithmetic as the official ``input_process_image``: area about ``size_level**2``, aspect
    kept, each side rounded up, then floored to a multiple of 16.
    """
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageSizeError(
            f"image is {width}x{height} pixels; Step1X-Edit needs at least {MIN_SIDE}x{MIN_SIDE}. "
            "Use a larger image or upscale it first."
        )
    if size_level < PATCH:
        raise ImageSizeError(f"size_level {size_level} is too small; use at least {PATCH} (512 or 1024 are typical).")
    new_w, new_h = _working_size(width, height, size_level)
    if new_w < PATCH or new_h < PATCH:
        raise ImageSizeError(
            f"image is {width}x{height} pixels: at size_level {size_level} its short side falls below "
            f"{PATCH} pixels. Use size_level {smallest_size_level(width, height)} or more for this image, or crop it "
            "to a less extreme aspect ratio."
        )
    return new_w, new_h


def upscale_note(width: int, height: int, size_level: int) -> str | None:
    """A sentence for size_levels that blow a small image up many times (minutes of sampling for no detail the
    image has), or None. Front ends add how to cancel."""
    new_w, new_h = size_level_dims(width, height, size_level)
    factor = new_w / width
    tokens = (new_w // PATCH) * (new_h // PATCH)
    if factor <= UPSCALE_NOTE_FACTOR or tokens <= UPSCALE_NOTE_TOKENS:
        return None
    return (
        f"size_level {size_level} upscales the {width}x{height} image {factor:.1f} times, to {new_w}x{new_h} "
        f"({tokens} image tokens, {tokens / UPSCALE_NOTE_TOKENS:.1f} times as many as at size_level 1024); "
        "that takes long and adds no detail the image lacks. 512 or 1024 are the usual size_levels."
    )


def check_dims(width: int, height: int, fix: str = "Resize with the size_level resize first.") -> None:
    """Raise unless ``width x height`` can be edited as is (positive multiples of 16); ``fix`` says what to do."""
    if width < PATCH or height < PATCH or width % PATCH or height % PATCH:
        raise ImageSizeError(
            f"size {width}x{height} cannot be used directly: both sides must be multiples of {PATCH} "
            f"and at least {PATCH}. {fix}"
        )


def resample_filter(name: str) -> Image.Resampling:
    try:
        return RESAMPLE[name]
    except KeyError:
        raise ValueError(f"unknown resample filter {name!r}; choose one of {sorted(RESAMPLE)}") from None


def resize_to_size_level(image: Image.Image, size_level: int = 512, resample: str = "lanczos") -> Image.Image:
    """Resize a PIL image as the official editor does before encoding (LANCZOS in the later code,
    BICUBIC in the first release and its gradio app)."""
    size = size_level_dims(image.width, image.height, size_level)
    if size == image.size:
        return image.copy()
    return image.resize(size, resample_filter(resample))


def restore_size(image: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """Resize an edited image back to the original ``(width, height)`` (official: PIL default BICUBIC)."""
    if image.size == tuple(size):
        return image
    return image.resize(tuple(size), resample_filter(resample))

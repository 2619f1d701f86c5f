"""Conversions between PIL images, files and float tensors, with the official rounding.

The official code reads images with ``to_tensor`` (uint8 / 255) and writes them with
``to_pil_image`` on a float tensor, which truncates (``mul(255).byte()``) instead of rounding.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """A file that cannot be read as an image."""


class ImageValueError(ValueError):
    """An image whose pixel values cannot be edited (NaN or infinite)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float images are scaled, alpha is dropped as the official
    ``convert("RGB")`` does, palettes are expanded. Float images (mode ``F``) whose values all lie within [0, 1]
    are scaled by 255, others are taken as 0-255; values outside the range are clamped to it. NaN or infinite
    values are refused (:class:`ImageValueError`)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            raise ImageValueError(
                f"the image holds {bad} NaN or infinite pixel value(s) out of {arr.size}; they would come out as a "
                "meaningless edit. Fill them in (or export the image without them) and try again."
            )
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def load_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image file as RGB, naming the file in any error."""
    try:
        with Image.open(path) as im:
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"cannot read image {path}: {exc}. Check that it is a complete PNG/JPEG/WebP file.") from None
    try:
        return to_rgb(im)
    except ImageValueError as exc:
        raise ImageValueError(f"{path}: {exc}") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1] (``to_tensor``)."""
    arr = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [0, 1] -> PIL RGB, truncating like ``to_pil_image`` (``mul(255).byte()``)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
    arr = image.detach().float().cpu().mul(255).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr).convert("RGB")


def comfy_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, C] float in [0, 1] -> list of PIL RGB images.

    ComfyUI's loader stores uint8/255, so rounding back recovers the exact source pixels."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE tensor [B, H, W, C], got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"the image is empty (shape {tuple(image.shape)}); connect a loaded image.")
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels in IMAGE, got {channels}")
    arr = image.detach().float().cpu().clamp(0, 1).mul(255).round().byte().numpy()
    out = []
    for a in arr:
        if channels == 1:
            out.append(Image.fromarray(a[:, :, 0], mode="L").convert("RGB"))
        else:
            out.append(Image.fromarray(a[:, :, :3], mode="RGB"))
    return out


def pil_to_comfy(images: list[Image.Image]) -> torch.Tensor:
    """List of same-size PIL images -> ComfyUI IMAGE [B, H, W, 3] float32."""
    arrs = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrs, axis=0))

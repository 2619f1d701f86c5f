"""The v1.2 image chain: the torchvision Qwen2-VL image processor's numbers, computed with torch alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from encoder_v12_support import reference_image
from helpers import seeded_image
from step1x.encoder import ImageInputError, blank_reference
from step1x.encoder.image_chain import make_image_processor
from step1x.encoder.image_v12 import MAX_PIXELS_V12, MIN_PIXELS_V12, pixel_inputs_v12
from step1x.geometry import resize_to_size_level

PIL_GAP = 0.4
"""Largest |torch path - PIL path|: the reference set's notes saw 0.35 against transformers 4.55's PIL processor;
against 5.x's it stays within two uint8 levels (0.03)."""


@pytest.mark.parametrize(
    ("image", "resized"),
    [
        (resize_to_size_level(reference_image(1024, 768), 512), True),
        (resize_to_size_level(reference_image(1024, 1024), 1024), True),
        (seeded_image(320, 320, seed=3), True),
        (seeded_image(448, 448, seed=3), False),
    ],
    ids=["blocky_down", "blocky_up", "noise_up", "noise_as_is"],
)
def test_same_grid_as_the_pil_processor_and_close_values(image, resized):
    """Same grid; the uint8 antialiased bicubic of torch and PIL's differ by a level or two where the image is
    resized, and the fused normalisation by float rounding only where it is not."""
    values, grid = pixel_inputs_v12(image)
    processor = make_image_processor(min_pixels=MIN_PIXELS_V12, max_pixels=MAX_PIXELS_V12)
    out = processor(images=[image], return_tensors="pt")
    assert grid.tolist() == out["image_grid_thw"].tolist()
    gap = float((values - out["pixel_values"]).abs().max())
    assert (0.01 < gap <= PIL_GAP) if resized else (gap < 1e-6)


@pytest.mark.parametrize(("width", "height"), [(512, 512), (1024, 1024), (288, 880), (2048, 256), (64, 64)])
def test_token_count_stays_within_256_and_400(width, height):
    _, grid = pixel_inputs_v12(Image.new("RGB", (width, height)))
    assert 256 <= int(grid.prod()) // 4 <= 400


def test_pixel_range_can_be_changed():
    _, grid = pixel_inputs_v12(Image.new("RGB", (1024, 768)), min_pixels=262144, max_pixels=802816)
    assert grid.tolist() == [[1, 54, 74]]


def test_frames_repeat_and_values_are_clip_normalised():
    values, grid = pixel_inputs_v12(Image.new("RGB", (56, 56), (255, 0, 128)))
    rows = values.reshape(-1, 3, 2, 14, 14)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])
    expected = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    torch.testing.assert_close(rows[0, :, 0, 0, 0], torch.tensor(expected), atol=1e-5, rtol=0)


def test_blank_reference_is_black_and_square():
    image = blank_reference(512)
    assert image.mode == "RGB" and image.size == (512, 512) and image.getbbox() is None
    with pytest.raises(ValueError, match="size_level"):
        blank_reference(0)


def test_non_image_input_is_refused():
    with pytest.raises(ImageInputError, match="PIL image"):
        pixel_inputs_v12(torch.zeros(3, 8, 8))

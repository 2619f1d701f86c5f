"""The image chain in front of the vision tower: sizes, rounding, modes and bad shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import seeded_image
from step1x.encoder import ImageInputError
from step1x.encoder.image_chain import FETCH_RULE, fetch_image, pixel_inputs, processor_rule, smart_size
from step1x.geometry import resize_to_size_level

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_stage_sizes_match_official(official_dir):
    cases = json.loads((official_dir / "tokens.json").read_text(encoding="utf-8"))["cases"]
    seen = set()
    for case in cases:
        key = (tuple(case["image_original_wh"]), case["size_level"])
        if key in seen:
            continue
        seen.add(key)
        width, height = case["image_after_input_process_image_wh"]
        fetched = smart_size(width, height, FETCH_RULE)
        assert list(fetched) == case["image_after_qwen_vl_utils_wh"], key
        assert list(smart_size(*fetched, processor_rule())) == case["image_processor_resized_wh"], key
    assert len(seen) == 6


def test_rounding_is_half_to_even():
    assert smart_size(70, 126, FETCH_RULE) == (56, 112)
    assert smart_size(98, 98, FETCH_RULE) == (112, 112)


def test_tiny_image_is_scaled_up_to_min_pixels(image_processor):
    fetched = fetch_image(Image.new("RGB", (1, 1), (10, 20, 30)))
    assert fetched.size == (56, 56)
    pixel_values, grid = pixel_inputs(image_processor, fetched)
    assert grid.tolist() == [[1, 32, 32]]
    assert pixel_values.shape == (1024, 1176)


def test_wide_image(image_processor):
    fetched = fetch_image(Image.new("RGB", (10000, 100)))
    assert fetched.size == (9996, 112)
    _, grid = pixel_inputs(image_processor, fetched)
    assert grid.tolist() == [[1, 2, 340]]


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ImageInputError, match="aspect ratio"):
        fetch_image(Image.new("RGB", (4020, 20)))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "I;16", "I", "F", "P", "CMYK", "1"])
def test_any_mode_becomes_rgb(mode, image_processor):
    rgb = seeded_image(40, 30, seed=1)
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F", "1") else rgb.convert(mode)
    fetched = fetch_image(image)
    assert fetched.mode == "RGB"
    pixel_values, _ = pixel_inputs(image_processor, fetched)
    assert torch.isfinite(pixel_values).all()


def test_sixteen_bit_grey_keeps_its_range(image_processor):
    arr = np.full((30, 40), 65535, dtype=np.uint16)
    image = Image.fromarray(arr)
    assert image.mode == "I;16"
    fetched = fetch_image(image)
    assert np.asarray(fetched).min() == 255


def test_pixel_values_are_clip_normalised_patches(image_processor):
    color = (200, 100, 50)
    pixel_values, grid = pixel_inputs(image_processor, fetch_image(Image.new("RGB", (56, 56), color)))
    patches = pixel_values.view(-1, 3, 2, 14, 14)
    for c in range(3):
        expected = (color[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(patches[:, c], torch.full_like(patches[:, c], expected), atol=1e-5, rtol=0)
    assert grid.prod().item() == pixel_values.shape[0]


def test_size_level_resize_then_chain_gives_256_to_324_tokens(image_processor):
    for size in [(512, 512), (1024, 768), (300, 900), (4000, 3000), (64, 64)]:
        image = resize_to_size_level(seeded_image(*size), 512)
        _, grid = pixel_inputs(image_processor, fetch_image(image))
        assert 256 <= grid.prod().item() // 4 <= 324, size

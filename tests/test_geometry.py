"""The size_level resize and its edge cases."""

import json

import pytest
from PIL import Image

from step1x.geometry import (
    ImageSizeError,
    check_dims,
    resize_to_size_level,
    restore_size,
    size_level_dims,
    smallest_size_level,
    upscale_note,
)


@pytest.mark.parametrize("size,level,expected", [
    ((512, 512), 512, (512, 512)),
    ((1024, 768), 512, (592, 432)),
    ((300, 900), 512, (288, 880)),
    ((1024, 768), 1024, (1168, 880)),
])
def test_official_size_level_arithmetic(size, level, expected):
    assert size_level_dims(*size, level) == expected


def test_matches_every_image_size_in_the_official_token_fixture(official_dir):
    cases = json.loads((official_dir / "tokens.json").read_text())["cases"]
    for case in cases:
        got = size_level_dims(*case["image_original_wh"], case["size_level"])
        assert list(got) == case["image_after_input_process_image_wh"], case["image_original_wh"]


@pytest.mark.parametrize("size", [(64, 2048), (2048, 64), (10000, 100), (1000, 999), (17, 31)])
def test_extreme_and_odd_sizes_give_multiples_of_16(size):
    w, h = size_level_dims(*size, 512)
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16


def test_one_pixel_image_is_refused_with_the_reason():
    with pytest.raises(ImageSizeError, match=r"image is 1x1 pixels.*at least 16x16"):
        size_level_dims(1, 1, 512)


def test_aspect_too_extreme_for_the_size_level_is_refused():
    with pytest.raises(ImageSizeError, match="short side falls below 16"):
        size_level_dims(100000, 16, 64)


def test_a_4_3_image_at_size_level_16_is_told_the_smallest_size_level_that_works():
    with pytest.raises(ImageSizeError, match=r"image is 640x480 pixels: at size_level 16 .* Use size_level 18 or more"):
        size_level_dims(640, 480, 16)
    assert size_level_dims(640, 480, 18) == (16, 16)


@pytest.mark.parametrize("size", [(640, 480), (480, 16), (16, 5000), (3000, 17), (100000, 16)])
def test_the_smallest_size_level_is_the_first_that_works(size):
    level = smallest_size_level(*size)
    assert min(size_level_dims(*size, level)) >= 16
    if level > 16:
        with pytest.raises(ImageSizeError):
            size_level_dims(*size, level - 1)


def test_a_size_level_that_upscales_a_small_image_many_times_gets_a_note():
    note = upscale_note(128, 96, 4096)
    assert "size_level 4096 upscales the 128x96 image 36.9 times, to 4720x3536 (65195 image tokens" in note


@pytest.mark.parametrize("size, level", [((128, 96), 512), ((1000, 1000), 1024), ((4000, 3000), 2048)])
def test_ordinary_size_levels_get_no_note(size, level):
    assert upscale_note(*size, level) is None


def test_resize_keeps_aspect_and_restore_returns_the_original_size():
    image = Image.new("RGB", (1000, 750), (10, 20, 30))
    small = resize_to_size_level(image, 512)
    assert small.size == size_level_dims(1000, 750, 512)
    assert restore_size(small, image.size).size == (1000, 750)


def test_dims_not_multiple_of_16_are_refused_for_direct_use():
    with pytest.raises(ImageSizeError, match="multiples of 16"):
        check_dims(1000, 512)

"""The library's entry points on bad input (non-finite pixels, seeds outside 0 ... 2**64 - 1, reserved placeholders,
a size_level the image cannot take), img2img from a separate init image, and a reference encode with the
caller's noise."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import seeded_image
from step1x.geometry import ImageSizeError, restore_size, size_level_dims
from step1x.image_io import ImageValueError, load_image, tensor_to_pil, to_rgb
from step1x.pipeline import (
    EditOptions,
    Step1XPipeline,
    check_instruction,
    decode_latent,
    encode_pixels,
    init_pixels,
    latent_shape,
)
from step1x.sampling.denoise import MAX_SEED, make_noise

FAST = dict(steps=2, size_level=32)


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return Step1XPipeline.from_folder(tiny_models, device="cpu", compute_dtype=torch.float32)


def float_image_with_nan(width=40, height=32) -> Image.Image:
    values = np.linspace(0, 1, width * height, dtype=np.float32).reshape(height, width)
    values[5, 7] = np.nan
    return Image.fromarray(values, mode="F")


# ------------------------------------------------------------------------------------------- bad input


def test_an_image_with_nan_pixels_is_refused_by_name(pipe):
    with pytest.raises(ImageValueError, match=r"^the image to edit: the image holds 1 NaN or infinite pixel"):
        pipe.edit(float_image_with_nan(), "x", EditOptions(**FAST))


def test_an_init_image_with_nan_pixels_is_refused_by_name(pipe):
    with pytest.raises(ImageValueError, match=r"^the init image: the image holds 1 NaN"):
        pipe.edit(seeded_image(40, 32), "x", EditOptions(strength=0.5, init_image=float_image_with_nan(), **FAST))


def test_a_float_image_file_with_nan_pixels_names_the_file(tmp_path):
    float_image_with_nan().save(tmp_path / "scan.tif")
    with pytest.raises(ImageValueError, match=r"scan\.tif: the image holds 1 NaN or infinite pixel"):
        load_image(tmp_path / "scan.tif")


@pytest.mark.parametrize("values, expected", [
    ([-0.5, 0.5, 1.0], [0, 128, 255]),        # all within [0, 1] but one: scaled by 255, clamped
    ([-5.0, 100.0, 300.0], [0, 100, 255]),    # a 0-255 image: clamped
])
def test_float_image_values_outside_the_range_are_clamped(values, expected):
    image = Image.fromarray(np.array([values], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == expected


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64, 1.5])
def test_seeds_outside_the_generator_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"the seed must be a whole number from 0 to 18446744073709551615"):
        EditOptions(seed=seed).validate()
    with pytest.raises(ValueError, match=r"the seed must be a whole number"):
        make_noise((1, 4), seed)


def test_the_largest_seed_is_its_own_seed_and_not_seed_0():
    assert not torch.equal(make_noise((1, 8), MAX_SEED), make_noise((1, 8), 0))


@pytest.mark.parametrize("text, ok", [
    ("add a hat", True),
    ('write "<|image_pad|>" on the wall', True),   # quoted: fed one character at a time
    ("don't add <|image_pad|>", True),             # the apostrophe opens a quote, as in the official splitter
    ("add <|image_pad|> here", False),
    ("a <|video_pad|>", False),
])
def test_reserved_placeholders_are_found_without_a_tokenizer(text, ok):
    if ok:
        check_instruction(text)
    else:
        with pytest.raises(ValueError, match=r"a placeholder reserved for the reference image"):
            check_instruction(text)


@pytest.mark.parametrize("text, ok", [
    ("add a hat", True),
    ('write "<|image_pad|>" on the wall', False),  # v1.2 cuts special tokens out before it looks at quotes
    ("don't add <|image_pad|>", False),
    ('write "<|video_pad|>"', False),
])
def test_under_the_v12_rules_quotes_do_not_make_a_placeholder_text(text, ok):
    if ok:
        check_instruction(text, version="v1.2")
    else:
        with pytest.raises(ValueError, match=r"placeholder reserved for the reference image; remove it \(the v1.2"):
            check_instruction(text, version="v1.2")


def test_the_pipeline_refuses_a_placeholder_before_encoding(pipe, monkeypatch):
    monkeypatch.setattr(type(pipe.encoder), "encode", lambda *a, **k: pytest.fail("the MLLM ran"))
    with pytest.raises(ValueError, match=r"contains <\|image_pad\|>"):
        pipe.edit(seeded_image(40, 32), "add <|image_pad|>", EditOptions(**FAST))


def test_the_pipeline_names_the_smallest_size_level_that_works(pipe):
    with pytest.raises(ImageSizeError, match=r"Use size_level \d+ or more for this image") as info:
        pipe.edit(seeded_image(160, 16), "x", EditOptions(steps=1, size_level=32))
    smallest = int(re.search(r"Use size_level (\d+)", str(info.value)).group(1))
    assert min(size_level_dims(160, 16, smallest)) == 16
    with pytest.raises(ImageSizeError):
        size_level_dims(160, 16, smallest - 1)


def test_text_to_image_size_errors_do_not_mention_the_size_level_resize(pipe):
    with pytest.raises(ImageSizeError) as info:
        pipe.text_to_image("a fox", 100, 64, EditOptions(**FAST))
    assert "size_level" not in str(info.value) and "multiples of 16" in str(info.value)


# ------------------------------------------------------------------------------------------- img2img


def test_strength_0_returns_the_init_image_through_the_vae(pipe):
    source, init = seeded_image(32, 32, seed=1), seeded_image(72, 50, seed=2)
    result = pipe.edit(source, "x", EditOptions(strength=0.0, init_image=init, **FAST))
    working = (32, 32)
    latent = encode_pixels(pipe.vae, init_pixels(init, working), pipe.device)
    expected = restore_size(tensor_to_pil(decode_latent(pipe.vae, latent)[0]), source.size)
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def test_the_init_image_is_resized_with_nearest_as_the_official_code_does():
    init = seeded_image(5, 3, seed=3)
    pixels = init_pixels(init, (10, 6))
    source = torch.from_numpy(np.asarray(init).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(pixels[0], source.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))


def test_a_separate_init_image_changes_an_img2img_edit(pipe):
    source = seeded_image(40, 32, seed=1)
    plain = pipe.edit(source, "x", EditOptions(strength=0.5, **FAST))
    from_init = pipe.edit(source, "x", EditOptions(strength=0.5, init_image=seeded_image(40, 32, seed=9), **FAST))
    assert not np.array_equal(np.asarray(plain), np.asarray(from_init))


# --------------------------------------------------------------------------------- reference-encode noise


def test_the_reference_encode_noise_can_be_passed_in(pipe):
    source = seeded_image(32, 32, seed=1)
    seeded = pipe.edit(source, "x", EditOptions(sample_vae=True, seed=7, **FAST))
    noise = torch.randn(latent_shape((32, 32)), generator=torch.Generator().manual_seed(7))
    given = pipe.edit(source, "x", EditOptions(seed=7, **FAST), reference_noise=noise)
    other = pipe.edit(source, "x", EditOptions(seed=7, **FAST), reference_noise=torch.zeros_like(noise))
    assert np.array_equal(np.asarray(seeded), np.asarray(given))
    assert not np.array_equal(np.asarray(given), np.asarray(other))


def test_reference_encode_noise_of_the_wrong_shape_is_refused(pipe):
    with pytest.raises(ValueError, match=r"needs \(1, 16, 4, 4\)"):
        pipe.edit(seeded_image(32, 32), "x", EditOptions(**FAST), reference_noise=torch.zeros(1, 16, 8, 8))

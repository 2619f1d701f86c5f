"""Encoding with the tiny model: output contract, agreement with transformers' own forward, bad inputs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers import seeded_image
from step1x.encoder import DROP_TOKENS, MAX_LENGTH

ATOL = 1e-5


@pytest.fixture(scope="module")
def image():
    return seeded_image(80, 64, seed=7)


@pytest.fixture(scope="module")
def hf_model(tiny_assets):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_assets.folder, attn_implementation="sdpa", local_files_only=True
    )
    return model.eval()


def test_output_contract(tiny_encoder, image):
    out = tiny_encoder.encode([image, image], ["Make the sky purple.", ""])
    assert out.embedding.shape == (2, MAX_LENGTH, 64)
    assert out.embedding.dtype == torch.bfloat16
    assert out.mask.shape == (2, MAX_LENGTH) and out.mask.dtype == torch.int64
    assert out.embedding.device == out.mask.device == tiny_encoder.device
    for row, prompt in enumerate(["Make the sky purple.", ""]):
        start, stop = tiny_encoder.inputs(image, prompt).kept
        n = stop - start
        assert out.mask[row].tolist() == [1] * n + [0] * (MAX_LENGTH - n)
        assert out.embedding[row, n:].abs().sum() == 0
        assert out.embedding[row, :n].abs().sum(-1).min() > 0


def test_layout_of_kept_tokens(tiny_encoder, image):
    ids = tiny_encoder.inputs(image, "x").input_ids[0].tolist()
    assert ids[DROP_TOKENS - 2 : DROP_TOKENS + 3] == [1474, 59501, 25, 151652, 151655]


@pytest.mark.parametrize(
    "prompt",
    ["Make the sky purple.", "Wow! Make it pop!!", "Make the girl's dress blue", "long " * 400],
    ids=["plain", "masked_bang", "apostrophe", "truncated"],
)
def test_matches_transformers_forward(tiny_encoder, hf_model, image, prompt):
    inputs = tiny_encoder.inputs(image, prompt)
    with torch.inference_mode():
        ref = hf_model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            output_hidden_states=True,
        ).hidden_states[-1][0]
    start, stop = inputs.kept
    out = tiny_encoder.encode([image], [prompt], out_dtype=torch.float32)
    torch.testing.assert_close(out.embedding[0, : stop - start], ref[start:stop], atol=ATOL, rtol=0)


def test_encode_pair_is_cond_then_uncond(tiny_encoder, image):
    pair = tiny_encoder.encode_pair(image, "Add a hat", negative_prompt="")
    cond = tiny_encoder.encode([image], ["Add a hat"])
    uncond = tiny_encoder.encode([image], [""])
    assert torch.equal(pair.embedding, torch.cat([cond.embedding, uncond.embedding]))
    assert torch.equal(pair.mask, torch.cat([cond.mask, uncond.mask]))


def test_one_image_serves_all_prompts(tiny_encoder, image):
    shared = tiny_encoder.encode(image, ["a", "b"])
    listed = tiny_encoder.encode([image, image], ["a", "b"])
    assert torch.equal(shared.embedding, listed.embedding)


def test_short_max_length_is_a_prefix(tiny_encoder, image):
    full = tiny_encoder.encode([image], ["Add a hat"])
    short = tiny_encoder.encode([image], ["Add a hat"], max_length=8)
    assert short.embedding.shape == (1, 8, 64)
    assert short.mask.sum() == 8
    assert torch.equal(short.embedding[0], full.embedding[0, :8])


def test_moving_the_encoder(tiny_encoder, image):
    assert tiny_encoder.to("cpu") is tiny_encoder
    assert tiny_encoder.device == torch.device("cpu")
    assert tiny_encoder.encode([image], ["x"]).embedding.device == torch.device("cpu")


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "   \n\t ",
        "a" * 5000,
        'Write "' + "b" * 4990,
        "Add 🌈 and ⭐ and 👩‍👩‍👧 to the sky",
        "把背景换成海滩，天空变成日落的颜色",
        'unmatched "quote',
        "unmatched 'apostrophe",
        "“curly” and ”reversed“",
        "<|im_end|>\n<|im_start|>assistant\n",
        "<|vision_start|><|vision_end|><|endoftext|>",
        'keep "<|image_pad|>" as text',
        "\x00\x01 control \u200b chars",
    ],
    ids=[
        "empty",
        "whitespace",
        "5000_chars",
        "5000_char_quote",
        "emoji",
        "cjk",
        "unmatched_quote",
        "unmatched_apostrophe",
        "curly_quotes",
        "special_tokens",
        "vision_tokens",
        "quoted_placeholder",
        "control_chars",
    ],
)
def test_odd_instructions_give_valid_embeddings(tiny_encoder, image, prompt):
    out = tiny_encoder.encode([image], [prompt], out_dtype=torch.float32)
    start, stop = tiny_encoder.inputs(image, prompt).kept
    assert int(out.mask.sum()) == stop - start <= MAX_LENGTH
    assert torch.isfinite(out.embedding).all()


def test_long_instruction_fills_all_positions(tiny_encoder, image):
    out = tiny_encoder.encode([image], ["a" * 5000])
    assert int(out.mask.sum()) == MAX_LENGTH


@pytest.mark.parametrize("prompt", ["draw <|image_pad|> here", "<|video_pad|>"])
def test_placeholder_tokens_in_instruction_are_refused(tiny_encoder, image, prompt):
    with pytest.raises(ValueError, match="placeholder reserved for the reference image"):
        tiny_encoder.encode([image], [prompt])


@pytest.mark.parametrize(
    "picture",
    [
        Image.new("RGB", (1, 1), (255, 0, 0)),
        Image.new("RGB", (10000, 100), (0, 0, 255)),
        Image.new("RGBA", (64, 48), (0, 255, 0, 10)),
        Image.new("L", (48, 64), 128),
        Image.new("I;16", (40, 40)),
    ],
    ids=["1x1", "10000x100", "rgba", "grey", "16bit"],
)
def test_odd_images_give_valid_embeddings(tiny_encoder, picture):
    out = tiny_encoder.encode([picture], ["make it brighter"], out_dtype=torch.float32)
    start, stop = tiny_encoder.inputs(picture, "make it brighter").kept
    assert int(out.mask.sum()) == stop - start
    assert torch.isfinite(out.embedding).all()


@pytest.mark.parametrize(
    ("images", "prompts", "kwargs", "message"),
    [
        ("not an image", ["x"], {}, "PIL images"),
        (None, [None], {}, "must be a string"),
        (None, [], {}, "no instructions"),
        ("two", ["a", "b", "c"], {}, "2 images for 3 instructions"),
        (None, ["x"], {"max_length": 0}, "max_length"),
    ],
    ids=["not_pil", "not_str", "no_prompts", "count_mismatch", "max_length"],
)
def test_wrong_arguments_are_value_errors(tiny_encoder, image, images, prompts, kwargs, message):
    images = {None: [image], "two": [image, image]}.get(images, [images])
    with pytest.raises(ValueError, match=message):
        tiny_encoder.encode(images, prompts, **kwargs)

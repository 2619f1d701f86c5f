"""Every generate() call of v1.2's thinking/reflection gets exactly the reference's inputs: system prompt, user
text, message layout, templated text, token ids, image grid, pixel shape and generate() settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reasoning_support import EDITED_SEED, SOURCE_SEED, fixture_image, qwen_tokenizer, rgb_sha16, thinker_record
from step1x.reasoning import GenerationSettings, build_model_inputs
from step1x.reasoning import messages as M
from step1x.reasoning.images import make_thinker_image_processor, prepare_image
from step1x.reasoning.parsers import apply_score_caps, parse_json_block

WIDTH, HEIGHT = 1024, 768


@pytest.fixture(scope="module")
def record(v12_dir):
    return thinker_record(v12_dir)


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return qwen_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def image_processor():
    return make_thinker_image_processor()


@pytest.fixture(scope="module")
def images():
    return fixture_image(WIDTH, HEIGHT, SOURCE_SEED), fixture_image(WIDTH, HEIGHT, EDITED_SEED)


def build_call(kind: str, case: dict, source: Image.Image, edited: Image.Image) -> M.ChatCall:
    """The call the thinker makes at ``kind`` for the recorded case (earlier replies fed in as recorded)."""
    instruction = case["instruction"]
    calls = case["calls"]
    if kind == M.THINK:
        return M.think_call(source, instruction)
    if kind == M.DESCRIBE:
        return M.describe_call(source, instruction)
    if kind == M.EVALUATE:
        return M.evaluate_call(edited, instruction, calls[M.DESCRIBE]["returned_text"])
    if kind == M.REFLECT:
        evaluation = apply_score_caps(parse_json_block(calls[M.EVALUATE]["returned_text"]))
        return M.reflect_call(source, edited, instruction, evaluation)
    if kind == M.SCORE1:
        return M.score1_call(source, edited, instruction)
    return M.score2_call(edited)


def test_fixture_images_are_the_recorded_ones(record, images):
    source, edited = images
    recorded = record["call_inputs"]["en"]["calls"][M.SCORE1]["messages_as_built"][1]["content"]
    assert f"sha256(rgb)={rgb_sha16(source)}>" in recorded[0]["image_url"]["url"]
    assert f"sha256(rgb)={rgb_sha16(edited)}>" in recorded[1]["image_url"]["url"]


def test_call_order_is_the_reference_one(record):
    for case in record["call_inputs"].values():
        assert tuple(case["call_order"]) == M.CALL_KINDS


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("kind", M.CALL_KINDS)
def test_messages_match(record, images, language, kind):
    case = record["call_inputs"][language]
    expected = case["calls"][kind]
    call = build_call(kind, case, *images)
    assert call.system == expected["system_prompt"]
    assert call.user_text == expected["user_text"]
    user_turn = expected["messages_as_built"][1]["content"]
    layout = ["image" if part["type"] == "image_url" else "text" for part in user_turn]
    assert ["image" if isinstance(part, Image.Image) else "text" for part in call.parts] == layout
    assert call.reference_max_tokens == expected["max_tokens_argument_ignored"]


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("kind", M.CALL_KINDS)
def test_model_inputs_match(record, images, tokenizer, image_processor, language, kind):
    case = record["call_inputs"][language]
    expected = case["calls"][kind]
    inputs = build_model_inputs(build_call(kind, case, *images), tokenizer, image_processor)
    assert inputs.text == expected["templated_text"]
    assert inputs.input_ids[0].tolist() == expected["input_ids"]
    assert expected["attention_mask_all_ones"] and bool((inputs.attention_mask == 1).all())
    assert inputs.image_grid_thw.tolist() == expected["image_grid_thw"]
    assert list(inputs.pixel_values.shape) == expected["pixel_values_shape"]
    assert [list(size) for size in inputs.image_sizes] == expected["process_vision_info_sizes_wh"]
    reference_tensors = set(inputs.generate_kwargs("cpu", token_types=False))
    assert reference_tensors == set(expected["generate_tensor_inputs"])


@pytest.mark.parametrize("kind", M.CALL_KINDS)
def test_generate_settings_match(record, images, kind):
    case = record["call_inputs"]["en"]
    call = build_call(kind, case, *images)
    assert GenerationSettings().generate_kwargs(call) == case["calls"][kind]["generate_kwargs"]
    assert record["eos_token_id"] == GenerationSettings().eos_token_id


def test_processor_bounds_match(record, image_processor):
    bounds = record["thinker_processor"]
    assert image_processor.size["shortest_edge"] == bounds["min_pixels"]
    assert image_processor.size["longest_edge"] == bounds["max_pixels"]


def test_reference_budgets_replace_128_on_request(images):
    call = M.think_call(images[0], "Make the sky purple.")
    assert GenerationSettings(max_new_tokens=None).generate_kwargs(call)["max_new_tokens"] == 512
    assert GenerationSettings(max_new_tokens=64).generate_kwargs(call)["max_new_tokens"] == 64


def test_image_tokens_are_typed_for_the_rope_grid(images, tokenizer, image_processor):
    inputs = build_model_inputs(M.score2_call(images[1]), tokenizer, image_processor)
    types = inputs.mm_token_type_ids[0]
    assert int(types.sum()) == int(inputs.image_grid_thw.prod()) // 4
    assert types.tolist() == [int(i == 151655) for i in inputs.input_ids[0].tolist()]


def test_large_image_is_thumbnailed_to_1024_first(image_processor):
    image = fixture_image(2048, 1024, seed=5)
    prepared = prepare_image(image)
    assert image.size == (2048, 1024)
    thumb = image.copy()
    thumb.thumbnail((1024, 1024))
    assert thumb.size == (1024, 512)
    assert prepared.size == (1036, 504)
    expected = thumb.resize((1036, 504), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(prepared), np.asarray(expected))


def test_small_image_is_scaled_up_to_512_squared_pixels(tokenizer, image_processor):
    call = M.score2_call(Image.new("RGB", (100, 100), (10, 20, 30)))
    inputs = build_model_inputs(call, tokenizer, image_processor)
    assert inputs.image_sizes == ((112, 112),)
    assert inputs.image_grid_thw.tolist() == [[1, 38, 38]]


def test_rgba_image_drops_alpha_like_convert_rgb(tokenizer, image_processor):
    rgba = Image.new("RGBA", (64, 64), (200, 100, 50, 0))
    prepared = prepare_image(rgba)
    assert prepared.mode == "RGB" and prepared.getpixel((0, 0)) == (200, 100, 50)


def test_braces_in_the_instruction_are_inserted_literally(images):
    call = M.score1_call(*images, "Write {language} and {instruction} on the sign")
    assert "Editing instruction: Write {language} and {instruction} on the sign\n" in call.user_text


def test_typed_image_placeholder_is_a_clear_error(images, tokenizer, image_processor):
    call = M.describe_call(images[0], "add <|image_pad|> here")
    with pytest.raises(ValueError, match="<\\|image_pad\\|>"):
        build_model_inputs(call, tokenizer, image_processor)


def test_non_image_input_is_a_clear_error():
    with pytest.raises(TypeError, match="PIL images"):
        M.score2_call(torch.zeros(1, 64, 64, 3))  # type: ignore[arg-type]

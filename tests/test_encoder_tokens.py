"""Token parity with the official encoder: 18 instructions x 6 image configurations from tokens.json."""

from __future__ import annotations

import json

import pytest

from helpers import seeded_image
from step1x.encoder import build_inputs, load_tokenizer
from step1x.encoder.template import QUOTE_CHARS, QUOTE_MIN_INDEX, STEP1X_PREFIX, chat_text, split_quoted
from step1x.encoder.tokens import piece_ids
from step1x.geometry import resize_to_size_level

CASE_FIELDS = ("input_ids", "attention_mask", "image_grid_thw", "num_image_pad_tokens", "kept_hidden_state_range")


@pytest.fixture(scope="module")
def tokens(official_dir):
    return json.loads((official_dir / "tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return load_tokenizer(qwen_tokenizer_dir)


def test_prefix_and_layout_match_official(tokens):
    assert STEP1X_PREFIX == tokens["prefix"]
    for key, item in tokens["per_instruction"].items():
        assert chat_text(item["instruction"]) == item["templated_text"], key


def test_template_has_no_quote_past_threshold_before_instruction():
    head = chat_text("")
    late = [i for i, ch in enumerate(head) if i >= QUOTE_MIN_INDEX and (ch == '"' or ch in QUOTE_CHARS)]
    assert late == []


def test_quote_split_matches_official(tokens):
    for key, item in tokens["per_instruction"].items():
        assert split_quoted(item["templated_text"]) == item["split_string"], key


def test_piece_token_ids_match_official(tokens, tokenizer):
    for key, item in tokens["per_instruction"].items():
        got = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in item["split_string"]]
        assert got == item["piece_token_ids_before_strip"], key
        # The official strip (README M3): a piece loses its first and last token only when they are the
        # standalone curly quotes 2073 and 854.
        expected = [t for ids in got for t in (ids[1:-1] if len(ids) >= 2 and ids[0] == 2073 and ids[-1] == 854
                                               else ids)]
        assert piece_ids(tokenizer, item["split_string"]) == expected, key


def _case_inputs(case, tokens, tokenizer, image_processor, images):
    size = tuple(case["image_original_wh"])
    if size not in images:
        images[size] = seeded_image(*size)
    image = resize_to_size_level(images[size], case["size_level"])
    assert list(image.size) == case["image_after_input_process_image_wh"]
    instruction = tokens["per_instruction"][case["instruction_key"]]["instruction"]
    return build_inputs(tokenizer, image_processor, image, instruction)


def _case_values(inputs):
    return {
        "input_ids": inputs.input_ids[0].tolist(),
        "attention_mask": inputs.attention_mask[0].tolist(),
        "image_grid_thw": inputs.image_grid_thw[0].tolist(),
        "num_image_pad_tokens": inputs.num_image_tokens,
        "kept_hidden_state_range": list(inputs.kept),
    }


def test_all_cases_token_exact(tokens, tokenizer, image_processor):
    cases = tokens["cases"]
    assert len(cases) == 108
    images: dict = {}
    mismatches = []
    for case in cases:
        inputs = _case_inputs(case, tokens, tokenizer, image_processor, images)
        got = _case_values(inputs)
        wrong = [f for f in CASE_FIELDS if got[f] != case[f]]
        if list(inputs.pixel_values.shape) != case["pixel_values_shape"]:
            wrong.append("pixel_values_shape")
        if inputs.input_ids[0].tolist().count(151655) != case["num_image_pad_tokens"]:
            wrong.append("image pad count")
        if inputs.kept[1] - inputs.kept[0] != case["embedding_mask_len"]:
            wrong.append("embedding_mask_len")
        if wrong:
            mismatches.append(f"{case['instruction_key']} {case['image_original_wh']}@{case['size_level']}: {wrong}")
    assert not mismatches, f"{len(mismatches)}/108 cases differ from the official encoder:\n" + "\n".join(mismatches)


def test_mrope_positions_match_official(tokens, tokenizer, image_processor):
    images: dict = {}
    checked = 0
    for case in tokens["cases"]:
        if "mrope_position_ids" not in case:
            continue
        inputs = _case_inputs(case, tokens, tokenizer, image_processor, images)
        assert inputs.position_ids[:, 0].tolist() == case["mrope_position_ids"], case["instruction_key"]
        checked += 1
    assert checked == 18


def test_bang_token_is_masked(tokens, tokenizer, image_processor):
    case = next(c for c in tokens["cases"] if c["instruction_key"] == "bang")
    inputs = _case_inputs(case, tokens, tokenizer, image_processor, {})
    zeros = (inputs.attention_mask[0] == 0).nonzero().flatten().tolist()
    assert zeros == case["attention_mask_zero_positions"] != []

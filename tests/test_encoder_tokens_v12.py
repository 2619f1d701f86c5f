"""v1.2 input parity with the reference pipeline: 13 instructions x 4 image configurations + 2 text-to-image
cases from tokens_v12.json, every recorded field identical (ids, masks, grids, pixels, positions, txt_ids)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from encoder_v12_support import reference_image, rgb_sha256
from step1x.encoder import load_tokenizer
from step1x.encoder.image_v12 import MAX_PIXELS_V12, MIN_PIXELS_V12, blank_reference
from step1x.encoder.inputs_v12 import MAX_LENGTH_V12, PREFIX_TOKENS_V12, build_inputs_v12
from step1x.encoder.positions_v12 import VAE_AFFINE, vision_cell_positions
from step1x.encoder.quotes_v12 import special_token_strings
from step1x.encoder.template import (
    EDIT_PREFIX_V12,
    T2I_NEGATIVE_PROMPT_V12,
    chat_text_v12,
    default_negative_prompt_v12,
)
from step1x.encoder.tokens import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID, prompt_chunks_v12
from step1x.geometry import resize_to_size_level, size_level_dims

IMAGE_PADS_IN_RECORD = "<image pads, see case>"


@pytest.fixture(scope="module")
def record(v12_dir):
    return json.loads((v12_dir / "tokens_v12.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return load_tokenizer(qwen_tokenizer_dir)


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _reference(case) -> tuple:
    """(the image the encoder receives, the original size, the VAE input shape) as the pipeline makes them."""
    if case["image_original_wh"] is None:
        return blank_reference(case["size_level"]), [case["size_level"]] * 2, None
    width, height = case["image_original_wh"]
    image = resize_to_size_level(reference_image(width, height), case["size_level"])
    return image, [width, height], [1, 3, image.height, image.width]


def _case_values(inputs, image) -> dict:
    """Every field the reference recorded for a case, computed from our inputs."""
    ids = inputs.input_ids[0].tolist()
    start, stop = inputs.kept
    first_pad = ids.index(IMAGE_PAD_ID)
    vision = inputs.vision_mask.nonzero().flatten().tolist()
    positions = inputs.position_ids[:, 0]
    grid = inputs.image_grid_thw[0]
    return {
        "encode_image_wh": list(image.size),
        "ref_image_sha256_rgb_uint8": rgb_sha256(image),
        "latent_token_hw": [image.height // 16, image.width // 16],
        "image_grid_thw": grid.tolist(),
        "image_processor_resized_wh": [int(grid[2]) * 14, int(grid[1]) * 14],
        "pixel_values_shape": list(inputs.pixel_values.shape),
        "pixel_values_sha256_fp32": _sha256(inputs.pixel_values),
        "num_image_pad_tokens": ids.count(IMAGE_PAD_ID),
        "first_image_pad_index": first_pad,
        "vision_start_index": ids.index(VISION_START_ID),
        "vision_end_index": ids.index(VISION_END_ID, first_pad),
        "seq_len": len(ids),
        "input_ids": ids,
        "attention_mask_zero_positions": (inputs.attention_mask[0] == 0).nonzero().flatten().tolist(),
        "kept_range": [start, stop],
        "cut_length": inputs.length,
        "encode_prompt_valid_len": inputs.length,
        "vision_tokens_in_kept_slice": len(vision),
        "vision_tokens_thw": (grid // 2).tolist(),
        "affine_mat_source_to_vision": inputs.affine().flatten().tolist(),
        "position_ids_shift": float(positions[0, start:stop].max() + 1),
        "mrope_position_ids_full": positions.tolist(),
        "mrope_position_ids_full_sha256": _sha256(positions),
        "out_position_ids": inputs.shifted_positions().T.tolist(),
        "txt_ids": inputs.txt_ids().tolist(),
        "text_masks_kept_one_positions": inputs.text_mask[0, start:stop].nonzero().flatten().tolist(),
        "vision_masks_kept_one_range": [vision[0], vision[-1] + 1] if vision else [],
    }


def test_prefix_negative_prompts_and_constants_match_reference(record):
    assert EDIT_PREFIX_V12 == record["QWEN25VL_PREFIX"]
    assert len(EDIT_PREFIX_V12) == record["quote_split_prefix_len_chars"]
    assert PREFIX_TOKENS_V12 == record["QWEN25VL_PREFIX_LEN_tokens_dropped"]
    assert MAX_LENGTH_V12 == record["max_token_length"]
    assert default_negative_prompt_v12(text_to_image=False) == record["editing_negative_prompt"] == ""
    assert default_negative_prompt_v12(text_to_image=True) == T2I_NEGATIVE_PROMPT_V12
    assert T2I_NEGATIVE_PROMPT_V12 == record["t2i_default_negative_prompt"]
    assert (MIN_PIXELS_V12, MAX_PIXELS_V12) == (record["processor"]["min_pixels"], record["processor"]["max_pixels"])
    assert torch.tensor(VAE_AFFINE).flatten().tolist() == record["vae_downsample_affine_mat"]


def test_templated_text_matches_reference(record):
    for key, item in record["instructions"].items():
        assert chat_text_v12(item["instruction"]) == item["templated_text"], key


def test_special_tokens_match_reference(record, tokenizer):
    assert {re.escape(t) for t in special_token_strings(tokenizer)} == set(record["special_token_patterns"])


def test_chunks_and_quote_flags_match_reference(record, tokenizer):
    for key, item in record["instructions"].items():
        chunks = prompt_chunks_v12(tokenizer, item["instruction"])
        assert [c.text for c in chunks] == item["chunks"], key
        assert [c.quoted for c in chunks] == item["chunk_is_quoted"], key


def test_chunk_token_ids_match_reference(record, tokenizer):
    for key, item in record["instructions"].items():
        for text, expected in zip(item["chunks"], item["chunk_token_ids"], strict=True):
            if expected == IMAGE_PADS_IN_RECORD:
                continue
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, (key, text)


def test_reference_images_and_sizes_match_reference(record):
    for case in record["cases"] + record["t2i_cases"]:
        image, info_wh, vae_shape = _reference(case)
        assert rgb_sha256(image) == case["ref_image_sha256_rgb_uint8"], case["image_original_wh"]
        assert list(image.size) == case["encode_image_wh"]
        assert info_wh == case["img_info_wh"] and vae_shape == case["vae_image_shape"]
        if case["image_original_wh"] is not None:
            assert list(size_level_dims(*case["image_original_wh"], case["size_level"])) == case["encode_image_wh"]


def test_every_recorded_field_is_identical(record, tokenizer):
    cases = record["cases"] + record["t2i_cases"]
    assert len(cases) == 13 * 4 + 2
    images: dict = {}
    compared = 0
    mismatches = []
    for case in cases:
        key = (tuple(case["image_original_wh"] or ()), case["size_level"])
        if key not in images:
            images[key] = _reference(case)[0]
        instruction = record["instructions"][case["instruction_key"]]["instruction"]
        inputs = build_inputs_v12(tokenizer, images[key], instruction)
        got = _case_values(inputs, images[key])
        recorded = {k: v for k, v in case.items() if k not in ("instruction_key", "image_original_wh", "size_level",
                                                                "img_info_wh", "vae_image_shape")}
        assert set(recorded) <= set(got), set(recorded) - set(got)
        wrong = [name for name, value in recorded.items() if got[name] != value]
        compared += len(recorded)
        if wrong:
            mismatches.append(f"{case['instruction_key']} {case['image_original_wh']}@{case['size_level']}: {wrong}")
    assert not mismatches, f"{len(mismatches)}/{len(cases)} cases differ:\n" + "\n".join(mismatches)
    assert compared > 54 * 25


def test_full_arrays_are_recorded_where_promised(record):
    full = [c for c in record["cases"] + record["t2i_cases"] if "txt_ids" in c]
    hashed = [c for c in record["cases"] if "mrope_position_ids_full_sha256" in c]
    assert len(full) == 13 * 3 + 3 + 2 and len(hashed) == 10


def test_a_long_instruction_truncates_the_image_tokens(record, tokenizer):
    instruction = record["instructions"]["long_en"]["instruction"]
    inputs = build_inputs_v12(tokenizer, resize_to_size_level(reference_image(300, 900), 512), instruction)
    assert inputs.length == MAX_LENGTH_V12
    kept = int(inputs.vision_mask.sum())
    assert 0 < kept < inputs.num_image_tokens
    rows, cols = inputs.vision_grid
    ids = inputs.txt_ids()
    cells = vision_cell_positions(rows, cols, inputs.affine())[:kept]
    assert torch.equal(ids[inputs.vision_mask, 1:], cells)
    assert float(ids[inputs.vision_mask, 0].unique()) == -1.0  # the image rows hold the largest kept t


def test_bang_is_masked_for_positions_only(record, tokenizer):
    inputs = build_inputs_v12(tokenizer, blank_reference(512), record["instructions"]["bang"]["instruction"])
    zeros = (inputs.attention_mask[0] == 0).nonzero().flatten().tolist()
    assert zeros and all(inputs.input_ids[0, z] == 0 for z in zeros)
    assert all(inputs.position_ids[:, 0, z].tolist() == [1, 1, 1] for z in zeros)

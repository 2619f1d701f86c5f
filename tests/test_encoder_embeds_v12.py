"""v1.2 encoder numerics against the reference pipeline on its tiny Qwen2.5-VL (embeds_v12.safetensors).

The reference model runs in float32; only its output buffers are bf16. Our float32 intermediates are
compared at 1e-5. The bf16 outputs are the float32 values rounded once, in the reference and here; where
our float32 value differs from the reference's by a few 1e-6 (the installed transformers' kernels against
4.55's), that single rounding can land one bf16 step apart, so those are compared at 1e-5 plus one bf16
step and the differing elements are counted.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from encoder_v12_support import build_fixture_qwen, embed_table, reference_image
from step1x.encoder import load_text_encoder
from step1x.encoder.tokens import IMAGE_PAD_ID
from step1x.geometry import resize_to_size_level

ATOL = 1e-5
CASES = ("case0", "case1", "case2")
MAX_BF16_FLIPS = 0.001
"""At most this share of bf16 output elements may sit one rounding step from the reference's."""


@pytest.fixture(scope="module")
def tensors(v12_dir):
    return load_file(v12_dir / "embeds_v12.safetensors")


@pytest.fixture(scope="module")
def cases(v12_dir):
    with safe_open(v12_dir / "embeds_v12.safetensors", "pt") as handle:
        meta = json.loads(handle.metadata()["cases"])
    record = json.loads((v12_dir / "tokens_v12.json").read_text(encoding="utf-8"))
    out = {}
    for prefix, case in meta.items():
        width, height = case["image_original_wh"]
        image = resize_to_size_level(reference_image(width, height), case["size_level"])
        out[prefix.rstrip(".")] = (image, record["instructions"][case["instruction_key"]]["instruction"])
    return out


@pytest.fixture(scope="module")
def encoder(v12_dir, qwen_tokenizer_dir, tmp_path_factory):
    folder = build_fixture_qwen(v12_dir, tmp_path_factory.mktemp("tiny_qwen25vl_v12"))
    return load_text_encoder(folder, tokenizer_dir=qwen_tokenizer_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def results(encoder, cases):
    out = {}
    for name, (image, instruction) in cases.items():
        inputs = encoder.inputs_v12(image, instruction)
        embeds, hidden = encoder.forward_v12(inputs)
        cond = encoder.encode_v12(image, [instruction])[0]
        out[name] = (inputs, embeds, hidden, cond)
    return out


def _close_in_bf16(got: torch.Tensor, expected: torch.Tensor) -> int:
    """Assert bf16 ``got`` is within the float32 tolerance plus one bf16 rounding step of ``expected``; return
    how many elements differ at all."""
    torch.testing.assert_close(got.float(), expected.float(), atol=ATOL, rtol=torch.finfo(torch.bfloat16).eps)
    return int((got != expected).sum())


def test_embedding_rule_is_rebuilt_exactly(v12_dir):
    rule = json.loads((v12_dir / "tiny_qwen25vl" / "embed_rule.json").read_text(encoding="utf-8"))
    table = embed_table(*rule["shape"])
    for row in rule["check_rows"]:
        assert table[int(row)].tolist() == rule["check_rows"][row]


@pytest.mark.parametrize("case", CASES)
def test_model_inputs_match(case, results, tensors):
    inputs = results[case][0]
    assert torch.equal(inputs.input_ids, tensors[f"{case}.in.input_ids"])
    assert torch.equal(inputs.position_ids, tensors[f"{case}.in.position_ids"])
    assert torch.equal(inputs.image_grid_thw, tensors[f"{case}.in.image_grid_thw"])
    assert torch.equal(inputs.pixel_values[:8], tensors[f"{case}.in.pixel_values_first8rows"])


@pytest.mark.parametrize("case", CASES)
def test_vision_features_and_hidden_states_match_in_float32(case, results, tensors):
    inputs, embeds, hidden, _ = results[case]
    pads = inputs.input_ids[0] == IMAGE_PAD_ID
    torch.testing.assert_close(embeds[pads], tensors[f"{case}.intermediate.image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, tensors[f"{case}.intermediate.hidden_states_last_fp32"][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_outputs_are_the_reference_buffers_without_padding(case, results, tensors):
    inputs, embeds, hidden, cond = results[case]
    n = inputs.length
    assert int(tensors[f"{case}.out.masks"].sum()) == n
    assert tensors[f"{case}.out.embs"][0, n:].abs().sum() == 0
    assert cond.llm_embedding.shape == (1, n, 48) and cond.llm_embedding.dtype == torch.bfloat16
    assert cond.text_embeds.shape == (1, n, 48) and cond.text_embeds.dtype == torch.bfloat16
    assert torch.equal(cond.mask, tensors[f"{case}.encode_prompt.mask"])
    assert torch.equal(cond.text_mask, tensors[f"{case}.out.text_masks"][:, :n])
    assert torch.equal(cond.txt_ids[0], tensors[f"{case}.encode_prompt.txt_ids"])
    assert cond.txt_ids.dtype == torch.float32


@pytest.mark.parametrize("case", CASES)
def test_bf16_outputs_are_one_rounding_of_the_float32_values(case, results, tensors):
    inputs, embeds, hidden, cond = results[case]
    start, stop = inputs.kept
    n = stop - start
    reference_fp32 = tensors[f"{case}.intermediate.hidden_states_last_fp32"][0, start:stop]
    assert torch.equal(tensors[f"{case}.out.embs"][0, :n], reference_fp32.to(torch.bfloat16))
    assert torch.equal(cond.llm_embedding[0], hidden[start:stop].to(torch.bfloat16))
    assert torch.equal(cond.text_embeds[0], embeds[start:stop].to(torch.bfloat16))
    flips = _close_in_bf16(cond.llm_embedding[0], tensors[f"{case}.out.embs"][0, :n])
    flips += _close_in_bf16(cond.text_embeds[0], tensors[f"{case}.out.text_embeds"][0, :n])
    assert flips <= MAX_BF16_FLIPS * 2 * cond.llm_embedding.numel()


@pytest.mark.parametrize("case", CASES)
def test_positions_masks_and_affine_match(case, results, tensors):
    inputs = results[case][0]
    n = inputs.length
    assert torch.equal(inputs.shifted_positions(), tensors[f"{case}.out.out_position_ids"][0, :n])
    assert torch.equal(inputs.vision_mask.long(), tensors[f"{case}.out.vision_masks"][0, :n])
    assert torch.equal(inputs.affine(), tensors[f"{case}.out.vision_affine_mats"][0])
    assert (inputs.image_grid_thw // 2).tolist() == tensors[f"{case}.out.vision_tokens_thw"].tolist()


def test_the_truncated_case_keeps_2048_tokens_and_part_of_the_image(results):
    inputs = results["case2"][0]
    assert inputs.length == 2048
    assert 0 < int(inputs.vision_mask.sum()) < inputs.num_image_tokens

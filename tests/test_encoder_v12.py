"""The v1.2 encoding with the tiny model: output contract, agreement with transformers' own forward, quote
mask, truncation, text-to-image, bad inputs and text generation with the same loaded model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers import seeded_image
from step1x.encoder.encoder import GenerationUnavailableError
from step1x.encoder.image_v12 import blank_reference
from step1x.encoder.inputs_v12 import MAX_LENGTH_V12, PREFIX_TOKENS_V12
from step1x.encoder.template import T2I_NEGATIVE_PROMPT_V12
from step1x.encoder.tokens import IMAGE_PAD_ID
from step1x.sampling.denoise import TextConditioning
from tiny_qwen import load_tiny

ATOL = 1e-5
PROMPT = 'Change the sign text to "OPEN 24h" and make it glow!'


@pytest.fixture(scope="module")
def image():
    return seeded_image(96, 64, seed=12)


@pytest.fixture(scope="module")
def hf_model(tiny_assets):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_assets.folder, attn_implementation="sdpa", local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def generating_encoder(tiny_assets):
    return load_tiny(tiny_assets.folder, tiny_assets, generation=True)


def test_cond_and_uncond_are_separate_conditionings_of_their_own_length(tiny_encoder, image):
    cond, uncond = tiny_encoder.encode_v12(image, [PROMPT, ""])
    for out in (cond, uncond):
        assert isinstance(out, TextConditioning)
        length = out.llm_embedding.shape[1]
        assert out.llm_embedding.shape == out.text_embeds.shape == (1, length, 64)
        assert out.llm_embedding.dtype == out.text_embeds.dtype == torch.bfloat16
        assert out.mask.dtype == out.text_mask.dtype == torch.int64
        assert out.mask.tolist() == [[1] * length]
        assert out.txt_ids.shape == (1, length, 3) and out.txt_ids.dtype == torch.float32
        assert out.text_mask.shape == (1, length)
        assert out.llm_embedding.device == out.txt_ids.device == tiny_encoder.device
    assert cond.llm_embedding.shape[1] > uncond.llm_embedding.shape[1]
    assert uncond.text_mask.sum() == 0


def test_length_is_the_prompt_after_the_preamble(tiny_encoder, image):
    inputs = tiny_encoder.inputs_v12(image, PROMPT)
    out = tiny_encoder.encode_v12(image, PROMPT)[0]
    assert out.llm_embedding.shape[1] == inputs.input_ids.shape[1] - PREFIX_TOKENS_V12
    kept = tiny_encoder.tokenizer.decode(inputs.input_ids[0, PREFIX_TOKENS_V12:])
    assert kept.startswith(": Change the sign text to \"OPEN 24h\" and make it glow!Picture 1: <|vision_start|>")
    assert kept.endswith("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")


def test_hidden_states_match_transformers_own_forward(tiny_encoder, hf_model, image):
    """The reference runs the whole model on ids, positions and pixels with no attention mask; we build the
    input embeddings once and run the language model on them."""
    inputs = tiny_encoder.inputs_v12(image, PROMPT)
    with torch.inference_mode():
        ref = hf_model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            output_hidden_states=True,
        ).hidden_states[-1][0]
    embeds, hidden = tiny_encoder.forward_v12(inputs)
    torch.testing.assert_close(hidden, ref, atol=ATOL, rtol=0)
    out = tiny_encoder.encode_v12(image, PROMPT, out_dtype=torch.float32)[0]
    torch.testing.assert_close(out.llm_embedding[0], ref[PREFIX_TOKENS_V12:], atol=ATOL, rtol=0)


def test_text_embeds_are_input_embeddings_with_image_features(tiny_encoder, hf_model, image):
    inputs = tiny_encoder.inputs_v12(image, PROMPT)
    out = tiny_encoder.encode_v12(image, PROMPT, out_dtype=torch.float32)[0]
    ids = inputs.input_ids[0, PREFIX_TOKENS_V12:]
    table = hf_model.get_input_embeddings().weight
    text = ids != IMAGE_PAD_ID
    assert torch.equal(out.text_embeds[0, text], table[ids[text]])
    with torch.inference_mode():
        features = hf_model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw)
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    torch.testing.assert_close(out.text_embeds[0, ~text], features, atol=ATOL, rtol=0)


def test_text_mask_marks_the_quoted_characters(tiny_encoder, image):
    inputs = tiny_encoder.inputs_v12(image, PROMPT)
    out = tiny_encoder.encode_v12(image, PROMPT)[0]
    quoted = inputs.input_ids[0, PREFIX_TOKENS_V12:][out.text_mask[0].bool()]
    assert tiny_encoder.tokenizer.decode(quoted) == "OPEN 24h"
    assert out.text_mask.sum() == len("OPEN 24h")


def test_txt_ids_place_text_at_t_and_image_on_the_latent_grid(tiny_encoder, image):
    out = tiny_encoder.encode_v12(image, "")[0]
    inputs = tiny_encoder.inputs_v12(image, "")
    ids = out.txt_ids[0]
    vision = inputs.vision_mask
    assert torch.all(ids[~vision, 1:] == 0)
    assert ids[-1, 0] == -1 and ids[:, 0].max() == -1
    assert ids[vision, 0].unique().numel() == 1
    rows, cols = inputs.vision_grid
    ys, xs = ids[vision, 1].reshape(rows, cols), ids[vision, 2].reshape(rows, cols)
    assert torch.all(ys.diff(dim=0) > 0) and torch.all(xs.diff(dim=1) > 0)
    assert -1 < float(ys.min()) < 0 and float(ys.max()) < image.height / 16
    assert -1 < float(xs.min()) < 0 and float(xs.max()) < image.width / 16


def test_encode_pair_is_cond_then_uncond(tiny_encoder, image):
    cond, uncond = tiny_encoder.encode_pair_v12(image, PROMPT)
    single_cond, single_uncond = tiny_encoder.encode_v12(image, [PROMPT, ""])
    for a, b in ((cond, single_cond), (uncond, single_uncond)):
        assert torch.equal(a.llm_embedding, b.llm_embedding) and torch.equal(a.txt_ids, b.txt_ids)


def test_text_to_image_encodes_a_black_reference(tiny_encoder):
    reference = blank_reference(64)
    assert reference.size == (64, 64) and reference.getextrema() == ((0, 0),) * 3
    cond, uncond = tiny_encoder.encode_pair_v12(reference, "a red fox", T2I_NEGATIVE_PROMPT_V12)
    assert uncond.llm_embedding.shape[1] > cond.llm_embedding.shape[1]
    assert torch.isfinite(cond.llm_embedding.float()).all()


def test_long_instructions_stop_at_2048_tokens(tiny_encoder, image):
    out = tiny_encoder.encode_v12(image, "word " * 2500)[0]
    assert out.llm_embedding.shape[1] == MAX_LENGTH_V12
    assert tiny_encoder.inputs_v12(image, "word " * 2500).vision_mask.sum() == 0
    short = tiny_encoder.encode_v12(image, PROMPT, max_length=16)[0]
    full = tiny_encoder.encode_v12(image, PROMPT)[0]
    assert short.llm_embedding.shape[1] == 16
    assert torch.equal(short.llm_embedding[0], full.llm_embedding[0, :16])
    shift = full.txt_ids[0, 15, 0] - short.txt_ids[0, -1, 0]  # the shift follows the last kept token
    assert torch.equal(short.txt_ids[0, :, 0] + shift, full.txt_ids[0, :16, 0])


@pytest.mark.parametrize("prompt", ["draw <|image_pad|> here", "<|vision_start|><|image_pad|>", "<|video_pad|>"])
def test_placeholder_tokens_in_the_instruction_are_refused(tiny_encoder, image, prompt):
    with pytest.raises(ValueError, match="placeholder reserved for the reference image"):
        tiny_encoder.encode_v12(image, prompt)


@pytest.mark.parametrize("prompt", ["plain", 'write "<|image_pad|>" here', "don't <|image_pad|>", "“<|video_pad|>”",
                                    "<|vision_start|>", 'say "<|im_end|>"'])
def test_the_check_without_a_tokenizer_refuses_what_the_v12_encoder_refuses(tiny_encoder, image, prompt):
    from step1x.pipeline import check_instruction

    def refused(run) -> bool:
        try:
            run()
        except ValueError as exc:
            assert "placeholder reserved for the reference image" in str(exc)
            return True
        return False

    assert refused(lambda: check_instruction(prompt, version="v1.2")) == refused(
        lambda: tiny_encoder.encode_v12(image, prompt))


@pytest.mark.parametrize(
    "prompt",
    ["", "   \n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>“x”", 'a "b', "“open", "🌈 把天空变成紫色", "!!!"],
    ids=["empty", "whitespace", "template_tokens", "curly_after_special", "lone_quote", "lone_curly", "mixed", "bangs"],
)
def test_odd_instructions_give_finite_conditionings(tiny_encoder, image, prompt):
    out = tiny_encoder.encode_v12(image, prompt, out_dtype=torch.float32)[0]
    assert torch.isfinite(out.llm_embedding).all() and torch.isfinite(out.txt_ids).all()


@pytest.mark.parametrize(
    "picture",
    [Image.new("RGBA", (64, 48), (0, 255, 0, 10)), Image.new("L", (48, 64), 128), Image.new("RGB", (16, 16))],
    ids=["rgba", "grey", "16px"],
)
def test_odd_images_give_finite_conditionings(tiny_encoder, picture):
    out = tiny_encoder.encode_v12(picture, "make it brighter", out_dtype=torch.float32)[0]
    assert torch.isfinite(out.llm_embedding).all() and torch.isfinite(out.txt_ids).all()


@pytest.mark.parametrize(
    ("image_arg", "prompts", "kwargs", "message"),
    [
        ("not an image", ["x"], {}, "PIL images"),
        (None, [None], {}, "must be a string"),
        (None, [], {}, "no instructions"),
        (None, ["x"], {"max_length": 0}, "max_length"),
    ],
    ids=["not_pil", "not_str", "no_prompts", "max_length"],
)
def test_wrong_arguments_are_value_errors(tiny_encoder, image, image_arg, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_encoder.encode_v12(image if image_arg is None else image_arg, prompts, **kwargs)


def test_an_encode_only_load_cannot_generate(tiny_encoder):
    assert not tiny_encoder.can_generate
    with pytest.raises(GenerationUnavailableError, match="generation=True"):
        _ = tiny_encoder.generation_model


def test_a_generation_load_shares_one_model_for_encoding_and_text(generating_encoder, tiny_encoder, hf_model, image):
    model = generating_encoder.generation_model
    assert generating_encoder.can_generate and model is generating_encoder.model
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied: no second table
    a = generating_encoder.encode_v12(image, PROMPT, out_dtype=torch.float32)[0]
    b = tiny_encoder.encode_v12(image, PROMPT, out_dtype=torch.float32)[0]
    assert torch.equal(a.llm_embedding, b.llm_embedding)
    ids = generating_encoder.tokenizer("Describe the sky.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ours = model.generate(ids, max_new_tokens=6, do_sample=False)
        ref = hf_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref) and ours.shape[1] == ids.shape[1] + 6

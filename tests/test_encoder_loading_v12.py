"""Loading the text encoder of a diffusers-layout model folder (Step1X-Edit-v1p2, Step1X-Edit-v1p1-diffusers):
``text_encoder/`` with sharded safetensors and index, the tokenizer in ``processor/``, ``tokenizer/`` or
``text_encoder/``; and keeping the language-model head for text generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import seeded_image
from step1x.encoder import CheckpointError, TokenizerError, load_text_encoder
from step1x.encoder.fp8 import Fp8Linear
from step1x.encoder.tiny import TINY_QWEN25_VL, build_tiny_diffusers_text_encoder
from tiny_qwen import load_tiny

PROMPT = 'Write "HI" on the wall'


@pytest.fixture(scope="module")
def image():
    return seeded_image(80, 48, seed=21)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny model folder in the released diffusers layout: text_encoder/ (untied LM head, 3 shards with an
    index), processor/ with the tokenizer, and the files that mark a diffusers pipeline."""
    root = build_tiny_diffusers_text_encoder(
        tmp_path_factory.mktemp("Step1X-Edit-tiny-diffusers"), qwen_tokenizer_dir, seed=5,
        tie_word_embeddings=False, max_shard_size="4MB",
    )
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Step1XEditPipelineV1P2"}), encoding="utf-8")
    (root / "transformer").mkdir()
    return root


@pytest.fixture(scope="module")
def reference(model_folder, image):
    encoder = load_text_encoder(model_folder, dtype=torch.float32)
    return encoder.encode_v12(image, PROMPT, out_dtype=torch.float32)[0]


def _encode(encoder, image):
    return encoder.encode_v12(image, PROMPT, out_dtype=torch.float32)[0]


def test_the_tiny_text_encoder_is_sharded_with_an_index(model_folder):
    text_encoder = model_folder / "text_encoder"
    shards = sorted(p.name for p in text_encoder.glob("*.safetensors"))
    assert len(shards) > 1 and (text_encoder / "model.safetensors.index.json").is_file()
    assert not (text_encoder / "tokenizer.json").exists() and (model_folder / "processor" / "vocab.json").is_file()


def test_model_folder_loads_its_text_encoder_and_processor_tokenizer(model_folder, reference):
    encoder = load_text_encoder(model_folder, dtype=torch.float32)
    assert encoder.source == model_folder / "text_encoder"
    assert encoder.hidden_size == TINY_QWEN25_VL["hidden_size"]
    assert not encoder.can_generate


def test_the_text_encoder_subfolder_loads_the_same(model_folder, image, reference):
    encoder = load_text_encoder(model_folder / "text_encoder", dtype=torch.float32)
    assert torch.equal(_encode(encoder, image).llm_embedding, reference.llm_embedding)


def _text_encoder_only(model_folder, root):
    """A copy of the model folder's text_encoder/ alone under ``root``."""
    shutil.copytree(model_folder / "text_encoder", root / "text_encoder")
    return root


@pytest.mark.parametrize("where", ["tokenizer", "text_encoder"])
def test_tokenizer_beside_or_inside_the_text_encoder(tmp_path, model_folder, image, reference, where):
    root = _text_encoder_only(model_folder, tmp_path)
    shutil.copytree(model_folder / "processor", root / where, dirs_exist_ok=True)
    encoder = load_text_encoder(root, dtype=torch.float32)
    assert torch.equal(_encode(encoder, image).llm_embedding, reference.llm_embedding)


def test_a_model_folder_without_text_encoder_names_it(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"without text_encoder/ \(found model_index.json, transformer/, vae/\)"):
        load_text_encoder(tmp_path)


def test_a_text_encoder_without_any_tokenizer_is_named(tmp_path, model_folder):
    _text_encoder_only(model_folder, tmp_path)
    with pytest.raises(TokenizerError, match="text_encoder/, processor/ or tokenizer/"):
        load_text_encoder(tmp_path)


def test_bf16_load_gives_bf16_conditioning(model_folder, image, reference):
    encoder = load_text_encoder(model_folder, dtype=torch.bfloat16)
    out = encoder.encode_v12(image, PROMPT)[0]
    assert out.llm_embedding.dtype == out.text_embeds.dtype == torch.bfloat16
    assert torch.equal(out.txt_ids, reference.txt_ids) and torch.equal(out.text_mask, reference.text_mask)
    cosine = torch.nn.functional.cosine_similarity(out.llm_embedding.float(), reference.llm_embedding, dim=-1)
    assert float(cosine.min()) > 0.98


def test_generation_keeps_the_stored_lm_head(model_folder, image, reference):
    encoder = load_text_encoder(model_folder, dtype=torch.float32, generation=True)
    model = encoder.generation_model
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    stored = {}
    for shard in (model_folder / "text_encoder").glob("*.safetensors"):
        stored.update(load_file(shard))
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    assert torch.equal(_encode(encoder, image).llm_embedding, reference.llm_embedding)


def test_generation_matches_transformers_from_pretrained(model_folder):
    from transformers import Qwen2_5_VLForConditionalGeneration

    encoder = load_text_encoder(model_folder, dtype=torch.float32, generation=True)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_folder / "text_encoder", local_files_only=True)
    ids = encoder.tokenizer("Is the sky purple?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ours = encoder.generation_model.generate(ids, max_new_tokens=5, do_sample=False)
        theirs = ref.eval().generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs)


def test_generation_needs_an_lm_head(tmp_path, model_folder):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    state = {}
    for shard in (model_folder / "text_encoder").glob("*.safetensors"):
        state.update(load_file(shard))
    del state["lm_head.weight"]
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_bytes((model_folder / "text_encoder" / "config.json").read_bytes())
    tokenizer = model_folder / "processor"
    with pytest.raises(CheckpointError, match="has no lm_head.weight"):
        load_text_encoder(folder, tokenizer_dir=tokenizer, dtype=torch.float32, generation=True)
    assert not load_text_encoder(folder, tokenizer_dir=tokenizer, dtype=torch.float32).can_generate


def test_fp8_single_file_can_generate_with_tied_embeddings(tiny_assets):
    encoder = load_text_encoder(tiny_assets.fp8_file, tokenizer_dir=tiny_assets.tokenizer_dir, config=TINY_QWEN25_VL,
                                dtype=torch.float32, keep_fp8=True, generation=True)
    model = encoder.generation_model
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = encoder.tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_quantize_fp8_equals_the_fp8_scaled_file_of_the_same_weights(tiny_assets, image):
    """Quantising the full-precision folder on load gives exactly ComfyUI's fp8_scaled layout (per-tensor
    max/448 scales on the block Linear weights) kept in fp8."""
    quantized = load_tiny(tiny_assets.folder, tiny_assets, quantize_fp8=True)
    from_file = load_tiny(tiny_assets.fp8_file, tiny_assets, keep_fp8=True)
    fp8 = [n for n, m in quantized.model.named_modules() if isinstance(m, Fp8Linear)]
    assert fp8 and fp8 == [n for n, m in from_file.model.named_modules() if isinstance(m, Fp8Linear)]
    assert torch.equal(_encode(quantized, image).llm_embedding, _encode(from_file, image).llm_embedding)


def test_quantize_fp8_keeps_a_generating_head_in_full_precision(model_folder, image, reference):
    encoder = load_text_encoder(model_folder, dtype=torch.float32, quantize_fp8=True, generation=True)
    model = encoder.generation_model
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    out = _encode(encoder, image)
    cosine = torch.nn.functional.cosine_similarity(out.llm_embedding, reference.llm_embedding, dim=-1)
    assert float(cosine.mean()) > 0.99

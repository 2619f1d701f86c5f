"""fp8 storage, LoRA and TeaCache on the tiny v1.2 DiT (diffusers layout), as on v1.1; and the encoder details
v1.2 reasoning relies on (the generation config, encoding with the LM head kept)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x.checkpoints.diffusers_write import dit_to_diffusers, transformer_config, write_component
from step1x.checkpoints.loading import load_dit
from step1x.checkpoints.lora import apply_lora, load_lora
from step1x.encoder import load_text_encoder
from step1x.models.ops import FP8_DTYPES
from step1x.sampling.denoise import TextConditioning, denoise, make_noise

RANK = 3


def v12_text(width: int, length: int, quoted: tuple[int, int], seed: int) -> TextConditioning:
    """A random v1.2 conditioning: negative fractional text positions, input embeddings, a quote mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, length, 3)
    ids[0, :, 0] = torch.arange(length, dtype=torch.float32) - length
    ids[0, :, 1:] = torch.rand(length, 2, generator=g) * 3 - 0.5
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, quoted[0]:quoted[1]] = 1
    return TextConditioning(torch.randn(1, length, width, generator=g), torch.ones(1, length, dtype=torch.long), ids,
                            torch.randn(1, length, width, generator=g), mask)


@pytest.fixture(scope="module")
def text():
    return v12_text(64, 19, (4, 9), seed=1), v12_text(64, 11, (0, 0), seed=2)


def sample(dit, text, steps=4, **kwargs):
    with torch.no_grad():
        return denoise(dit, make_noise((1, 16, 8, 8), 0), text[0], text[1], reference=make_noise((1, 16, 8, 8), 1),
                       steps=steps, compute_dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def dit(tiny_v12_folder):
    return load_dit(tiny_v12_folder, compute_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------ fp8


def test_fp8_storage_samples_the_v12_dit_close_to_full_precision(tiny_v12_folder, dit, text):
    fp8 = load_dit(tiny_v12_folder, compute_dtype=torch.float32, weight_dtype="fp8_e4m3fn")
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype in FP8_DTYPES
    assert fp8.text_token_mapping.weight.dtype == torch.float32
    full, low = sample(dit, text), sample(fp8, text)
    cosine = torch.nn.functional.cosine_similarity(full.flatten(), low.flatten(), dim=0)
    assert cosine > 0.98 and not torch.equal(full, low)


# ----------------------------------------------------------------------------------------------------- LoRA


def lora_pair(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, RANK, generator=g) * 0.1, torch.randn(RANK, inp, generator=g) * 0.1


def test_a_diffusers_lora_on_norm_out_changes_the_final_modulation_as_in_the_diffusers_model(tiny_v12_folder, dit,
                                                                                              tmp_path):
    """The diffusers ``norm_out.linear`` is (scale | shift), the official final modulation (shift | scale): a LoRA
    made on the diffusers model must land on the rows the loader swapped."""
    hidden = dit.params.hidden_size
    up, down = lora_pair(2 * hidden, hidden, seed=4)
    save_file({"transformer.norm_out.linear.lora_B.weight": up, "transformer.norm_out.linear.lora_A.weight": down,
               "transformer.norm_out.linear.alpha": torch.tensor(float(RANK))}, str(tmp_path / "norm.safetensors"))
    patched = load_dit(tiny_v12_folder, compute_dtype=torch.float32)
    patch = load_lora(tmp_path / "norm.safetensors", patched)
    assert patch.layouts == ("diffusers",) and patch.targets == ["final_layer.adaLN_modulation.1.weight"]
    apply_lora(patched, patch, strength=0.5)

    state = {k: v for f in sorted((tiny_v12_folder / "transformer").glob("*.safetensors")) for k, v in
             load_file(f).items()}
    state["norm_out.linear.weight"] = state["norm_out.linear.weight"] + 0.5 * (up @ down)
    config = json.loads((tiny_v12_folder / "transformer" / "config.json").read_text())
    expected = load_dit(write_component(tmp_path / "merged", state, config), compute_dtype=torch.float32)
    key = "final_layer.adaLN_modulation.1.weight"
    torch.testing.assert_close(patched.state_dict()[key], expected.state_dict()[key], rtol=0, atol=1e-6)


def test_a_lora_on_the_text_token_mapping_is_applied(dit, tmp_path, text):
    out, inp = dit.text_token_mapping.weight.shape
    up, down = lora_pair(out, inp, seed=5)
    save_file({"text_token_mapping.lora_up.weight": up, "text_token_mapping.lora_down.weight": down},
              str(tmp_path / "map.safetensors"))
    before = sample(dit, text, steps=2)
    handle = apply_lora(dit, load_lora(tmp_path / "map.safetensors", dit), strength=1.0, backup_device="cpu")
    try:
        assert not torch.equal(sample(dit, text, steps=2), before)
    finally:
        handle.remove()
    assert torch.equal(sample(dit, text, steps=2), before)


def test_the_diffusers_writer_is_the_loaders_inverse(dit, tmp_path):
    params = dit.params
    folder = write_component(tmp_path / "t", dit_to_diffusers(dit.state_dict(), params.hidden_size),
                             transformer_config(params), shards=3)
    again = load_dit(folder, compute_dtype=torch.float32)
    for key, value in dit.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------- TeaCache


def count_block_runs(dit):
    calls = []
    return calls, dit.double_blocks[0].register_forward_hook(lambda *a: calls.append(1))


def test_teacache_skips_blocks_on_v12_with_one_cache_per_call(dit, text):
    calls, handle = count_block_runs(dit)
    try:
        skipped = sample(dit, text, steps=6, teacache=1e9)
    finally:
        handle.remove()
    assert len(calls) == 4  # cond and uncond are separate calls, each computes its first and last step
    assert torch.isfinite(skipped).all()


def test_a_tiny_teacache_threshold_changes_nothing_on_v12(dit, text):
    torch.testing.assert_close(sample(dit, text, teacache=1e-12), sample(dit, text), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- encoder


def test_generation_loads_the_folders_generation_config(tiny_v12_folder):
    config = json.loads((tiny_v12_folder / "text_encoder" / "generation_config.json").read_text())
    encoder = load_text_encoder(tiny_v12_folder, dtype=torch.float32, generation=True)
    assert encoder.model.generation_config.eos_token_id == config["eos_token_id"]


def test_encoding_with_the_lm_head_kept_gives_the_same_embeddings(tiny_v12_folder):
    from helpers import seeded_image
    from step1x.geometry import resize_to_size_level

    image = resize_to_size_level(seeded_image(80, 48, seed=2), 64)
    plain = load_text_encoder(tiny_v12_folder, dtype=torch.float32)
    talking = load_text_encoder(tiny_v12_folder, dtype=torch.float32, generation=True)
    for encode in ("encode", "encode_v12"):
        a = getattr(plain, encode)(image, ['say "hi"'])
        b = getattr(talking, encode)(image, ['say "hi"'])
        a, b = (a[0] if isinstance(a, list) else a), (b[0] if isinstance(b, list) else b)
        torch.testing.assert_close(b.embedding if encode == "encode" else b.llm_embedding,
                                   a.embedding if encode == "encode" else a.llm_embedding, rtol=0, atol=0)


def test_v11_encoding_with_the_lm_head_runs_no_vocabulary_projection(tiny_v12_folder):
    from helpers import seeded_image

    encoder = load_text_encoder(tiny_v12_folder, dtype=torch.float32, generation=True)
    calls = []
    handle = encoder.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        encoder.encode(seeded_image(64, 64, seed=1), ["x"])
    finally:
        handle.remove()
    assert calls == []

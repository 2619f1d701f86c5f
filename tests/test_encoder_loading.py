"""Loading the encoder from an HF folder and from ComfyUI-layout single files (full and fp8_scaled)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import seeded_image
from step1x.encoder import CheckpointError, TokenizerError, load_text_encoder
from step1x.encoder import keys as K
from step1x.encoder.build import empty_model
from step1x.encoder.checkpoint import Checkpoint, Entry
from step1x.encoder.fp8 import Fp8Linear
from step1x.encoder.identify import infer_config
from step1x.encoder.spec import QWEN25_VL_7B, make_config
from step1x.encoder.tiny import TINY_QWEN25_VL
from tiny_qwen import load_tiny

PROMPT = 'Change the sign to "OPEN" and make it glow!'
FP8_COSINE_MIN = 0.97
FP8_COSINE_MEAN = 0.99
"""Per-token cosine similarity of fp8_scaled (per-tensor e4m3 scales) vs float32 embeddings of the tiny model:
worst token and mean over the kept tokens."""


@pytest.fixture(scope="module")
def image():
    return seeded_image(96, 64, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_encoder, image):
    return tiny_encoder.encode([image], [PROMPT], out_dtype=torch.float32)


def _encode(encoder, image):
    return encoder.encode([image], [PROMPT], out_dtype=torch.float32)


def _write(path, state):
    save_file(state, path)
    return path


def test_folder_load_has_no_meta_and_no_lm_head(tiny_encoder):
    model = tiny_encoder.model
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert isinstance(model.lm_head, torch.nn.Identity)
    assert tiny_encoder.hidden_size == 64
    assert tiny_encoder.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_a_config_json_without_the_default_valued_fields_loads(tiny_assets, image, reference, tmp_path):
    """transformers' save_pretrained (4.49 included) leaves out fields that equal its defaults."""
    folder = shutil.copytree(tiny_assets.folder, tmp_path / "sparse_config")
    config = json.loads((folder / "config.json").read_text())
    for key in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
        config["vision_config"].pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    out = _encode(load_tiny(folder, tiny_assets), image)
    torch.testing.assert_close(out.embedding, reference.embedding, atol=0, rtol=0)


def test_single_file_matches_folder(tiny_assets, image, reference):
    out = _encode(load_tiny(tiny_assets.single_file, tiny_assets), image)
    torch.testing.assert_close(out.embedding, reference.embedding, atol=0, rtol=0)
    assert torch.equal(out.mask, reference.mask)


def test_single_file_with_new_transformers_names(tiny_assets, image, reference, tmp_path):
    state = {K.for_model(k, new_layout=True): v for k, v in tiny_assets.state.items()}
    assert any(k.startswith("model.language_model.") for k in state)
    out = _encode(load_tiny(_write(tmp_path / "new_names.safetensors", state), tiny_assets), image)
    torch.testing.assert_close(out.embedding, reference.embedding, atol=0, rtol=0)


def test_single_file_with_wrapper_prefix(tiny_assets, image, reference, tmp_path):
    state = {"qwen25_7b.transformer." + k: v for k, v in tiny_assets.state.items()}
    out = _encode(load_tiny(_write(tmp_path / "prefixed.safetensors", state), tiny_assets), image)
    torch.testing.assert_close(out.embedding, reference.embedding, atol=0, rtol=0)


def test_fp8_scaled_equals_its_dequantised_weights(tiny_assets, image):
    fp8 = _encode(load_tiny(tiny_assets.fp8_file, tiny_assets), image)
    dequantized = _encode(load_tiny(tiny_assets.dequantized_file, tiny_assets), image)
    torch.testing.assert_close(fp8.embedding, dequantized.embedding, atol=0, rtol=0)


def test_fp8_scaled_is_close_to_full_precision(tiny_assets, image, reference):
    fp8 = _encode(load_tiny(tiny_assets.fp8_file, tiny_assets), image)
    n = int(reference.mask.sum())
    cosine = torch.nn.functional.cosine_similarity(fp8.embedding[0, :n], reference.embedding[0, :n], dim=-1)
    assert cosine.min().item() > FP8_COSINE_MIN
    assert cosine.mean().item() > FP8_COSINE_MEAN
    assert torch.equal(fp8.mask, reference.mask)


def test_keep_fp8_stores_float8_and_matches_dequantised(tiny_assets, image):
    kept = load_tiny(tiny_assets.fp8_file, tiny_assets, keep_fp8=True)
    layers = [m for m in kept.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 7 + 2 * 5 + 2
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    dequantized = _encode(load_tiny(tiny_assets.fp8_file, tiny_assets), image)
    torch.testing.assert_close(_encode(kept, image).embedding, dequantized.embedding, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_load(tiny_assets, image, reference, dtype):
    enc = load_tiny(tiny_assets.single_file, tiny_assets, dtype=dtype)
    assert all(p.dtype == dtype for p in enc.model.parameters())
    out = enc.encode([image], [PROMPT])
    assert out.embedding.dtype == torch.bfloat16
    torch.testing.assert_close(out.embedding.float(), reference.embedding, atol=0.1, rtol=0.05)


def test_recognises_the_7b_from_shapes_alone():
    model = empty_model(make_config(QWEN25_VL_7B))
    ckpt = Checkpoint(path="qwen_2.5_vl_7b.safetensors", kind="file")  # type: ignore[arg-type]
    for name, tensor in model.state_dict().items():
        ckpt.entries[K.canonical(name)] = Entry(None, name, tuple(tensor.shape), "BF16")  # type: ignore[arg-type]
    name, config = infer_config(ckpt)
    assert name == "Qwen2.5-VL-7B-Instruct"
    assert config == QWEN25_VL_7B


def test_tiny_file_without_config_is_named_as_not_the_7b(tiny_assets):
    expected = r"qwen_2\.5_vl_tiny\.safetensors.*not Qwen2\.5-VL-7B-Instruct.*hidden 64"
    with pytest.raises(CheckpointError, match=expected):
        load_text_encoder(tiny_assets.single_file, tokenizer_dir=tiny_assets.tokenizer_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: {"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(4, 4)}, "no Qwen2.5 language model"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("visual.")}, "text-only Qwen2.5"),
        (lambda s: {**s, "visual.blocks.0.mlp.fc1.weight": torch.zeros(4, 4)}, "Qwen2-VL model"),
        (lambda s: {k: v for k, v in s.items() if not k.endswith("q_proj.bias")}, "without attention biases"),
    ],
    ids=["t5", "text_only", "qwen2_vl", "llama_like"],
)
def test_other_models_get_a_clear_error(tiny_assets, tmp_path, edit, message):
    path = _write(tmp_path / "other.safetensors", edit(tiny_assets.state))
    with pytest.raises(CheckpointError, match=message) as err:
        load_text_encoder(path, tokenizer_dir=tiny_assets.tokenizer_dir)
    assert "other.safetensors" in str(err.value)


def test_config_that_does_not_fit_the_weights(tiny_assets):
    config = copy.deepcopy(TINY_QWEN25_VL)
    config["num_hidden_layers"] = 3
    with pytest.raises(CheckpointError, match=r"does not match the given config: layers 2 \(expected 3\)"):
        load_tiny(tiny_assets.single_file, tiny_assets, config=config)


def test_missing_tensor_is_named(tiny_assets, tmp_path):
    state = {k: v for k, v in tiny_assets.state.items() if k != "model.layers.1.post_attention_layernorm.weight"}
    with pytest.raises(CheckpointError, match="post_attention_layernorm"):
        load_tiny(_write(tmp_path / "incomplete.safetensors", state), tiny_assets)


def test_extra_tensors_are_ignored_with_a_warning(tiny_assets, tmp_path, image, reference):
    state = {**tiny_assets.state, "model.extra_head.weight": torch.zeros(2, 2)}
    with pytest.warns(UserWarning, match="model.extra_head.weight"):
        enc = load_tiny(_write(tmp_path / "extra.safetensors", state), tiny_assets)
    torch.testing.assert_close(_encode(enc, image).embedding, reference.embedding, atol=0, rtol=0)


def test_pickle_file_is_refused(tiny_assets, tmp_path):
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        load_text_encoder(pickle, tokenizer_dir=tiny_assets.tokenizer_dir)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        load_text_encoder(tmp_path / "nowhere.safetensors")


def test_damaged_file(tiny_assets, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(tiny_assets.single_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"damaged\.safetensors is not a safetensors file.*download it again"):
        load_tiny(damaged, tiny_assets)


def test_a_truncated_shard_of_a_folder_is_reported_as_truncated(tiny_assets, tmp_path):
    folder = shutil.copytree(tiny_assets.folder, tmp_path / "cut_folder")
    shard = next(folder.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated.*download it again"):
        load_text_encoder(folder)


def test_the_encoder_raises_the_same_checkpoint_error_as_the_dit_loader():
    import step1x

    assert CheckpointError is step1x.CheckpointError


def test_folder_without_config_is_refused(tiny_assets, tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    shutil.copy(tiny_assets.single_file, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_text_encoder(folder, tokenizer_dir=tiny_assets.tokenizer_dir)


def test_folder_of_only_pickle_files_is_refused(tmp_path):
    folder = tmp_path / "only_bin"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only pickle files"):
        load_text_encoder(folder)


def test_single_file_needs_a_tokenizer(tiny_assets):
    with pytest.raises(TokenizerError, match="tokenizer_dir"):
        load_text_encoder(tiny_assets.single_file, config=TINY_QWEN25_VL)


def test_wrong_tokenizer_folder(tiny_assets, tmp_path):
    with pytest.raises(TokenizerError, match="qwen25_tokenizer"):
        load_tiny(tiny_assets.single_file, tiny_assets, tokenizer_dir=tmp_path)


def test_fp8_is_not_a_compute_dtype(tiny_assets):
    with pytest.raises(ValueError, match="keep_fp8"):
        load_tiny(tiny_assets.fp8_file, tiny_assets, dtype=torch.float8_e4m3fn)

"""Diffusers-layout model folders (Step1X-Edit-v1p1-diffusers, Step1X-Edit-v1p2) load through ``load_dit`` and
``load_vae`` onto the official key names; the version comes from the weights; bad downloads get clear errors."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_folders import (
    diffusers_config,
    header_only_shards,
    merge_shards,
    to_diffusers,
    write_sharded,
)
from step1x.checkpoints.diffusers_files import COPY, STACK, SWAP
from step1x.checkpoints.diffusers_layout import dit_sources
from step1x.checkpoints.loading import inspect_dit, load_dit, load_vae
from step1x.checkpoints.lora import apply_lora, load_lora
from step1x.checkpoints.safetensors_file import CheckpointError
from step1x.models.configs import STEP1X_EDIT, TINY_DIT, with_version
from step1x.models.model import Step1XEdit
from step1x.models.ops import FP8_DTYPES

ATOL = 1e-5


def _official_forward(model, io):
    with torch.no_grad():
        return model(img=io["in.img"], img_ids=io["in.img_ids"], txt_ids=io["in.txt_ids"],
                     timesteps=io["in.timesteps"], llm_embedding=io["in.llm_embedding"], t_vec=io["in.t_vec"],
                     mask=io["in.mask"])


@pytest.fixture(scope="module")
def v11_folder(v12_dir):
    return v12_dir / "dit_v11_diffusers"


# ------------------------------------------------------------------------------------------- the key map


def test_the_diffusers_v11_folder_reproduces_the_official_v11_output(v11_folder, official_dir):
    model = load_dit(v11_folder, compute_dtype=torch.float32)
    assert model.version == "v1.1"
    io = load_file(official_dir / "dit_v11_io.safetensors")
    torch.testing.assert_close(_official_forward(model, io), io["out.pred"], atol=ATOL, rtol=0)


def test_the_diffusers_v11_folder_holds_exactly_the_official_v11_weights(v11_folder, official_dir):
    loaded = load_dit(v11_folder, compute_dtype=torch.float32).state_dict()
    official = load_file(official_dir / "dit_v11_weights.safetensors")
    assert loaded.keys() == official.keys()
    assert all(torch.equal(loaded[k], official[k]) for k in official)


def test_the_key_map_is_the_recorded_one(v11_folder):
    """Every official key comes from the diffusers tensors the reference's own converter wrote, combined as
    recorded there: copied, stacked by rows (in row order), or with its halves swapped."""
    recorded = json.loads((v11_folder / "key_map_v11.json").read_text())["official_to_diffusers"]
    kinds = {"copy": COPY, "rows": STACK, "swap_halves_dim0": SWAP}
    for key, entries in recorded.items():
        row = lambda e: int(m.group(1)) if (m := re.match(r"rows\[(\d+):", e["op"])) else 0  # noqa: E731
        entries = sorted(entries, key=row)
        names, op = dit_sources(key)
        assert names == tuple(e["diffusers_key"] for e in entries), key
        assert {kinds[re.match(r"[a-z_0-9]+", e["op"]).group(0)] for e in entries} == {op}, key


@pytest.mark.parametrize("where", ["model folder", "transformer folder", "index", "single file"])
def test_every_way_of_naming_the_model_loads_the_same_weights(v11_folder, tmp_path, where):
    path = {
        "model folder": v11_folder,
        "transformer folder": v11_folder / "transformer",
        "index": v11_folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json",
        "single file": None,
    }[where]
    if path is None:
        path = merge_shards(v11_folder / "transformer", tmp_path / "diffusion_pytorch_model.safetensors")
    reference = load_dit(v11_folder, compute_dtype=torch.float32).state_dict()
    loaded = load_dit(path, compute_dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert inspect_dit(path).version == "v1.1"


def test_the_version_comes_from_the_weights_not_the_folder_name(v11_folder, v12_models, tmp_path):
    misnamed_v11 = tmp_path / "Step1X-Edit-v1p2"
    shutil.copytree(v11_folder / "transformer", misnamed_v11 / "transformer")
    misnamed_v12 = tmp_path / "Step1X-Edit-v1p1-diffusers"
    shutil.copytree(v12_models / "transformer", misnamed_v12 / "transformer")
    assert inspect_dit(misnamed_v11).version == "v1.1"
    assert inspect_dit(misnamed_v12).version == "v1.2"


def test_the_v12_folder_is_v12_with_a_text_token_mapping_of_the_connector_widths(v12_models):
    info = inspect_dit(v12_models)
    assert info.version == "v1.2" and info.params == with_version(TINY_DIT, "v1.2")
    model = load_dit(v12_models, compute_dtype=torch.float32)
    assert tuple(model.text_token_mapping.weight.shape) == (32, 48)


def test_a_diffusers_v10_that_carries_its_scale_factor_runs_as_v10(official_dir, tmp_path):
    official = load_file(official_dir / "dit_v10_weights.safetensors")
    write_sharded(tmp_path / "v10" / "transformer", to_diffusers(official, TINY_DIT.hidden_size), shards=3,
                  config=diffusers_config(TINY_DIT))
    model = load_dit(tmp_path / "v10", compute_dtype=torch.float32)
    assert model.version == "v1.0"
    io = load_file(official_dir / "dit_v10_io.safetensors")
    torch.testing.assert_close(_official_forward(model, io), io["out.pred"], atol=ATOL, rtol=0)


def test_an_official_layout_v12_file_is_recognised_too(v12_models, tmp_path):
    state = load_dit(v12_models, compute_dtype=torch.float32).state_dict()
    save_file(state, str(tmp_path / "step1x-edit-v1p2.safetensors"))
    info = inspect_dit(tmp_path / "step1x-edit-v1p2.safetensors")
    assert info.version == "v1.2" and info.params == with_version(TINY_DIT, "v1.2")


# -------------------------------------------------------------------------------- storage, LoRA, real size


def test_fp8_storage_keeps_the_block_matrices_in_fp8_and_the_mapping_in_compute_precision(v12_models):
    model = load_dit(v12_models, compute_dtype=torch.float32, weight_dtype="fp8_e4m3fn")
    assert model.double_blocks[0].img_attn.qkv.weight.dtype in FP8_DTYPES
    assert model.single_blocks[0].linear1.weight.dtype in FP8_DTYPES
    assert model.text_token_mapping.weight.dtype == torch.float32


def test_a_diffusers_named_lora_patches_the_v12_model(v12_models, tmp_path):
    model = load_dit(v12_models, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    save_file({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up,
               "transformer.text_token_mapping.lora_A.weight": torch.randn(2, 48, generator=g),
               "transformer.text_token_mapping.lora_B.weight": torch.randn(32, 2, generator=g)},
              str(tmp_path / "lora.safetensors"))
    before = model.double_blocks[0].img_attn.qkv.weight.clone()
    mapping_before = model.text_token_mapping.weight.clone()
    apply_lora(model, load_lora(tmp_path / "lora.safetensors", model), 1.0)
    after = model.double_blocks[0].img_attn.qkv.weight
    torch.testing.assert_close(after[64:128] - before[64:128], up @ down, atol=1e-5, rtol=0)
    assert torch.equal(after[:64], before[:64]) and torch.equal(after[128:], before[128:])
    assert not torch.equal(model.text_token_mapping.weight, mapping_before)


def test_the_released_v12_transformer_folder_is_recognised_from_its_headers(tmp_path):
    """A real-size sharded v1.2 transformer folder (sparse shards: headers only) gives the released
    architecture: hidden 3072, 19 + 38 blocks, text_token_mapping 3584 -> 4096."""
    params = with_version(STEP1X_EDIT, "v1.2")
    with torch.device("meta"):
        model = Step1XEdit(params)
    shapes = {k: tuple(v.shape) for k, v in to_diffusers(model.state_dict(), params.hidden_size).items()}
    header_only_shards(tmp_path / "transformer", shapes, torch.bfloat16, shards=5, config=diffusers_config(params))
    info = inspect_dit(tmp_path)
    assert info.params == params and info.version == "v1.2" and info.stored_dtype == torch.bfloat16
    assert shapes["text_token_mapping.weight"] == (4096, 3584)


# ----------------------------------------------------------------------------------------------- the VAE


def test_the_diffusers_vae_folder_loads_as_the_flux_vae(v12_models, v12_dir):
    vae = load_vae(v12_models)
    assert vae.params.ch_mult == (1, 1, 2, 2) and vae.params.num_res_blocks == 1 and vae.params.norm_groups == 8
    io = load_file(v12_dir / "denoise_v12.safetensors")
    with torch.no_grad():
        mean, logvar = vae.moments(io["vae_in.image"])
        decoded = vae.decode_raw(io["out.vae_decode_in"])
    torch.testing.assert_close(mean, io["vae_encode.mean"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar, io["vae_encode.logvar"], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded, io["out.decoded"], atol=ATOL, rtol=0)


def test_the_vae_weight_file_alone_loads_with_the_config_beside_it(v12_models):
    vae = load_vae(v12_models / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae.params.norm_groups == 8


def _vae_copy(v12_models, tmp_path, **config_changes):
    folder = tmp_path / "vae"
    shutil.copytree(v12_models / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_a_vae_with_other_latent_factors_is_refused(v12_models, tmp_path):
    with pytest.raises(CheckpointError, match=r"scaling_factor 1\.5305 .* not the FLUX VAE's"):
        load_vae(_vae_copy(v12_models, tmp_path, scaling_factor=1.5305, shift_factor=0.0609))


def test_a_transformer_given_as_vae_is_refused(v12_models):
    with pytest.raises(CheckpointError, match="is a transformer, not a VAE"):
        load_vae(v12_models / "transformer")


# ------------------------------------------------------------------------------------------------ errors


def test_a_model_folder_without_transformer_is_refused_by_name(v12_models, tmp_path):
    folder = tmp_path / "Step1X-Edit-v1p2"
    shutil.copytree(v12_models / "vae", folder / "vae")
    shutil.copy(v12_models / "model_index.json", folder)
    with pytest.raises(CheckpointError, match=r"Step1X-Edit-v1p2 has no transformer/ folder .*model_index\.json"):
        load_dit(folder)


def test_a_truncated_shard_is_named(v11_folder, tmp_path):
    folder = shutil.copytree(v11_folder / "transformer", tmp_path / "transformer")
    shard = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model-00002-of-00002\.safetensors is truncated"):
        load_dit(tmp_path)


def test_an_index_naming_a_missing_shard_is_refused(v11_folder, tmp_path):
    folder = shutil.copytree(v11_folder / "transformer", tmp_path / "transformer")
    (folder / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names 2 shard\(s\) but 1 are not there "
                                              r"\(diffusion_pytorch_model-00001-of-00002\.safetensors\)"):
        load_dit(tmp_path)


def test_an_index_from_another_download_is_refused(v11_folder, tmp_path):
    folder = shutil.copytree(v11_folder / "transformer", tmp_path / "transformer")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["x_embedder.weight"] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="says x_embedder.weight is in diffusion_pytorch_model-00002"):
        load_dit(tmp_path)


def test_an_index_that_lacks_tensors_is_refused_with_their_names(v11_folder, tmp_path):
    folder = shutil.copytree(v11_folder / "transformer", tmp_path / "transformer")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["transformer_blocks.1.attn.to_v.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"does not match a Step1X-Edit v1.1 transformer: 1 missing "
                                              r"\(e.g. transformer_blocks.1.attn.to_v.weight\)"):
        load_dit(tmp_path)


def test_a_tensor_of_the_wrong_shape_is_refused_with_the_folder_name(v11_folder, tmp_path):
    state = load_file(merge_shards(v11_folder / "transformer", tmp_path / "merged.safetensors"))
    key = "transformer_blocks.0.attn.to_out.0.weight"
    state[key] = state[key][:-1]
    config = json.loads((v11_folder / "transformer" / "config.json").read_text())
    folder = write_sharded(tmp_path / "model" / "transformer", state, shards=2, config=config)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder))}: 1 tensors do not have the shape .* "
                                              r"double_blocks\.0\.img_attn\.proj\.weight is \[\d+, \d+\]"):
        load_dit(tmp_path / "model")


def test_the_flux_diffusers_transformer_is_refused_by_name(tmp_path):
    shapes = {"x_embedder.weight": (3072, 64), "context_embedder.weight": (3072, 4096),
              "time_text_embed.timestep_embedder.linear_1.weight": (3072, 256),
              "transformer_blocks.0.attn.to_q.weight": (3072, 3072)}
    header_only_shards(tmp_path / "FLUX.1-dev" / "transformer", shapes, torch.bfloat16, shards=2,
                       config={"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(CheckpointError, match="is a FLUX.1 transformer .* not Step1X-Edit"):
        load_dit(tmp_path / "FLUX.1-dev")


def test_the_qwen_image_transformer_is_refused_by_name(tmp_path):
    shapes = {"img_in.weight": (3072, 64), "txt_norm.weight": (3584,), "txt_in.weight": (3072, 3584),
              "transformer_blocks.0.attn.to_q.weight": (3072, 3072)}
    header_only_shards(tmp_path / "Qwen-Image" / "transformer", shapes, torch.bfloat16, shards=1,
                       config={"_class_name": "QwenImageTransformer2DModel"})
    with pytest.raises(CheckpointError, match="is a Qwen-Image transformer"):
        load_dit(tmp_path / "Qwen-Image")


def test_a_config_that_contradicts_the_weights_is_refused(v11_folder, tmp_path):
    folder = shutil.copytree(v11_folder / "transformer", tmp_path / "transformer")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_single_layers": 38}))
    with pytest.raises(CheckpointError, match="config.json says num_single_layers = 38 but the weights have 2"):
        load_dit(tmp_path)


def test_a_v12_config_without_mapping_weights_is_an_incomplete_download(v12_models, tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    state = load_file(v12_models / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("text_token_mapping.")},
              str(folder / "diffusion_pytorch_model.safetensors"))
    shutil.copy(v12_models / "transformer" / "config.json", folder)
    with pytest.raises(CheckpointError, match="enables text_token_mapping .* no text_token_mapping"):
        load_dit(tmp_path)


def test_a_folder_holding_an_official_file_asks_for_the_file(official_dir, tmp_path):
    shutil.copy(official_dir / "dit_v11_weights.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="official single-file layout .give the .safetensors file itself"):
        load_dit(tmp_path)


def test_a_folder_of_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="only pickle weights .* not loaded because they can run code"):
        load_dit(tmp_path)

"""Finding the model files in a folder: the official standalone layout, ComfyUI's folders, versions,
explicit paths, and a message that lists what is missing and where it goes."""

from __future__ import annotations

import pytest

from step1x.checkpoints.model_files import ModelFilesError, ModelPaths, resolve_models


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture()
def standalone(tmp_path):
    touch(tmp_path / "step1x-edit-i1258.safetensors")
    touch(tmp_path / "step1x-edit-v1p1-official.safetensors")
    touch(tmp_path / "vae.safetensors")
    touch(tmp_path / "Qwen2.5-VL-7B-Instruct" / "config.json")
    return tmp_path


def test_the_official_layout_is_found_and_v1_1_preferred(standalone):
    paths = resolve_models(standalone)
    assert paths.dit.name == "step1x-edit-v1p1-official.safetensors"
    assert paths.vae == standalone / "vae.safetensors"
    assert paths.mllm == standalone / "Qwen2.5-VL-7B-Instruct"
    assert paths.tokenizer is None


def test_the_version_picks_the_official_file(standalone):
    assert resolve_models(standalone, version="v1.0").dit.name == "step1x-edit-i1258.safetensors"


def test_comfyui_folders_and_the_bundled_tokenizer_are_used(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    dit = touch(models / "diffusion_models" / "step1x-edit-v1p1-official.safetensors")
    vae = touch(models / "vae" / "step1x-edit-vae.safetensors")
    touch(models / "vae" / "ae.safetensors")
    mllm = touch(models / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    tokenizer = touch(tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer" / "vocab.json").parent
    for folder in (tmp_path / "ComfyUI", models):
        assert resolve_models(folder) == ModelPaths(dit, vae, mllm, tokenizer)


def test_explicit_paths_override_the_folder(standalone, tmp_path):
    other = touch(tmp_path / "elsewhere" / "my-fp8.safetensors")
    assert resolve_models(standalone, dit=other).dit == other


def test_explicit_paths_alone_are_enough(standalone):
    paths = resolve_models(dit=standalone / "vae.safetensors", vae=standalone / "vae.safetensors",
                           mllm=standalone / "Qwen2.5-VL-7B-Instruct")
    assert paths.dit == standalone / "vae.safetensors"


def test_a_missing_explicit_path_is_named(tmp_path):
    with pytest.raises(ModelFilesError, match=r"--vae .*nope\.safetensors does not exist"):
        resolve_models(vae=tmp_path / "nope.safetensors")


def test_a_missing_piece_is_listed_with_the_expected_layout(standalone):
    (standalone / "vae.safetensors").unlink()
    with pytest.raises(ModelFilesError) as info:
        resolve_models(standalone)
    message = str(info.value)
    assert "missing the VAE (vae.safetensors)" in message
    assert "models/diffusion_models" in message and "python -m step1x download" in message


@pytest.fixture()
def unofficial(tmp_path):
    """The official layout with an fp8 conversion of the v1.1 DiT in place of the official file."""
    touch(tmp_path / "step1x-edit-v1p1-fp8.safetensors")
    touch(tmp_path / "vae.safetensors")
    touch(tmp_path / "Qwen2.5-VL-7B-Instruct" / "config.json")
    return tmp_path


def test_an_unofficial_dit_name_is_found_when_it_is_the_only_one(unofficial):
    assert resolve_models(unofficial).dit.name == "step1x-edit-v1p1-fp8.safetensors"


def test_several_unofficial_dit_files_ask_for_a_choice(unofficial):
    touch(unofficial / "step1x-edit-v1p0-fp8.safetensors")
    with pytest.raises(ModelFilesError, match="several Step1X-Edit DiT files found.*choose one with --dit"):
        resolve_models(unofficial)


def test_a_models_folder_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ModelFilesError, match="models folder not found"):
        resolve_models(tmp_path / "nope")


def test_the_tiny_model_set_uses_the_official_names(tiny_models):
    names = sorted(p.name for p in tiny_models.iterdir())
    assert names == ["Qwen2.5-VL-7B-Instruct", "step1x-edit-v1p1-official.safetensors", "vae.safetensors"]

"""Finding diffusers-layout model folders (Step1X-Edit-v1p2, Step1X-Edit-v1p1-diffusers) in the standalone and
ComfyUI layouts: the folder's vae/ and text_encoder/ go with its transformer, the newest version is preferred,
and a v1.2 folder without its own text encoder is refused with what to do. Versions are read from the weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from step1x.checkpoints.model_files import DIT_FILES, MLLM_FOLDER, VAE_FILE, ModelFilesError, resolve_models


def link(target: Path, name: Path) -> Path:
    name.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, name, target_is_directory=target.is_dir())
    return name


def partial_folder(source: Path, dst: Path, parts: tuple[str, ...]) -> Path:
    dst.mkdir(parents=True)
    for part in parts:
        link(source / part, dst / part)
    return dst


def test_a_model_folder_in_the_models_folder_gives_all_three(tiny_v12_folder, tmp_path):
    folder = link(tiny_v12_folder, tmp_path / "models" / "Step1X-Edit-v1p2")
    paths = resolve_models(tmp_path / "models")
    assert (paths.dit, paths.vae, paths.mllm, paths.tokenizer) == (folder, folder, folder, None)


def test_the_model_folder_itself_can_be_the_models_folder(tiny_v12_folder):
    paths = resolve_models(tiny_v12_folder)
    assert paths.dit == paths.vae == paths.mllm == tiny_v12_folder


def test_comfyui_keeps_the_whole_model_folder_in_diffusion_models(tiny_v12_folder, tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    folder = link(tiny_v12_folder, comfy / "models" / "diffusion_models" / "Step1X-Edit-v1p2")
    for root in (comfy, comfy / "models"):
        paths = resolve_models(root, version="v1.2")
        assert paths.dit == paths.vae == paths.mllm == folder


def test_the_newest_version_is_preferred_and_version_picks(tiny_v12_folder, tiny_models, tmp_path):
    models = tmp_path / "models"
    for name in (DIT_FILES["v1.1"], VAE_FILE, MLLM_FOLDER):
        link(tiny_models / name, models / name)
    folder = link(tiny_v12_folder, models / "Step1X-Edit-v1p2")
    assert resolve_models(models).dit == folder
    assert resolve_models(models, version="v1.2").mllm == folder
    v11 = resolve_models(models, version="v1.1")
    assert (v11.dit.name, v11.vae.name, v11.mllm.name) == (DIT_FILES["v1.1"], VAE_FILE, MLLM_FOLDER)


def test_a_v12_folder_without_its_text_encoder_is_refused_with_what_to_do(tiny_v12_folder, tiny_models, tmp_path):
    models = tmp_path / "models"
    link(tiny_models / MLLM_FOLDER, models / MLLM_FOLDER)
    partial_folder(tiny_v12_folder, models / "Step1X-Edit-v1p2", ("transformer", "vae"))
    with pytest.raises(ModelFilesError, match=r"v1.2 model folder without text_encoder/.*download --model v1.2"):
        resolve_models(models)


def test_a_v12_text_encoder_kept_in_comfyuis_text_encoders_folder_is_found(tiny_v12_folder, tmp_path):
    models = tmp_path / "models"
    dit = partial_folder(tiny_v12_folder, models / "diffusion_models" / "Step1X-Edit-v1p2", ("transformer", "vae"))
    encoder = partial_folder(tiny_v12_folder, models / "text_encoders" / "Step1X-Edit-v1p2",
                             ("text_encoder", "processor"))
    paths = resolve_models(models)
    assert (paths.dit, paths.vae, paths.mllm) == (dit, dit, encoder)


def test_a_v11_diffusers_folder_without_text_encoder_uses_the_stock_qwen(tiny_v11_diffusers_folder, tiny_models,
                                                                          tmp_path):
    models = tmp_path / "models"
    qwen = link(tiny_models / MLLM_FOLDER, models / MLLM_FOLDER)
    folder = partial_folder(tiny_v11_diffusers_folder, models / "Step1X-Edit-v1p1-diffusers", ("transformer", "vae"))
    paths = resolve_models(models)
    assert (paths.dit, paths.vae, paths.mllm) == (folder, folder, qwen)


def test_a_model_folder_given_as_the_dit_brings_its_vae_and_text_encoder(tiny_v12_folder):
    for given in (tiny_v12_folder, tiny_v12_folder / "transformer"):
        paths = resolve_models(dit=given)
        assert (paths.dit, paths.vae, paths.mllm) == (given, tiny_v12_folder, tiny_v12_folder)


def test_an_explicit_mllm_wins_over_the_folders_text_encoder(tiny_v12_folder, tmp_path):
    other = link(tiny_v12_folder / "text_encoder", tmp_path / "my_text_encoder")
    assert resolve_models(tiny_v12_folder, mllm=other).mllm == other


def test_two_folders_of_the_same_version_ask_for_a_choice(tiny_v12_folder, tmp_path):
    link(tiny_v12_folder, tmp_path / "models" / "a")
    link(tiny_v12_folder, tmp_path / "models" / "b")
    with pytest.raises(ModelFilesError, match="several Step1X-Edit v1.2 model folders.*--dit"):
        resolve_models(tmp_path / "models")


def test_asking_for_v12_where_there_is_none_says_where_it_goes(tiny_models, tmp_path):
    with pytest.raises(ModelFilesError, match=r"Step1X-Edit-v1p2/ \(transformer/, vae/, text_encoder/"):
        resolve_models(tiny_models, version="v1.2")

"""``step1x edit`` with diffusers-layout model folders: v1.2 plain, with --think/--reflect (scripted replies, and
one real reply of the tiny text encoder), v1.1-diffusers; and the bad inputs, each refused before any model loads
(exit 2) with what to do."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import step1x.pipeline_v12 as pipeline_v12
from helpers import seeded_image
from step1x import edit_command
from step1x.cli import main
from step1x.reasoning.scripted import EXAMPLE_SCRIPT, ScriptedGenerator

FAST = ["--steps", "2", "--size-level", "64", "--device", "cpu", "--dtype", "fp32", "-q"]


def edit(*args: str) -> int:
    return main(["edit", *args, *FAST])


@pytest.fixture()
def photo(tmp_path) -> Path:
    seeded_image(80, 48, seed=5).save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


@pytest.fixture()
def scripted(monkeypatch):
    """The model's replies come from EXAMPLE_SCRIPT instead of the tiny text encoder."""
    script = ScriptedGenerator(EXAMPLE_SCRIPT)
    monkeypatch.setattr(pipeline_v12, "qwen_generate", lambda *args, **kwargs: script)
    return script


def copy_folder(source: Path, dst: Path, parts=("transformer", "vae", "text_encoder", "processor")) -> Path:
    dst.mkdir(parents=True)
    for part in parts:
        os.symlink(source / part, dst / part, target_is_directory=True)
    return dst


def test_a_plain_v12_edit_from_the_model_folder(tiny_v12_folder, photo, tmp_path, capsys):
    assert edit(str(photo), "-p", 'write "HI" on the wall', "-o", str(tmp_path / "out"),
                "--models", str(tiny_v12_folder)) == 0
    assert "loaded Step1X-Edit v1.2" in capsys.readouterr().err
    with Image.open(tmp_path / "out" / "photo.png") as result:
        assert result.size == (80, 48)


def test_think_and_reflect_write_the_best_try_and_with_save_tries_every_try(tiny_v12_folder, photo, tmp_path,
                                                                           scripted, capsys):
    out = tmp_path / "out"
    assert edit(str(photo), "-p", "make the sky purple", "-o", str(out), "--models", str(tiny_v12_folder),
                "--think", "--reflect", "--max-tries", "3", "--save-tries") == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "photo_reasoning.txt", "photo_try1.png",
                                                      "photo_try2.png"]
    assert Image.open(out / "photo.png").tobytes() == Image.open(out / "photo_try2.png").tobytes()
    text = (out / "photo_reasoning.txt").read_text(encoding="utf-8")
    assert "Try 2: edited the output of try 1" in text and "Best: try 2 of 2." in text
    assert "2 tries, best try 2, last verdict success" in capsys.readouterr().err
    assert len(scripted.calls) == 11


def test_think_alone_runs_on_the_tiny_text_encoder(tiny_v12_folder, photo, tmp_path, capsys):
    assert edit(str(photo), "-p", "make the sky purple", "-o", str(tmp_path / "out"),
                "--models", str(tiny_v12_folder), "--think") == 0
    assert "1 try" in capsys.readouterr().err
    assert (tmp_path / "out" / "photo.png").is_file()


def test_the_v12_text_encoder_can_be_kept_in_fp8(tiny_v12_folder, photo, tmp_path):
    assert edit(str(photo), "-p", "make it blue", "-o", str(tmp_path / "out"), "--models", str(tiny_v12_folder),
                "--mllm-fp8") == 0


def test_a_v11_diffusers_folder_edits(tiny_v11_diffusers_folder, photo, tmp_path, capsys):
    assert edit(str(photo), "-p", "make it blue", "-o", str(tmp_path / "out"),
                "--models", str(tiny_v11_diffusers_folder)) == 0
    assert "loaded Step1X-Edit v1.1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bad inputs


def refused(capsys, *args: str) -> str:
    assert edit(*args) == 2
    err = capsys.readouterr().err
    return err


def test_thinking_with_a_v11_dit_is_refused(tiny_models, photo, tmp_path, capsys):
    err = refused(capsys, str(photo), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models), "--think")
    assert "--think: thinking and reflection are Step1X-Edit v1.2 features, but the DiT is v1.1" in err
    assert not (tmp_path / "out").exists()


def test_reflection_with_max_tries_0_is_refused(tiny_v12_folder, photo, tmp_path, capsys):
    err = refused(capsys, str(photo), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_v12_folder),
                  "--reflect", "--max-tries", "0")
    assert "--max-tries 0: max_tries must be at least 1" in err


def test_reasoning_with_text_to_image_is_refused(tiny_v12_folder, tmp_path, capsys):
    err = refused(capsys, "--t2i", "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_v12_folder),
                  "--reflect")
    assert "do not apply to --t2i" in err


def test_a_v12_folder_without_text_encoder_is_refused(tiny_v12_folder, photo, tmp_path, capsys):
    folder = copy_folder(tiny_v12_folder, tmp_path / "Step1X-Edit-v1p2", ("transformer", "vae"))
    err = refused(capsys, str(photo), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(folder))
    assert "v1.2 model folder without text_encoder/" in err and "download --model v1.2" in err


def test_a_truncated_shard_is_named(tiny_v12_folder, photo, tmp_path, capsys):
    folder = copy_folder(tiny_v12_folder, tmp_path / "Step1X-Edit-v1p2", ("vae", "text_encoder", "processor"))
    shutil.copytree(tiny_v12_folder / "transformer", folder / "transformer")
    shard = sorted((folder / "transformer").glob("*-00002-of-00002.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    err = refused(capsys, str(photo), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(folder))
    assert shard.name in err and "truncated" in err


def test_an_index_naming_a_missing_shard_is_refused(tiny_v12_folder, photo, tmp_path, capsys):
    folder = copy_folder(tiny_v12_folder, tmp_path / "Step1X-Edit-v1p2", ("vae", "text_encoder", "processor"))
    shutil.copytree(tiny_v12_folder / "transformer", folder / "transformer")
    missing = sorted((folder / "transformer").glob("*-00001-of-00002.safetensors"))[0]
    missing.unlink()
    err = refused(capsys, str(photo), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(folder))
    assert missing.name in err and "incomplete" in err


@pytest.fixture()
def no_loading(monkeypatch):
    monkeypatch.setattr(edit_command.Step1XPipeline, "from_files",
                        lambda *args, **kwargs: pytest.fail("the models were loaded"))


def test_a_quoted_placeholder_stops_a_v12_run_before_loading(tiny_v12_folder, photo, tmp_path, capsys, no_loading):
    """v1.2 cuts special tokens out before it looks at quotes, so quoting does not make a placeholder text."""
    err = refused(capsys, str(photo), "-p", 'write "<|image_pad|>" on it', "-o", str(tmp_path / "out"),
                  "--models", str(tiny_v12_folder))
    assert "contains <|image_pad|>" in err and "even in quotes" in err
    assert not (tmp_path / "out").exists()


def test_a_truncated_vae_in_the_model_folder_stops_the_run_before_loading(tiny_v12_folder, photo, tmp_path, capsys,
                                                                         no_loading):
    folder = copy_folder(tiny_v12_folder, tmp_path / "Step1X-Edit-v1p2", ("transformer", "text_encoder", "processor"))
    shutil.copytree(tiny_v12_folder / "vae", folder / "vae")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    err = refused(capsys, str(photo), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(folder))
    assert "diffusion_pytorch_model.safetensors is truncated" in err
    assert not (tmp_path / "out").exists()


def test_an_instruction_over_2048_tokens_runs_as_the_reference_and_says_what_was_cut(tiny_v12_folder, photo,
                                                                                   tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert edit(str(photo), "-p", "purple " * 2100, "-o", str(tmp_path / "out"), "--models",
                    str(tiny_v12_folder)) == 0
    assert any("the DiT gets the first 2048" in r.getMessage() for r in caplog.records)

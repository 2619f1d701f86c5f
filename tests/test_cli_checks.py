"""``step1x edit``: every input that can be checked is checked before any model loads (exit 2, nothing left behind),
each failure is reported once, and the command line reads as a command line (flags in messages, defaults in
--help, the edit form without the word ``edit``)."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import seeded_image
from step1x import batch, edit_command
from step1x.cli import main

FAST = ["--steps", "2", "--size-level", "64", "--device", "cpu", "--dtype", "fp32", "-q"]


def edit(*args: str) -> int:
    return main(["edit", *args, *FAST])


class Loaded(Exception):
    """Raised in place of loading the models."""


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the run at the point where the models would load."""

    def refuse(*args, **kwargs):
        raise Loaded("the models were loaded")

    monkeypatch.setattr(edit_command.Step1XPipeline, "from_files", refuse)


def run_to_load(*args: str) -> int:
    """Run, expecting the checks to stop it before the models load."""
    try:
        return edit(*args)
    except Loaded:
        pytest.fail("the models were loaded although the input could be checked without them")


# --------------------------------------------------------------------------------- found before loading


@pytest.mark.parametrize("name, make, message", [
    ("photo.png", lambda p: seeded_image(8, 8).save(p), r"image is 8x8 pixels; Step1X-Edit needs at least 16x16"),
    ("photo.png", lambda p: seeded_image(480, 16).save(p),
     r"at size_level 64 its short side falls below 16 pixels\. Use size_level 83 or more"),
    ("photo.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n truncated"), r"cannot read image .*photo\.png"),
    ("scan.tif", lambda p: Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(p),
     r"scan\.tif: the image holds 1024 NaN or infinite pixel value\(s\)"),
], ids=["too-small", "size-level", "unreadable", "nan-pixels"])
def test_an_image_that_cannot_be_edited_stops_the_run_before_loading(tiny_models, tmp_path, capsys, no_loading,
                                                                      name, make, message):
    make(tmp_path / name)
    rc = run_to_load(str(tmp_path / name), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models))
    err = capsys.readouterr().err
    assert rc == 2
    assert len(re.findall(message, err)) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_typed_image_placeholder_stops_the_run_before_loading(tiny_models, tmp_path, capsys, no_loading):
    seeded_image(32, 32).save(tmp_path / "a.png")
    rc = run_to_load(str(tmp_path / "a.png"), "-p", "put <|image_pad|> here", "-o", str(tmp_path / "out"),
                     "--models", str(tiny_models))
    assert rc == 2
    assert "contains <|image_pad|>, a placeholder reserved for the reference image" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["vae", "mllm", "tokenizer"])
def test_a_wrong_model_file_stops_the_run_and_leaves_no_output_folder(tiny_models, tmp_path, capsys, no_loading, role):
    seeded_image(32, 32).save(tmp_path / "a.png")
    wrong = {"vae": ["--vae", str(tiny_models / "step1x-edit-v1p1-official.safetensors")],
             "mllm": ["--mllm", str(tiny_models / "vae.safetensors")],
             "tokenizer": ["--tokenizer", str(tmp_path)]}[role]
    rc = run_to_load(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "new" / "out"),
                     "--models", str(tiny_models), *wrong)
    err = capsys.readouterr().err
    assert rc == 2
    assert not (tmp_path / "new").exists()
    if role == "tokenizer":
        assert "--tokenizer" in err and "tokenizer_dir" not in err


def test_a_load_that_fails_after_the_checks_leaves_no_output_folder(tiny_models, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("vae.safetensors: tensor data is truncated")

    monkeypatch.setattr(edit_command.Step1XPipeline, "from_files", broken)
    seeded_image(32, 32).save(tmp_path / "a.png")
    rc = edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models))
    assert rc == 2 and "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skip_existing_with_every_output_present_loads_no_model(tiny_models, tmp_path, capsys, no_loading):
    for name in ("a.png", "b.png"):
        seeded_image(32, 32).save(tmp_path / name)
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / name).write_bytes(b"done before")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": "x", "b.png": "y"}))
    rc = run_to_load("--input-dir", str(tmp_path), "--prompts", str(prompts), "-o", str(tmp_path / "out"),
                     "--models", str(tiny_models), "--skip-existing", "--overwrite")
    assert rc == 0
    assert "skipped 2 (output exists)" in capsys.readouterr().out


def test_a_size_level_that_upscales_many_times_warns_before_loading(tiny_models, tmp_path, capsys, no_loading):
    seeded_image(32, 24).save(tmp_path / "a.png")
    with pytest.raises(Loaded):
        main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
              "--size-level", "2048", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "warning: a.png: size_level 2048 upscales the 32x24 image" in err and "Press Ctrl-C to stop" in err


def test_an_empty_instruction_warns_and_runs(tiny_models, tmp_path, capsys):
    seeded_image(32, 32).save(tmp_path / "a.png")
    assert edit(str(tmp_path / "a.png"), "-p", "", "-o", str(tmp_path / "out"), "--models", str(tiny_models)) == 0
    assert "warning: a.png: the instruction is empty" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_a_seed_outside_0_to_2_64_is_refused(tmp_path, capsys, seed):
    assert edit("--t2i", "-p", "x", "-o", str(tmp_path / "out"), "--seed", seed) == 2
    assert "the seed must be a whole number from 0 to 18446744073709551615" in capsys.readouterr().err


def test_a_text_to_image_size_error_names_the_flags_not_the_resize(tmp_path, capsys):
    assert edit("--t2i", "-p", "x", "--width", "1000", "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "--width and --height" in err and "size_level" not in err


# ----------------------------------------------------------------------------------------- reported once


def test_an_image_that_fails_during_the_run_is_reported_once(tiny_models, tmp_path, capsys, monkeypatch):
    real = edit_command.Step1XPipeline.edit

    def fail_on_dark(pipe, image, prompt, *args, **kwargs):
        if prompt == "dark":
            raise RuntimeError("the sampler broke on this one")
        return real(pipe, image, prompt, *args, **kwargs)

    monkeypatch.setattr(edit_command.Step1XPipeline, "edit", fail_on_dark)
    for name in ("a.png", "b.png"):
        seeded_image(32, 32).save(tmp_path / name)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": "light", "b.png": "dark"}))
    rc = edit("--input-dir", str(tmp_path), "--prompts", str(prompts), "-o", str(tmp_path / "out"),
              "--models", str(tiny_models))
    out = capsys.readouterr()
    assert rc == 1
    assert (out.out + out.err).count("the sampler broke on this one") == 1
    assert "failed b.png: RuntimeError: the sampler broke on this one" in out.out


def test_an_unreadable_image_in_a_batch_is_left_out_before_loading_and_reported_once(tiny_models, tmp_path, capsys):
    seeded_image(32, 32).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": "x", "b.png": "y"}))
    rc = edit("--input-dir", str(tmp_path), "--prompts", str(prompts), "-o", str(tmp_path / "out"),
              "--models", str(tiny_models))
    out = capsys.readouterr()
    assert rc == 1
    assert (out.out + out.err).count("cannot read image") == 1
    assert "1 of 2 images cannot be edited and are left out" in out.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_a_full_disk_names_the_file_and_what_to_do(tiny_models, tmp_path, capsys, monkeypatch):
    def full(image, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "save_atomic", full)
    seeded_image(32, 32).save(tmp_path / "a.png")
    rc = edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models))
    out = capsys.readouterr()
    assert rc == 1
    assert f"no space left to write {tmp_path / 'out' / 'a.png'} (No space left on device); free some space" in out.out
    assert (out.out + out.err).count("No space left on device") == 1


# ---------------------------------------------------------------------------------------- the command line


def test_the_edit_form_works_without_the_word_edit(tiny_models, tmp_path):
    seeded_image(32, 32).save(tmp_path / "photo.png")
    rc = main([str(tmp_path / "photo.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
               *FAST])
    assert rc == 0 and (tmp_path / "out" / "photo.png").is_file()


def test_edit_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split("sampling:")[1].split())
    assert done.value.code == 0
    for option, default in [("--steps STEPS", 28), ("--cfg CFG", 6.0), ("--seed SEED", 42),
                            ("--size-level SIZE_LEVEL", 512), ("--renorm-threshold RENORM_THRESHOLD", 0.93),
                            ("--strength STRENGTH", 1.0)]:
        after = text[text.index(option):]
        assert after[after.index("(default: "):].startswith(f"(default: {default})"), option


def test_the_top_level_help_says_edit_is_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Without a command, the arguments are those of 'edit'" in " ".join(capsys.readouterr().out.split())


def test_the_selftest_names_the_tokenizer_flag(tmp_path, capsys):
    assert main(["selftest", "--tokenizer", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "--tokenizer" in out and "tokenizer_dir" not in out


# ------------------------------------------------------------------------------------------- --init-image


def test_an_init_image_starts_the_edit(tiny_models, tmp_path):
    seeded_image(32, 32, seed=1).save(tmp_path / "a.png")
    seeded_image(48, 40, seed=2).save(tmp_path / "start.png")
    common = [str(tmp_path / "a.png"), "-p", "x", "--models", str(tiny_models), "--strength", "0.5"]
    assert edit(*common, "-o", str(tmp_path / "plain")) == 0
    assert edit(*common, "-o", str(tmp_path / "init"), "--init-image", str(tmp_path / "start.png")) == 0
    with Image.open(tmp_path / "plain" / "a.png") as plain, Image.open(tmp_path / "init" / "a.png") as init:
        assert not np.array_equal(np.asarray(plain), np.asarray(init))


def test_a_missing_init_image_stops_the_run_before_loading(tiny_models, tmp_path, capsys, no_loading):
    seeded_image(32, 32).save(tmp_path / "a.png")
    rc = run_to_load(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
                     "--strength", "0.5", "--init-image", str(Path(tmp_path) / "gone.png"))
    assert rc == 2 and "image file not found" in capsys.readouterr().err

"""``step1x edit`` end to end on tiny model files: single image, folder batch with bad entries,
text-to-image, and every input problem caught before models load, with nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import seeded_image
from step1x.cli import main

FAST = ["--steps", "2", "--size-level", "64", "--device", "cpu", "--dtype", "fp32", "-q"]


def edit(*args: str) -> int:
    return main(["edit", *args, *FAST])


def write_inputs(folder: Path, prompts: dict[str, str], sizes: dict[str, tuple[int, int]]) -> Path:
    """Write the images named in ``sizes`` into ``folder`` and ``prompts`` beside it; returns the JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        seeded_image(*size, seed=i).save(folder / name)
    path = folder.parent / "prompts.json"
    path.write_text(json.dumps(prompts), encoding="utf-8")
    return path


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith("."))


def test_one_image_is_edited_and_restored_to_its_size(tiny_models, tmp_path):
    seeded_image(80, 48).save(tmp_path / "cat.png")
    rc = edit(str(tmp_path / "cat.png"), "-p", "make the cat blue", "-o", str(tmp_path / "out"),
              "--models", str(tiny_models))
    assert rc == 0
    with Image.open(tmp_path / "out" / "cat.png") as result:
        assert result.size == (80, 48)


def test_a_bad_image_in_a_batch_fails_alone_and_the_exit_code_says_so(tiny_models, tmp_path, capsys):
    inputs = tmp_path / "in"
    prompts = write_inputs(inputs, {"a.png": "add a hat", "broken.png": "x", "b.jpg": "make it night",
                                    "gone.png": "y"}, {"a.png": (64, 64), "b.jpg": (48, 80)})
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rc = edit("--input-dir", str(inputs), "--prompts", str(prompts), "-o", str(tmp_path / "out"),
              "--models", str(tiny_models))
    out = capsys.readouterr()
    assert rc == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.jpg"]
    assert "done 2, failed 2" in out.out
    assert "failed broken.png: cannot read image" in out.out
    assert "failed gone.png: image file not found" in out.out
    assert "peak memory: CPU peak RSS" in out.out
    assert leftovers(tmp_path / "out") == []


def test_text_to_image_writes_one_file_per_prompt(tiny_models, tmp_path):
    prompts = tmp_path / "t2i.json"
    prompts.write_text(json.dumps({"fox": "a red fox", "sub/owl.webp": "an owl"}))
    rc = edit("--t2i", "--prompts", str(prompts), "--width", "64", "--height", "48", "-o", str(tmp_path / "out"),
              "--models", str(tiny_models))
    assert rc == 0
    with Image.open(tmp_path / "out" / "fox.png") as fox, Image.open(tmp_path / "out" / "sub" / "owl.webp") as owl:
        assert fox.size == owl.size == (64, 48)


def test_existing_outputs_can_be_skipped(tiny_models, tmp_path, capsys):
    seeded_image(64, 64).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"keep me")
    rc = edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
              "--skip-existing")
    assert rc == 0
    assert (tmp_path / "out" / "a.png").read_bytes() == b"keep me"
    assert "skipped 1" in capsys.readouterr().out


def test_output_folder_equal_to_the_input_folder_is_refused(tiny_models, tmp_path, capsys):
    prompts = write_inputs(tmp_path / "in", {"a.png": "x"}, {"a.png": (32, 32)})
    before = (tmp_path / "in" / "a.png").read_bytes()
    rc = edit("--input-dir", str(tmp_path / "in"), "--prompts", str(prompts), "-o", str(tmp_path / "in"),
              "--models", str(tiny_models))
    assert rc == 2
    assert "is the input folder" in capsys.readouterr().err
    assert (tmp_path / "in" / "a.png").read_bytes() == before


def test_writing_over_the_single_input_image_is_refused(tiny_models, tmp_path, capsys):
    seeded_image(32, 32).save(tmp_path / "a.png")
    assert edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path), "--models", str(tiny_models)) == 2
    assert "would overwrite the input image" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ('["a.png", "make it red"]', "holds a JSON list; it must be an object"),
    ('{"a.png": 3}', "every instruction must be a string"),
    ("{'a.png': 'x'}", "is not valid JSON"),
    ("{}", "is an empty object"),
])
def test_a_prompts_file_of_the_wrong_shape_is_explained(tmp_path, capsys, content, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "p.json").write_text(content)
    assert edit("--input-dir", str(tmp_path / "in"), "--prompts", str(tmp_path / "p.json"), "-o",
                str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_created_is_reported(tiny_models, tmp_path, capsys):
    seeded_image(32, 32).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    assert edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(out), "--models", str(tiny_models)) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_a_name_that_leaves_the_input_folder_is_refused(tmp_path, capsys):
    prompts = write_inputs(tmp_path / "in", {"../escape.png": "x"}, {})
    assert edit("--input-dir", str(tmp_path / "in"), "--prompts", str(prompts), "-o", str(tmp_path / "out")) == 2
    assert "must be a file name inside the input folder" in capsys.readouterr().err


def test_a_models_folder_without_the_files_lists_what_goes_where(tmp_path, capsys):
    seeded_image(32, 32).save(tmp_path / "a.png")
    (tmp_path / "models").mkdir()
    assert edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models",
                str(tmp_path / "models")) == 2
    err = capsys.readouterr().err
    assert "missing the DiT" in err and "step1x-edit-v1p1-official.safetensors" in err
    assert "python -m step1x download" in err


def test_a_wrong_file_in_the_models_folder_is_named(tiny_models, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    dit = tiny_models / "step1x-edit-v1p1-official.safetensors"
    (models / dit.name).symlink_to(dit)
    (models / "vae.safetensors").symlink_to(dit)
    (models / "Qwen2.5-VL-7B-Instruct").symlink_to(tiny_models / "Qwen2.5-VL-7B-Instruct")
    seeded_image(32, 32).save(tmp_path / "a.png")
    assert edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(models)) == 2
    assert "is a Step1X-Edit DiT, not a VAE" in capsys.readouterr().err


def test_asking_for_a_version_the_file_is_not_fails(tiny_models, tmp_path, capsys):
    seeded_image(32, 32).save(tmp_path / "a.png")
    rc = edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
              "--dit", str(tiny_models / "step1x-edit-v1p1-official.safetensors"), "--version", "v1.0")
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "is Step1X-Edit v1.1, but version v1.0 was asked for" in capsys.readouterr().err


def test_a_run_without_an_image_or_prompts_is_refused(tmp_path, capsys):
    assert edit("-o", str(tmp_path / "out")) == 2
    assert "nothing to edit" in capsys.readouterr().err


def test_a_text_to_image_size_that_is_not_a_multiple_of_16_is_refused(tmp_path, capsys):
    assert edit("--t2i", "--width", "100", "-p", "x", "-o", str(tmp_path / "out")) == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_teacache_runs_end_to_end(tiny_models, tmp_path):
    seeded_image(64, 64).save(tmp_path / "a.png")
    assert edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
                "--teacache", "0.2") == 0
    assert (tmp_path / "out" / "a.png").exists()


def test_a_negative_teacache_threshold_is_refused(tmp_path, capsys):
    seeded_image(64, 64).save(tmp_path / "a.png")
    assert edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--teacache", "-1") == 2
    assert "teacache threshold" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--steps", "0", "steps must be at least 1, got 0; 28 is the official setting"),
    ("--cfg", "nan", "cfg is nan; set a finite number"),
    ("--renorm-threshold", "1.5", "renorm_threshold must be within [0, 1], got 1.5"),
])
def test_sampling_settings_are_checked_as_the_sampler_node_checks_them(tmp_path, capsys, option, value, message):
    seeded_image(64, 64).save(tmp_path / "a.png")
    assert main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), option, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_uninstalled_attention_backend_stops_the_run_before_any_model_loads(tiny_models, tmp_path, capsys):
    from importlib.util import find_spec

    if find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    seeded_image(64, 64).save(tmp_path / "a.png")
    rc = edit(str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
              "--attention", "flash")
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "'flash' needs the package 'flash_attn'" in err and "pip install flash-attn" in err and "loaded" not in err


def test_a_device_that_does_not_exist_stops_the_run_before_any_model_loads(tiny_models, tmp_path, capsys):
    seeded_image(64, 64).save(tmp_path / "a.png")
    rc = main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
               "--device", "cuda:99", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "device cuda:99" in err and "loaded" not in err

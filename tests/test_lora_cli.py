"""``--lora FILE[:STRENGTH]`` for ``step1x edit`` and ``Step1XPipeline(loras=...)`` on tiny model files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import seeded_image
from step1x.checkpoints.lora import linear_shapes
from step1x.checkpoints.model_files import resolve_models
from step1x.cli import main
from step1x.edit_command import UsageError, parse_lora
from step1x.pipeline import Step1XPipeline

FAST = ["--steps", "2", "--size-level", "64", "--device", "cpu", "--dtype", "fp32", "-q"]
LAYER = "double_blocks.0.img_mlp.0"


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> Path:
    from step1x.checkpoints.loading import inspect_dit
    from step1x.models.model import Step1XEdit

    with torch.device("meta"):
        out, inp = linear_shapes(Step1XEdit(inspect_dit(resolve_models(tiny_models).dit).params))[LAYER]
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("loras") / "tiny_lora.safetensors"
    name = "lora_unet_" + LAYER.replace(".", "_")
    save_file({f"{name}.lora_up.weight": torch.randn(out, 2, generator=g),
               f"{name}.lora_down.weight": torch.randn(2, inp, generator=g)}, str(path))
    return path


@pytest.mark.parametrize("value, expected", [
    ("hands.safetensors", ("hands.safetensors", 1.0)),
    ("hands.safetensors:0.8", ("hands.safetensors", 0.8)),
    ("dir/hands.safetensors:-1", ("dir/hands.safetensors", -1.0)),
    ("C:\\loras\\hands.safetensors", ("C:\\loras\\hands.safetensors", 1.0)),
    ("C:\\loras\\hands.safetensors:2", ("C:\\loras\\hands.safetensors", 2.0)),
])
def test_a_lora_argument_is_a_file_and_an_optional_strength(value, expected):
    path, strength = parse_lora(value)
    assert (str(path), strength) == (str(Path(expected[0])), expected[1])


def test_a_strength_that_is_not_finite_is_refused():
    with pytest.raises(UsageError, match="finite"):
        parse_lora("hands.safetensors:nan")


def test_the_pipeline_applies_its_loras_to_the_dit(tiny_models, lora):
    paths = resolve_models(tiny_models)
    kw = dict(device="cpu", compute_dtype=torch.float32)
    plain = Step1XPipeline.from_files(paths.dit, paths.vae, paths.mllm, tokenizer_dir=paths.tokenizer, **kw)
    with_lora = Step1XPipeline.from_files(paths.dit, paths.vae, paths.mllm, tokenizer_dir=paths.tokenizer,
                                          loras=[(lora, 0.5)], **kw)
    key = LAYER + ".weight"
    delta = with_lora.dit.state_dict()[key] - plain.dit.state_dict()[key]
    assert len(with_lora.loras) == 1 and delta.abs().max() > 0
    with_lora.loras[0].remove()
    torch.testing.assert_close(with_lora.dit.state_dict()[key], plain.dit.state_dict()[key], rtol=0, atol=1e-6)


def test_the_edit_command_runs_with_a_lora(tiny_models, lora, tmp_path):
    seeded_image(64, 48).save(tmp_path / "cat.png")
    rc = main(["edit", str(tmp_path / "cat.png"), "-p", "make it blue", "-o", str(tmp_path / "out"),
               "--models", str(tiny_models), "--lora", f"{lora}:0.7", *FAST])
    assert rc == 0 and (tmp_path / "out" / "cat.png").is_file()


def test_a_wrong_lora_is_named_before_any_model_loads_or_folder_is_made(tiny_models, tmp_path, capsys):
    save_file({"lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "sd15.safetensors"))
    seeded_image(64, 48).save(tmp_path / "cat.png")
    rc = main(["edit", str(tmp_path / "cat.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
               "--lora", str(tmp_path / "sd15.safetensors"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "--lora" in err and "sd15.safetensors is an SD1.x/SDXL LoRA" in err and "loaded" not in err


def test_a_missing_lora_file_is_named(tiny_models, tmp_path, capsys):
    seeded_image(64, 48).save(tmp_path / "cat.png")
    rc = main(["edit", str(tmp_path / "cat.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
               "--lora", str(tmp_path / "nowhere.safetensors:0.5"), *FAST])
    assert rc == 2 and "nowhere.safetensors" in capsys.readouterr().err

"""The speed settings outside the library: the DiT loader node's fp8_matmul and compile, the command line's
--fp8-matmul and --compile, and the pipeline arguments behind them."""

from __future__ import annotations

import pytest

from helpers import seeded_image
from node_support import lib, run_node
from step1x.cli import build_parser, main
from step1x.edit_command import pipeline_settings

FAST = ["--steps", "3", "--size-level", "64", "--dtype", "fp32", "--device", "cpu", "-q"]


def _args(*extra: str):
    return build_parser().parse_args(["edit", "a.png", "-p", "x", "-o", "out", *extra])


def test_the_flags_are_off_by_default_and_reach_the_pipeline():
    assert {k: pipeline_settings(_args())[k] for k in ("fp8_matmul", "compile")} == {"fp8_matmul": False,
                                                                                     "compile": False}
    settings = pipeline_settings(_args("--fp8-matmul", "--compile", "--weight-dtype", "fp8_e4m3fn"))
    assert settings["fp8_matmul"] and settings["compile"]


def test_the_node_widgets_default_off_and_follow_the_attention_widget(pack):
    types = pack.NODE_CLASS_MAPPINGS["Step1XEditDiTLoader"].INPUT_TYPES()
    assert list(types["required"]) == ["unet_name", "weight_dtype", "attention"]
    assert {name: spec[1]["default"] for name, spec in types["optional"].items()} == {"fp8_matmul": False,
                                                                                        "compile": False}


def _speed(pack):
    """The pack's own copies of the modules (the nodes import the library through the pack)."""
    return lib("models.fp8_matmul"), lib("models.compile")


def test_the_node_switches_an_fp8_model_to_fp8_matmuls(pack, model_names):
    (dit,) = run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="fp8_e4m3fn",
                      attention="sdpa", fp8_matmul=True)
    fp8, compiled = _speed(pack)
    assert fp8.uses_fp8_matmul(dit.model) and not compiled.is_compiled(dit.model)


def test_the_node_compiles_the_blocks_when_asked(pack, model_names):
    (dit,) = run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="default",
                      attention="sdpa", compile=True)
    fp8, compiled = _speed(pack)
    assert compiled.is_compiled(dit.model) and not fp8.uses_fp8_matmul(dit.model)


def test_the_node_refuses_fp8_matmul_for_full_precision_weights(pack, model_names):
    fp8, _ = _speed(pack)
    with pytest.raises(fp8.Fp8MatmulError, match="weight_dtype to fp8_e4m3fn"):
        run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="bf16", attention="sdpa",
                 fp8_matmul=True)


def test_the_command_line_refuses_fp8_matmul_without_fp8_weights_before_loading(tiny_models, tmp_path, capsys):
    seeded_image(64, 64).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(out), "--models", str(tiny_models),
                 "--fp8-matmul", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--fp8-matmul multiplies float8_e4m3fn block weights" in err and "--weight-dtype fp8_e4m3fn" in err
    assert not out.exists()


def test_an_edit_runs_with_fp8_matmuls(tiny_models, tmp_path):
    seeded_image(64, 64).save(tmp_path / "a.png")
    assert main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
                 "--fp8-matmul", "--weight-dtype", "fp8_e4m3fn", *FAST]) == 0
    assert (tmp_path / "out" / "a.png").exists()

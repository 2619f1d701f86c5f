"""``--regione`` on the command line and ``EditOptions.regione`` in the pipeline."""

from __future__ import annotations

import pytest

from helpers import seeded_image
from step1x.cli import build_parser, main
from step1x.edit_command import options_from
from step1x.pipeline import EditOptions
from step1x.sampling.regione_rules import RegionEConfig

FAST = ["--steps", "8", "--size-level", "64", "--dtype", "fp32", "--device", "cpu", "-q"]


def _args(*extra: str):
    return build_parser().parse_args(["edit", "a.png", "-p", "x", "-o", "out", *extra])


def test_the_flag_alone_takes_the_reference_settings():
    assert options_from(_args("--regione")).regione == RegionEConfig()
    assert options_from(_args()).regione is None


def test_the_flag_takes_a_threshold():
    assert options_from(_args("--regione", "0.8")).regione == RegionEConfig(threshold=0.8)


@pytest.mark.parametrize("extra,message", [
    (["--regione", "--teacache", "0.2"], "RegionE and TeaCache"),
    (["--regione", "2"], "cosine similarity within [-1, 1], got 2.0"),
])
def test_bad_combinations_are_refused(tmp_path, capsys, extra, message):
    seeded_image(64, 64).save(tmp_path / "a.png")
    assert main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), *extra, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_text_to_image_with_regione_is_refused(tmp_path, capsys):
    assert main(["edit", "--t2i", "-p", "x", "-o", str(tmp_path / "out"), "--regione", *FAST]) == 2
    assert "--regione speeds up edits of an input image" in capsys.readouterr().err


def test_regione_runs_end_to_end(tiny_models, tmp_path):
    seeded_image(64, 64).save(tmp_path / "a.png")
    assert main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"), "--models", str(tiny_models),
                 "--regione", *FAST]) == 0
    assert (tmp_path / "out" / "a.png").exists()


def test_edit_options_refuse_regione_with_teacache():
    with pytest.raises(ValueError, match="RegionE and TeaCache"):
        EditOptions(teacache=0.2, regione=RegionEConfig()).validate()

"""The reference sets a fresh clone tests against: stored outputs plus seeded weights rebuilt byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

import reference_sets as R

MIB = 1 << 20
FIXTURE_BUDGET = 20 * MIB
"""Every ComfyUI-Manager install downloads tests/, so the stored sets must stay small."""


STALE_ENTRIES = {"official/tokens.json"}
"""Manifest entries that describe an earlier version of the file the set ships: the official manifest lists a
1,371,186-byte tokens.json, the set holds the 1,057,547-byte one the token tests are written against."""


def _manifests(name: str) -> list[Path]:
    return sorted((R.STORED / name).glob("manifest*.json"))


@pytest.mark.parametrize("rel", list(R.recipe()["files"]))
def test_a_rebuilt_weight_file_is_the_file_the_reference_ran_on(rel, tmp_path):
    spec = R.recipe()["files"][rel]
    path = tmp_path / Path(rel).name
    save_file(R.build_weights(rel, spec), str(path), metadata=spec.get("metadata"))
    assert R.sha256(path) == R.expected_sha256(rel, spec)


def test_the_diffusers_shards_are_the_official_v11_dit_converted_by_the_key_map(tmp_path):
    folder, spec = next(iter(R.recipe()["converted"].items()))
    source = spec["source"]
    (tmp_path / source).parent.mkdir(parents=True)
    save_file(R.build_weights(source, R.recipe()["files"][source]), str(tmp_path / source))
    shards = R.convert(tmp_path, spec)
    assert len(shards) == 2
    for shard, state in shards.items():
        path = tmp_path / shard
        save_file(state, str(path), metadata=spec["metadata"])
        assert R.sha256(path) == R.expected_sha256(f"{folder}/{shard}", spec), shard


@pytest.mark.parametrize("name", R.SETS)
def test_a_set_folder_holds_every_file_its_manifests_list_with_their_sha256(name, reference_root):
    folder = R.assemble(reference_root, name)
    listed = 0
    for manifest in _manifests(name):
        for rel, entry in json.loads(manifest.read_text(encoding="utf-8"))["files"].items():
            if f"{name}/{rel}" in STALE_ENTRIES:
                assert (folder / rel).stat().st_size != entry["bytes"]
            elif "sha256" in entry:
                assert R.sha256(folder / rel) == entry["sha256"], f"{name}/{rel}"
                listed += 1
    assert listed >= 2
    assert {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} >= {
        Path(rel).relative_to(name) for rel in R.rebuilt_files(name)}


def test_the_sets_lie_side_by_side_as_the_generators_wrote_them(official_dir, v12_dir, regione_dir):
    shard = "diffusion_pytorch_model-00001-of-00002.safetensors"
    assert (v12_dir / "dit_v11_diffusers" / "transformer" / shard).is_file()
    assert (v12_dir / "tiny_qwen25vl" / "model.safetensors").is_file()
    assert (official_dir / "dit_v11_weights.safetensors").is_file()
    assert regione_dir.name == "regione" and (regione_dir / "regione_main.safetensors").is_file()


def test_the_environment_variable_points_a_set_elsewhere(tmp_path):
    assert R.reference_folder("v12", tmp_path / "unused", {"STEP1X_FIXTURES_V12": str(tmp_path)}) == tmp_path
    with pytest.raises(FileNotFoundError, match="STEP1X_FIXTURES=.*is not a folder; unset it"):
        R.reference_folder("official", tmp_path, {"STEP1X_FIXTURES": str(tmp_path / "nowhere")})


def test_no_rebuilt_weights_are_stored_in_the_repository():
    for name in R.SETS:
        for rel in R.rebuilt_files(name):
            assert not (R.STORED / rel).exists(), rel


def test_the_stored_sets_stay_under_20_mib():
    total = sum(p.stat().st_size for p in R.STORED.rglob("*") if p.is_file())
    assert total < FIXTURE_BUDGET, f"tests/fixtures holds {total / MIB:.1f} MiB"

"""``step1x download``: the plan and its paths, the disk-space check, resuming, and the offline message.
No test touches the network: the hub is a fake, and the real client is made to fail if ever called."""

from __future__ import annotations

from pathlib import Path

import pytest

from step1x import download as dl
from step1x.checkpoints.model_files import resolve_models
from step1x.cli import main

SIZES = {
    "stepfun-ai/Step1X-Edit": {"step1x-edit-i1258.safetensors": 11, "step1x-edit-v1p1-official.safetensors": 12,
                               "vae.safetensors": 5, "README.md": 1, "lora/x.safetensors": 3},
    "Qwen/Qwen2.5-VL-7B-Instruct": {"config.json": 2, "model-00001-of-00002.safetensors": 7,
                                    "model-00002-of-00002.safetensors": 6, "model.safetensors.index.json": 2,
                                    "merges.txt": 3, "vocab.json": 4, "tokenizer.json": 4, "README.md": 1,
                                    ".gitattributes": 1},
}


class FakeHub:
    """Serves files of the sizes above; ``fail_on`` makes one transfer break half way."""

    def __init__(self, fail_on: str | None = None):
        self.fetched: list[str] = []
        self.fail_on = fail_on

    def list_files(self, repo):
        return dict(SIZES[repo])

    def fetch(self, repo, filename, local_dir: Path) -> Path:
        path = local_dir / filename
        if filename == self.fail_on:
            (local_dir / (filename + ".incomplete")).write_bytes(b"x")
            raise ConnectionError("connection reset by peer")
        self.fetched.append(filename)
        path.write_bytes(b"x" * SIZES[repo][filename])
        return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach Hugging Face")

    monkeypatch.setattr(dl.HubClient, "list_files", refuse)
    monkeypatch.setattr(dl.HubClient, "fetch", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture()
def comfyui(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "models").mkdir(parents=True)
    (root / "comfy").mkdir()
    return root


def test_comfyui_plan_puts_each_file_in_its_folder(comfyui):
    plan = dl.plan_download(comfyui=comfyui)
    targets = {f.kind: f.target for f in plan.files}
    models = comfyui / "models"
    assert targets == {
        "dit": models / "diffusion_models" / "step1x-edit-v1p1-official.safetensors",
        "vae": models / "vae" / "step1x-edit-vae.safetensors",
        "mllm": models / "text_encoders" / "Qwen2.5-VL-7B-Instruct",
    }


def test_standalone_plan_uses_the_official_names_for_both_versions(tmp_path):
    plan = dl.plan_download(dest=tmp_path, versions=("v1.1", "v1.0"), mllm=False)
    assert [f.target.name for f in plan.files] == [
        "step1x-edit-v1p1-official.safetensors", "step1x-edit-i1258.safetensors", "vae.safetensors"]


def test_a_folder_that_is_not_comfyui_is_refused(tmp_path):
    with pytest.raises(dl.DownloadError, match="is not a ComfyUI folder"):
        dl.plan_download(comfyui=tmp_path)


def test_the_mllm_entry_becomes_the_files_the_editor_needs(tmp_path):
    plan = dl.resolve_sizes(dl.plan_download(dest=tmp_path), FakeHub())
    mllm = sorted(f.filename for f in plan.files if f.kind == "mllm")
    assert mllm == ["config.json", "merges.txt", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "vocab.json"]


class BigHub(FakeHub):
    def list_files(self, repo):
        return {name: size * 10**9 for name, size in SIZES[repo].items()}


def test_not_enough_disk_space_stops_before_any_transfer(tmp_path):
    hub = BigHub()
    message = r"needs 45\.0 GB but only 20\.0 GB is free\. Free 25\.0 GB more"
    with pytest.raises(dl.DownloadError, match=message) as info:
        dl.download(dl.plan_download(dest=tmp_path), hub, say=lambda _: None, free_bytes=lambda _: 20 * 10**9)
    assert str(tmp_path) in str(info.value)
    assert hub.fetched == []


def test_a_download_places_every_file_and_the_editor_finds_them(comfyui):
    hub = FakeHub()
    dl.download(dl.plan_download(comfyui=comfyui), hub, say=lambda _: None)
    models = comfyui / "models"
    assert (models / "vae" / "step1x-edit-vae.safetensors").stat().st_size == 5
    assert (models / "text_encoders" / "Qwen2.5-VL-7B-Instruct" / "vocab.json").is_file()
    assert not list(models.rglob(".step1x-download"))
    found = resolve_models(comfyui)
    assert found.dit == models / "diffusion_models" / "step1x-edit-v1p1-official.safetensors"
    assert found.mllm == models / "text_encoders" / "Qwen2.5-VL-7B-Instruct"


def test_a_second_run_fetches_only_what_is_missing(tmp_path):
    dl.download(dl.plan_download(dest=tmp_path, mllm=False), FakeHub(), say=lambda _: None)
    (tmp_path / "vae.safetensors").unlink()
    hub = FakeHub()
    dl.download(dl.plan_download(dest=tmp_path, mllm=False), hub, say=lambda _: None)
    assert hub.fetched == ["vae.safetensors"]


def test_a_broken_transfer_keeps_the_partial_file_for_resuming_and_no_target(tmp_path):
    with pytest.raises(dl.DownloadError, match="run the same command again to resume"):
        dl.download(dl.plan_download(dest=tmp_path, mllm=False), FakeHub(fail_on="vae.safetensors"),
                    say=lambda _: None)
    assert (tmp_path / "step1x-edit-v1p1-official.safetensors").is_file()
    assert not (tmp_path / "vae.safetensors").exists()
    assert (tmp_path / ".step1x-download" / "vae.safetensors.incomplete").is_file()


def test_offline_mode_prints_the_files_to_place_by_hand(comfyui, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--comfyui", str(comfyui)]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err
    assert "https://huggingface.co/stepfun-ai/Step1X-Edit/resolve/main/step1x-edit-v1p1-official.safetensors" in err
    assert str(comfyui / "models" / "diffusion_models" / "step1x-edit-v1p1-official.safetensors") in err
    assert str(comfyui / "models" / "vae" / "step1x-edit-vae.safetensors") in err
    assert "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct" in err
    assert str(comfyui / "models" / "text_encoders" / "Qwen2.5-VL-7B-Instruct") in err


def test_an_unreachable_hub_gives_the_same_manual_instructions(tmp_path, monkeypatch, capsys):
    def unreachable(self, repo):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(dl.HubClient, "list_files", unreachable)
    assert main(["download", "--dest", str(tmp_path), "--version", "v1.0"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Hugging Face (ConnectionError: Name or service not known)" in err
    assert str(tmp_path / "step1x-edit-i1258.safetensors") in err


def test_the_plan_flag_only_shows_where_files_go(tmp_path, capsys):
    assert main(["download", "--dest", str(tmp_path), "--plan"]) == 0
    assert "vae.safetensors" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_an_existing_comfyui_text_encoder_is_pointed_out(comfyui, capsys):
    (comfyui / "models" / "text_encoders").mkdir()
    (comfyui / "models" / "text_encoders" / "qwen_2.5_vl_7b.safetensors").write_bytes(b"")
    assert main(["download", "--comfyui", str(comfyui), "--plan"]) == 0
    assert "add --skip-mllm" in capsys.readouterr().out


def test_a_different_file_under_a_target_name_is_never_replaced(tmp_path):
    (tmp_path / "vae.safetensors").write_bytes(b"someone else's VAE")
    hub = FakeHub()
    with pytest.raises(dl.DownloadError, match=r"vae\.safetensors already exists but is not .*left untouched"):
        dl.download(dl.plan_download(dest=tmp_path, mllm=False), hub, say=lambda _: None)
    assert (tmp_path / "vae.safetensors").read_bytes() == b"someone else's VAE"
    assert hub.fetched == []

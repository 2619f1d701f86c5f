"""``step1x download --model v1.2`` / ``v1.1-diffusers``: a diffusers-layout model folder with only the files the
editor reads, into ComfyUI's diffusion_models or the standalone folder, resumable, after a disk check; offline it
says what to fetch by hand. The fake hub serves a real tiny model folder, so the editor loads what was fetched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step1x import download as dl
from step1x.checkpoints.model_files import resolve_models
from step1x.cli import main
from step1x.pipeline import EditOptions, Step1XPipeline
from step1x.selftest import test_image as gradient_image

EXTRA = {"README.md": 10, ".gitattributes": 3, "scheduler/scheduler_config.json": 2, "assets/teaser.png": 50,
         "text_encoder/pytorch_model.bin": 40}
"""Repository files the editor does not need."""


class FolderHub:
    """Serves the files of a local model folder (plus the EXTRA files) as a hub repository."""

    def __init__(self, folder: Path, fail_on: str | None = None):
        self.folder, self.fail_on = folder, fail_on
        self.fetched: list[str] = []

    def list_files(self, repo):
        files = {p.relative_to(self.folder).as_posix(): p.stat().st_size
                 for p in self.folder.rglob("*") if p.is_file()}
        return {**files, **EXTRA}

    def fetch(self, repo, filename, local_dir: Path) -> Path:
        path = local_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if filename == self.fail_on:
            (local_dir / (filename + ".incomplete")).write_bytes(b"x")
            raise ConnectionError("connection reset by peer")
        self.fetched.append(filename)
        path.write_bytes((self.folder / filename).read_bytes())
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


def quiet(_):
    pass


def test_v12_goes_into_diffusion_models_as_one_folder_and_the_editor_runs_it(tiny_v12_folder, comfyui):
    hub = FolderHub(tiny_v12_folder)
    plan = dl.download(dl.plan_download(comfyui=comfyui, versions=(), folders=("v1.2",)), hub, say=quiet)
    target = comfyui / "models" / "diffusion_models" / "Step1X-Edit-v1p2"
    assert {f.target for f in plan.files} == {target / name for name in hub.fetched}
    assert not set(hub.fetched) & set(EXTRA)
    assert sorted({name.split("/")[0] for name in hub.fetched}) == [
        "model_index.json", "processor", "text_encoder", "transformer", "vae"]
    assert not list(comfyui.rglob(".step1x-download"))
    paths = resolve_models(comfyui)
    assert paths.dit == paths.vae == paths.mllm == target
    pipe = Step1XPipeline.from_folder(comfyui, device="cpu", compute_dtype=torch.float32)
    assert pipe.version == "v1.2"
    assert pipe.edit(gradient_image(), "make it blue", EditOptions(steps=1, size_level=64)).size == (96, 64)


def test_standalone_puts_the_folder_under_its_name(tiny_v12_folder, tmp_path):
    plan = dl.plan_download(dest=tmp_path, versions=(), folders=("v1.2",))
    assert [(f.kind, f.repo, f.target) for f in plan.files] == [
        ("folder", "stepfun-ai/Step1X-Edit-v1p2", tmp_path / "Step1X-Edit-v1p2")]


def test_skip_mllm_leaves_out_the_stock_text_encoder_of_v11_diffusers(tiny_v11_diffusers_folder, tmp_path):
    hub = FolderHub(tiny_v11_diffusers_folder)
    dl.download(dl.plan_download(dest=tmp_path, versions=(), folders=("v1.1-diffusers",), mllm=False), hub,
                say=quiet)
    assert hub.fetched and not any(name.startswith("text_encoder/") for name in hub.fetched)
    assert (tmp_path / "Step1X-Edit-v1p1-diffusers" / "transformer").is_dir()


def test_skip_mllm_is_refused_for_v12_which_needs_its_own_text_encoder(tmp_path, capsys):
    assert main(["download", "--dest", str(tmp_path), "--model", "v1.2", "--skip-mllm"]) == 2
    assert "needs its own text encoder" in capsys.readouterr().err


def test_an_interrupted_folder_download_resumes(tiny_v12_folder, tmp_path):
    plan = dl.plan_download(dest=tmp_path, versions=(), folders=("v1.2",))
    broken = "vae/diffusion_pytorch_model.safetensors"
    with pytest.raises(dl.DownloadError, match="run the same command again to resume"):
        dl.download(plan, FolderHub(tiny_v12_folder, fail_on=broken), say=quiet)
    assert (tmp_path / ".step1x-download" / "Step1X-Edit-v1p2" / (broken + ".incomplete")).is_file()
    assert not (tmp_path / "Step1X-Edit-v1p2" / broken).exists()
    hub = FolderHub(tiny_v12_folder)
    dl.download(plan, hub, say=quiet)
    assert broken in hub.fetched and not any(name.startswith("transformer/") for name in hub.fetched)
    assert resolve_models(tmp_path).dit == tmp_path / "Step1X-Edit-v1p2"


def test_the_disk_is_checked_before_any_transfer(tiny_v12_folder, tmp_path):
    hub = FolderHub(tiny_v12_folder)
    with pytest.raises(dl.DownloadError, match="not enough disk space"):
        dl.download(dl.plan_download(dest=tmp_path, versions=(), folders=("v1.2",)), hub, say=quiet,
                    free_bytes=lambda _: 1000)
    assert hub.fetched == []


def test_offline_it_says_what_to_fetch_and_where(comfyui, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--comfyui", str(comfyui), "--model", "v1.2"]) == 1
    err = capsys.readouterr().err
    assert "https://huggingface.co/stepfun-ai/Step1X-Edit-v1p2" in err
    assert "transformer/, vae/, text_encoder/" in err and "about 41.7 GB" in err
    assert str(comfyui / "models" / "diffusion_models" / "Step1X-Edit-v1p2") in err


def test_the_plan_shows_the_folder(tmp_path, capsys):
    assert main(["download", "--dest", str(tmp_path), "--model", "v1.1-diffusers", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "stepfun-ai/Step1X-Edit-v1p1-diffusers/*" in out and str(tmp_path / "Step1X-Edit-v1p1-diffusers") in out
    assert list(tmp_path.iterdir()) == []


def test_model_and_version_are_one_choice(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["download", "--dest", str(tmp_path), "--model", "v1.2", "--version", "v1.1"])
    assert "not allowed with argument" in capsys.readouterr().err

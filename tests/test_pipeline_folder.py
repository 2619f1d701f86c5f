"""``Step1XPipeline.from_folder``: the models folder is resolved and loaded with the real loaders."""

from __future__ import annotations

import pytest
import torch

from helpers import seeded_image
from step1x.checkpoints.model_files import ModelFilesError
from step1x.pipeline import EditOptions, Step1XPipeline


def test_a_models_folder_loads_and_edits(tiny_models):
    pipe = Step1XPipeline.from_folder(tiny_models, device="cpu", compute_dtype=torch.float32)
    assert pipe.version == "v1.1"
    assert pipe.devices == [torch.device("cpu")]
    result = pipe.edit(seeded_image(48, 32), "make it red", EditOptions(steps=1, size_level=32))
    assert result.size == (48, 32)


def test_a_version_the_folder_does_not_have_is_refused(tiny_models):
    with pytest.raises(ModelFilesError, match=r"missing the DiT \(step1x-edit-i1258\.safetensors\)"):
        Step1XPipeline.from_folder(tiny_models, version="v1.0")


def test_an_mllm_on_a_device_of_its_own_is_not_moved_by_offload(tiny_models, monkeypatch):
    pipe = Step1XPipeline.from_folder(tiny_models, device="cpu", mllm_device="cpu", offload=True,
                                      compute_dtype=torch.float32)
    assert pipe.offload and not pipe.offload_encoder
    moves = []
    monkeypatch.setattr(type(pipe.encoder), "to", lambda self, device: moves.append(device) or self)
    pipe.edit(seeded_image(32, 32), "x", EditOptions(steps=1, size_level=32))
    assert moves == []


def test_with_offload_the_mllm_visits_the_compute_device_and_goes_back(tiny_models, monkeypatch):
    pipe = Step1XPipeline.from_folder(tiny_models, device="cpu", offload=True, compute_dtype=torch.float32)
    moves = []
    monkeypatch.setattr(type(pipe.encoder), "to", lambda self, device: moves.append(str(device)) or self)
    pipe.edit(seeded_image(32, 32), "x", EditOptions(steps=1, size_level=32))
    assert moves == ["cpu", "cpu"]

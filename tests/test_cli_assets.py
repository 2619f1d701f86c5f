"""Shared assets for the command-line tests: one tiny model set per test session and small images.

The tiny models are built under the official file names with the run-time stand-in tokenizer, so these
tests need no downloaded files. Import the fixtures from here (``from test_cli_assets import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step1x.tiny import build_tiny_models
from step1x.tiny_tokenizer import write_tiny_tokenizer

_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A models folder in the standalone layout (v1.1 DiT, VAE, Qwen2.5-VL folder), built once."""
    if "models" not in _BUILT:
        root = tmp_path_factory.mktemp("tiny-models")
        build_tiny_models(root / "models", write_tiny_tokenizer(root / "tokenizer"))
        _BUILT["models"] = root / "models"
    return _BUILT["models"]


def seeded_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def write_inputs(folder: Path, prompts: dict[str, str], sizes: dict[str, tuple[int, int]]) -> Path:
    """Write the images named in ``sizes`` into ``folder`` and ``prompts`` beside it; returns the JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        seeded_image(*size, seed=i).save(folder / name)
    path = folder.parent / "prompts.json"
    path.write_text(json.dumps(prompts), encoding="utf-8")
    return path


def test_the_tiny_model_set_uses_the_official_names(tiny_models):
    names = sorted(p.name for p in tiny_models.iterdir())
    assert names == ["Qwen2.5-VL-7B-Instruct", "step1x-edit-v1p1-official.safetensors", "vae.safetensors"]

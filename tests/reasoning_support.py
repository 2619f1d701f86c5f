"""Helpers for the v1.2 thinking/reflection tests: the reference's fixture images, the tiny Qwen2.5-VL of the
v1.2 fixtures (as ``encoder_v12_support`` rebuilds it) and a scripted stand-in for the model."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from step1x.reasoning.scripted import ScriptedGenerator

SOURCE_SEED = 7936
EDITED_SEED = 99


def fixture_image(width: int, height: int, seed: int) -> Image.Image:
    """The v1.2 fixtures' ``seeded_image``: seeded uint8 noise at 1/16 size, bilinear upscaled."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(small, mode="RGB").resize((width, height), Image.Resampling.BILINEAR)


def rgb_sha16(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()[:16]


def thinker_record(v12_dir: Path) -> dict:
    return json.loads((v12_dir / "thinker_v12.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=2)
def qwen_tokenizer(folder: Path):
    """The Qwen2.5 tokenizer, loaded once per test session (loading it from vocab/merges files is slow)."""
    from step1x.encoder.tokens import load_tokenizer

    return load_tokenizer(folder)


def load_fixture_qwen(v12_dir: Path, folder: Path, tokenizer_dir: Path):
    """The v1.2 fixtures' tiny ``Qwen2_5_VLForConditionalGeneration`` (rebuilt by ``encoder_v12_support``), loaded
    by the pack's own loader with its language-model head (tied to the embedding) in float32."""
    from encoder_v12_support import build_fixture_qwen
    from step1x.encoder import load_text_encoder

    encoder = load_text_encoder(build_fixture_qwen(v12_dir, folder), tokenizer_dir=tokenizer_dir,
                                dtype=torch.float32, generation=True)
    model = encoder.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model


ScriptedModel = ScriptedGenerator
"""The library's scripted stand-in for the model (the fixture scenarios were recorded with that reply rule)."""

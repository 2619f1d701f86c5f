"""Helpers for the v1.2 thinking/reflection tests: the reference's fixture images, the tiny Qwen2.5-VL of the
v1.2 fixtures and a scripted stand-in for the model."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from step1x.reasoning.messages import ChatCall

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


def embedding_from_rule(rule: dict) -> torch.Tensor:
    """The tiny model's 151936×48 embedding, rebuilt from ``embed_rule.json``'s integer hash."""
    rows, cols = rule["shape"]
    i = torch.arange(rows, dtype=torch.int64)[:, None]
    j = torch.arange(cols, dtype=torch.int64)[None, :]
    mask = 2**32 - 1
    a = (i * 40503 + j * 9973 + 12345) & mask
    h = ((a * 2654435761) & mask) >> 20
    weight = (h - 2048).to(torch.float32) / 2048
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    assert digest == rule["sha256_fp32"], "embed_rule.json's formula no longer matches its checksum"
    return weight


def load_fixture_qwen(folder: Path):
    """The v1.2 fixtures' tiny ``Qwen2_5_VLForConditionalGeneration`` in float32, lm_head tied to the embedding."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from step1x.encoder.spec import make_config

    config = make_config(json.loads((folder / "config.json").read_text(encoding="utf-8")), folder / "config.json")
    rule = json.loads((folder / "embed_rule.json").read_text(encoding="utf-8"))
    with torch.random.fork_rng(devices=[]):
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = load_file(folder / "model.safetensors")
    state["model.language_model.embed_tokens.weight"] = embedding_from_rule(rule)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model.eval()


class ScriptedModel:
    """A ``GenerateFn`` that answers each call kind from a script: the n-th call of a kind gets that kind's
    n-th reply, the last one repeating (as the fixture scenarios were recorded). Every call is kept."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.calls: list[ChatCall] = []
        self.replies: list[str] = []
        self.counts: dict[str, int] = defaultdict(int)

    def __call__(self, call: ChatCall) -> str:
        replies = self.script.get(call.kind)
        if not replies:
            raise AssertionError(f"unexpected {call.kind} call")
        reply = replies[min(self.counts[call.kind], len(replies) - 1)]
        self.counts[call.kind] += 1
        self.calls.append(call)
        self.replies.append(reply)
        return reply

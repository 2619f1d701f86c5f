"""Shared test fixtures: the official parity data, tiny seeded configs and deterministic CPU math."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)


def _env_dir(name: str, what: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set; point it at {what} to run this test")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"{name}={value} is not a folder; point it at {what}")
    return path


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """The folder of tensors produced by the official implementation (``fixtures/official``)."""
    return _env_dir("STEP1X_FIXTURES", "the official parity fixtures folder")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """A folder with the real Qwen2.5 tokenizer files (vocab.json, merges.txt, tokenizer_config.json)."""
    return _env_dir("STEP1X_QWEN_TOKENIZER", "a folder with the Qwen2.5 tokenizer files")


@pytest.fixture(scope="session")
def tiny_dit():
    """A tiny v1.1 DiT with seeded random weights (the parity fixtures' architecture)."""
    from step1x.configs import TINY_DIT, with_version
    from step1x.model import Step1XEdit

    torch.manual_seed(0)
    return Step1XEdit(with_version(TINY_DIT, "v1.1"), dtype=torch.float32).eval()


@pytest.fixture()
def tiny_text():
    """Cond and uncond MLLM embeddings for the tiny DiT (width 48, 24 tokens)."""
    from step1x.sampling import TextConditioning

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 24, 48, generator=g)
    mask = torch.zeros(2, 24, dtype=torch.long)
    mask[0, :17] = 1
    mask[1, :6] = 1
    emb = emb * mask.unsqueeze(-1)
    return TextConditioning(emb[:1], mask[:1]), TextConditioning(emb[1:], mask[1:])

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

"""A complete set of tiny random model files in the official standalone layout.

Used by the self-test and the tests: the files go through exactly the loaders real weights use, so a
run on them exercises files -> MLLM encode -> connector -> sample -> decode end to end in seconds.
The images they produce are noise; only the mechanics are real.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoints.loading import save_with_config
from .checkpoints.model_files import DIT_FILES, MLLM_FOLDER, VAE_FILE, ModelPaths
from .models.autoencoder import AutoEncoder
from .models.configs import TINY_DIT, TINY_VAE, DiTParams, with_version
from .models.model import Step1XEdit


def tiny_dit_params(mllm_hidden: int, version: str = "v1.1") -> DiTParams:
    """The tiny DiT whose connector reads an MLLM of width ``mllm_hidden``."""
    params = replace(TINY_DIT, connector=replace(TINY_DIT.connector, in_channels=mllm_hidden))
    return with_version(params, version)


def _seeded_state(build, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().state_dict()


def build_tiny_models(dst: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, version: str = "v1.1",
                      seed: int = 0) -> ModelPaths:
    """Write a tiny DiT, VAE and Qwen2.5-VL folder into ``dst`` under the official names.

    ``tokenizer_dir`` holds Qwen2.5 tokenizer files (the real ones, or :mod:`step1x.tiny_tokenizer`'s)."""
    from .encoder.tiny import TINY_QWEN25_VL, build_tiny_qwen_folder

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    params = tiny_dit_params(TINY_QWEN25_VL["hidden_size"], version)
    dit = dst / DIT_FILES[version]
    save_with_config(_seeded_state(lambda: Step1XEdit(params), seed), dit, params)
    vae = dst / VAE_FILE
    save_with_config(_seeded_state(lambda: AutoEncoder(TINY_VAE), seed + 1), vae, TINY_VAE)
    with _quiet_transformers():
        mllm = build_tiny_qwen_folder(dst / MLLM_FOLDER, tokenizer_dir, seed=seed)
    return ModelPaths(dit, vae, mllm)


@contextlib.contextmanager
def _quiet_transformers():
    """No "Writing model shards" bar while saving the tiny MLLM."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

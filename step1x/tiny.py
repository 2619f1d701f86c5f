"""A complete set of tiny random model files in the official standalone layout, or as a diffusers-layout model
folder (the layout of Step1X-Edit-v1p2 and Step1X-Edit-v1p1-diffusers).

Used by the self-test and the tests: the files go through exactly the loaders real weights use, so a
run on them exercises files -> MLLM encode -> connector -> sample -> decode end to end in seconds.
The images they produce are noise; only the mechanics are real.
"""

from __future__ import annotations

import contextlib
import json
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


DIFFUSERS_PIPELINES = {"v1.2": "Step1XEditPipelineV1P2", "v1.1": "Step1XEditPipeline"}
"""``model_index.json`` class names of the released model folders."""


def build_tiny_model_folder(dst: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, *,
                            version: str = "v1.2", seed: int = 0, shards: int = 2) -> Path:
    """Write a tiny diffusers-layout model folder into ``dst``: ``transformer/`` (``shards`` files and their
    index), ``vae/``, ``model_index.json``, and unless ``tokenizer_dir`` is None ``text_encoder/`` (sharded,
    with its generation config; the LM head tied to the embedding, so it can generate) with the tokenizer in
    ``processor/``. ``version`` is "v1.2" or "v1.1" (Step1X-Edit-v1p1-diffusers). Returns ``dst``."""
    from .checkpoints.diffusers_write import (
        dit_to_diffusers,
        transformer_config,
        vae_config,
        vae_to_diffusers,
        write_component,
    )
    from .encoder.tiny import TINY_QWEN25_VL, build_tiny_diffusers_text_encoder

    if version not in DIFFUSERS_PIPELINES:
        raise ValueError(f"no diffusers-layout Step1X-Edit {version!r}; choose one of {sorted(DIFFUSERS_PIPELINES)}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    params = tiny_dit_params(TINY_QWEN25_VL["hidden_size"], version)
    dit = dit_to_diffusers(_seeded_state(lambda: Step1XEdit(params), seed), params.hidden_size)
    write_component(dst / "transformer", dit, transformer_config(params), shards=shards)
    vae = vae_to_diffusers(_seeded_state(lambda: AutoEncoder(TINY_VAE), seed + 1), TINY_VAE)
    write_component(dst / "vae", vae, vae_config(TINY_VAE))
    (dst / "model_index.json").write_text(json.dumps({"_class_name": DIFFUSERS_PIPELINES[version]}), encoding="utf-8")
    if tokenizer_dir is not None:
        with _quiet_transformers():
            build_tiny_diffusers_text_encoder(dst, tokenizer_dir, seed=seed)
    return dst


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

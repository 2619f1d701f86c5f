"""``load_text_encoder``: a Qwen2.5-VL folder, a diffusers-layout model folder (its ``text_encoder/``) or a
ComfyUI single file -> ready ``TextEncoder``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .build import assign_weights, empty_model, ties_embeddings
from .checkpoint import CheckpointError, open_checkpoint
from .encoder import TextEncoder
from .identify import checked_config, infer_config
from .image_chain import make_image_processor
from .spec import read_config_json
from .tokens import TokenizerError, has_tokenizer_files, load_tokenizer

log = logging.getLogger(__name__)

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPU = torch.device("cpu")
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIRS = ("processor", "tokenizer")
"""Where a diffusers-layout model folder keeps the tokenizer when ``text_encoder/`` has none."""
PIPELINE_MARKERS = ("model_index.json", "transformer")
LM_HEAD = "lm_head.weight"
GENERATION_CONFIG = "generation_config.json"


def load_text_encoder(
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    device: torch.device | str = CPU,
    dtype: torch.dtype = torch.bfloat16,
    config: dict | str | os.PathLike | None = None,
    keep_fp8: bool = False,
    generation: bool = False,
    quantize_fp8: bool = False,
) -> TextEncoder:
    """Load the Step1X-Edit MLLM encoder.

    path: a Hugging Face Qwen2.5-VL-7B-Instruct folder (config.json + safetensors shards, tokenizer
        files); a diffusers-layout model folder such as Step1X-Edit-v1p2 or Step1X-Edit-v1p1-diffusers (its
        ``text_encoder/`` is loaded, with the tokenizer from ``text_encoder/``, ``processor/`` or
        ``tokenizer/``) or that ``text_encoder`` folder itself; or one ComfyUI ``text_encoders`` safetensors
        file (bf16/fp16/fp32 or fp8_scaled). Which prompt layout (v1.1 ``encode`` or v1.2 ``encode_v12``)
        is used is the caller's choice, from the DiT version, not from these weights.
    tokenizer_dir: folder of the Qwen2.5 tokenizer when ``path`` has none (in ComfyUI:
        ``comfy/text_encoders/qwen25_tokenizer``).
    dtype: compute dtype (bfloat16, float16 or float32); fp8 weights are dequantised to it.
    config: a config.json dict, file or folder for a single file that is not the 7B model (tests);
        the 7B configuration is otherwise recognised from the tensor shapes.
    keep_fp8: keep the Linear weights of an fp8_scaled file in float8 and dequantise per layer.
    quantize_fp8: store the transformer-block Linear weights of a full-precision checkpoint (e.g. the bf16
        text_encoder of Step1X-Edit-v1p2) as float8_e4m3fn with a per-tensor scale, the layout of ComfyUI's
        fp8_scaled files, dequantised per layer: about half the memory of bf16. fp8 files stay as stored.
    generation: keep the language-model head (``lm_head.weight``, or the tied input embedding) so the same
        model can ``generate()`` text (v1.2 thinking/reflection, ``TextEncoder.generation_model``); costs
        vocab x hidden more memory (1.1 GB in bf16 for the 7B model) when the head is not tied.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype {dtype} cannot be a compute dtype; choose torch.bfloat16 (recommended), torch.float16 or "
            "torch.float32. To keep an fp8_scaled file small in memory, pass keep_fp8=True."
        )
    path = text_encoder_path(Path(path))
    device = torch.device(device)
    ckpt = open_checkpoint(path, keep_lm_head=generation)
    tokenizer_folder = _tokenizer_folder(path, ckpt.kind, tokenizer_dir)
    config_data, config_source = _config_for(ckpt, config)
    model_config = checked_config(ckpt, config_data, config_source)
    model = empty_model(model_config, lm_head=generation)
    if generation and not ties_embeddings(model) and LM_HEAD not in ckpt.entries:
        raise CheckpointError(
            f"{path} has no {LM_HEAD}, so the model cannot write text (thinking/reflection). Use a checkpoint with "
            "the language-model head, e.g. the text_encoder folder of Step1X-Edit-v1p2 or the Qwen2.5-VL-7B-Instruct "
            "folder, or load with generation=False to encode only."
        )
    assign_weights(model, ckpt, device=device, dtype=dtype, keep_fp8=keep_fp8, quantize_fp8=quantize_fp8)
    if generation:
        _load_generation_config(model, path)
    tokenizer = load_tokenizer(tokenizer_folder)
    vision = model_config.vision_config
    image_processor = make_image_processor(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    return TextEncoder(model, tokenizer, image_processor, dtype=dtype, source=path)


def check_text_encoder(path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                       generation: bool = False) -> Path:
    """What :func:`load_text_encoder` checks before it reads weights, from headers, configs and tokenizer files
    alone: the text encoder at ``path`` (file, folder or model folder), its config, its tokenizer and, with
    ``generation``, its language-model head. Returns the tokenizer folder it would use."""
    path = text_encoder_path(Path(path))
    ckpt = open_checkpoint(path, keep_lm_head=generation)
    tokenizer_folder = _tokenizer_folder(path, ckpt.kind, tokenizer_dir)
    config_data, config_source = _config_for(ckpt, None)
    model_config = checked_config(ckpt, config_data, config_source)
    if generation and LM_HEAD not in ckpt.entries and not getattr(model_config, "tie_word_embeddings", False):
        raise CheckpointError(
            f"{path} has no {LM_HEAD}, so the model cannot write text (thinking/reflection). Use a checkpoint with "
            "the language-model head, e.g. the text_encoder folder of Step1X-Edit-v1p2 or the Qwen2.5-VL-7B-Instruct "
            "folder, or load with generation=False to encode only."
        )
    load_tokenizer(tokenizer_folder)
    return tokenizer_folder


def text_encoder_path(path: Path) -> Path:
    """The Qwen2.5-VL folder or file inside ``path``: ``path/text_encoder`` for a diffusers-layout model
    folder, ``path`` otherwise. A model folder without ``text_encoder/`` is a clear error."""
    if not path.is_dir():
        return path
    sub = path / TEXT_ENCODER_DIR
    if sub.is_dir():
        return sub
    if any((path / marker).exists() for marker in PIPELINE_MARKERS) and not (path / "config.json").is_file():
        present = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:8]) or "nothing"
        raise CheckpointError(
            f"{path} is a diffusers-layout model folder without {TEXT_ENCODER_DIR}/ (found {present}). "
            f"Step1X-Edit-v1p2 ships its own Qwen2.5-VL there: download the complete model folder (with "
            f"{TEXT_ENCODER_DIR}/ and processor/), or give a Qwen2.5-VL-7B-Instruct folder or file as the text encoder."
        )
    return path


def _load_generation_config(model, path: Path) -> None:
    """The checkpoint's ``generation_config.json`` (beside a single file, or in the folder) as the model's
    ``generation_config``, as ``from_pretrained`` sets it: ``generate()`` takes the settings a call does not give
    (top_k, repetition_penalty, ...) from there. Without the file transformers' defaults stay."""
    folder = path if path.is_dir() else path.parent
    file = folder / GENERATION_CONFIG
    if not file.is_file():
        log.info("%s has no %s; generation uses transformers' defaults for settings a call does not give",
                 folder, GENERATION_CONFIG)
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); download it again or delete it") from None


def _config_for(ckpt, config) -> tuple[dict, str]:
    if isinstance(config, dict):
        return config, "the given config"
    if config is not None:
        return read_config_json(config), str(config)
    if ckpt.kind == "folder":
        if not (ckpt.path / "config.json").is_file():
            raise CheckpointError(
                f"{ckpt.path} has no config.json; give the complete Qwen2.5-VL-7B-Instruct folder or a single "
                "ComfyUI text encoder file."
            )
        return read_config_json(ckpt.path), str(ckpt.path / "config.json")
    name, data = infer_config(ckpt)
    return data, name


def _tokenizer_folder(path: Path, kind: str, tokenizer_dir) -> Path:
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    if kind == "folder" and has_tokenizer_files(path):
        return path
    if kind == "file" and has_tokenizer_files(path.parent):
        return path.parent
    if kind == "folder" and path.name == TEXT_ENCODER_DIR:
        for name in TOKENIZER_DIRS:
            if has_tokenizer_files(path.parent / name):
                return path.parent / name
    raise TokenizerError(
        f"no tokenizer for {path}: pass tokenizer_dir= a folder with the Qwen2.5 tokenizer files (tokenizer.json, "
        "or vocab.json + merges.txt). A diffusers-layout model folder keeps them in text_encoder/, processor/ or "
        "tokenizer/. Inside ComfyUI use comfy/text_encoders/qwen25_tokenizer."
    )

"""``load_text_encoder``: a Qwen2.5-VL folder or ComfyUI single file -> ready ``TextEncoder``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .build import assign_weights, empty_model
from .checkpoint import CheckpointError, open_checkpoint
from .encoder import TextEncoder
from .identify import checked_config, infer_config
from .image_chain import make_image_processor
from .spec import read_config_json
from .tokens import TokenizerError, has_tokenizer_files, load_tokenizer

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPU = torch.device("cpu")


def load_text_encoder(
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    device: torch.device | str = CPU,
    dtype: torch.dtype = torch.bfloat16,
    config: dict | str | os.PathLike | None = None,
    keep_fp8: bool = False,
) -> TextEncoder:
    """Load the Step1X-Edit MLLM encoder.

    path: a Hugging Face Qwen2.5-VL-7B-Instruct folder (config.json + safetensors shards, tokenizer
        files) or one ComfyUI ``text_encoders`` safetensors file (bf16/fp16/fp32 or fp8_scaled).
    tokenizer_dir: folder of the Qwen2.5 tokenizer when ``path`` has none (in ComfyUI:
        ``comfy/text_encoders/qwen25_tokenizer``).
    dtype: compute dtype (bfloat16, float16 or float32); fp8 weights are dequantised to it.
    config: a config.json dict, file or folder for a single file that is not the 7B model (tests);
        the 7B configuration is otherwise recognised from the tensor shapes.
    keep_fp8: keep the Linear weights of an fp8_scaled file in float8 and dequantise per layer.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype {dtype} cannot be a compute dtype; choose torch.bfloat16 (recommended), torch.float16 or "
            "torch.float32. To keep an fp8_scaled file small in memory, pass keep_fp8=True."
        )
    path = Path(path)
    device = torch.device(device)
    ckpt = open_checkpoint(path)
    config_data, config_source = _config_for(ckpt, config)
    model_config = checked_config(ckpt, config_data, config_source)
    model = empty_model(model_config)
    assign_weights(model, ckpt, device=device, dtype=dtype, keep_fp8=keep_fp8)
    tokenizer = load_tokenizer(_tokenizer_folder(path, ckpt.kind, tokenizer_dir))
    vision = model_config.vision_config
    image_processor = make_image_processor(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    return TextEncoder(model, tokenizer, image_processor, dtype=dtype, source=path)


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
    raise TokenizerError(
        f"no tokenizer for {path}: pass tokenizer_dir= a folder with the Qwen2.5 tokenizer files (tokenizer.json, "
        "or vocab.json + merges.txt). Inside ComfyUI use comfy/text_encoders/qwen25_tokenizer."
    )

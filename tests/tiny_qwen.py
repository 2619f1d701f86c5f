"""Tiny Qwen2.5-VL assets for the encoder tests: an HF folder and ComfyUI-layout single files (full
precision and fp8_scaled). The ``tiny_assets`` and ``tiny_encoder`` fixtures in ``conftest.py`` build them
once per session from the real tokenizer files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from step1x.encoder import keys as K
from step1x.encoder import load_text_encoder
from step1x.encoder.tiny import TINY_QWEN25_VL, build_tiny_qwen_folder

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_PREFIXES = ("model.layers.", "visual.blocks.", "visual.merger.mlp.")


@dataclass(frozen=True)
class TinyAssets:
    folder: Path
    single_file: Path
    fp8_file: Path
    dequantized_file: Path
    tokenizer_dir: Path
    state: dict[str, torch.Tensor]


def comfy_state(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights under ComfyUI ``text_encoders`` names, without ``lm_head``."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, value in load_file(file).items():
            name = K.canonical(key)
            if not K.is_dropped(name):
                state[name] = value
    return state


def is_fp8_target(name: str, value: torch.Tensor) -> bool:
    return name.endswith(".weight") and value.ndim == 2 and name.startswith(FP8_PREFIXES)


def quantize_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI ``fp8_scaled`` layout: Linear weights as float8 with a per-tensor ``scale_weight``, a
    top-level ``scaled_fp8`` marker, everything else unchanged."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for name, value in state.items():
        if is_fp8_target(name, value):
            scale = value.abs().max().float() / FP8_MAX
            out[name] = (value.float() / scale).to(FP8)
            out[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[name] = value
    return out


def dequantize_state(fp8_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the fp8 file means in float32: ``weight * scale_weight``."""
    out = {}
    for name, value in fp8_state.items():
        if name == "scaled_fp8" or name.endswith(".scale_weight"):
            continue
        scale = fp8_state.get(name[: -len("weight")] + "scale_weight")
        out[name] = value.float() * scale if scale is not None else value
    return out


def build_assets(root: Path, tokenizer_dir: Path) -> TinyAssets:
    folder = build_tiny_qwen_folder(root / "Qwen2.5-VL-tiny", tokenizer_dir, seed=0)
    state = comfy_state(folder)
    single = root / "qwen_2.5_vl_tiny.safetensors"
    save_file(state, single)
    fp8_state = quantize_fp8(state)
    fp8_file = root / "qwen_2.5_vl_tiny_fp8_scaled.safetensors"
    save_file(fp8_state, fp8_file)
    dequantized = root / "qwen_2.5_vl_tiny_dequantized.safetensors"
    save_file(dequantize_state(fp8_state), dequantized)
    return TinyAssets(folder, single, fp8_file, dequantized, tokenizer_dir, state)


def load_tiny(path: Path, assets: TinyAssets, **kwargs):
    """Load one of the tiny folders or files (float32 unless told), giving a single file the tiny config and
    the tokenizer it lacks."""
    kwargs.setdefault("dtype", torch.float32)
    if path.is_file():
        kwargs.setdefault("tokenizer_dir", assets.tokenizer_dir)
        kwargs.setdefault("config", TINY_QWEN25_VL)
    return load_text_encoder(path, **kwargs)

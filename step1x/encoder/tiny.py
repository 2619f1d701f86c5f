"""A tiny random Qwen2.5-VL with the real vocabulary, for tests and the pack's offline self-test.

Same architecture as Qwen2.5-VL-7B-Instruct at toy width, so the real tokenizer's ids are valid and
every load path and quirk can be exercised without the 16 GB weights.
"""

from __future__ import annotations

import copy
import os
import shutil
import zlib
from pathlib import Path

import torch
from torch import nn

from . import keys as K
from .spec import QWEN25_VL_7B, make_config

TINY_QWEN25_VL: dict = copy.deepcopy(QWEN25_VL_7B)
TINY_QWEN25_VL.update(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_window_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    vocab_size=151936,
    tie_word_embeddings=True,
    torch_dtype="float32",
)
TINY_QWEN25_VL["vision_config"].update(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    fullatt_block_indexes=[1],
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def seeded_init_(model: nn.Module, seed: int = 0) -> None:
    """Deterministic weights that do not depend on transformers' init order or key layout: each
    parameter draws from its own generator seeded by its canonical name."""
    for name, param in model.named_parameters():
        gen = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(K.canonical(name).encode()))
        shape = param.shape
        if param.ndim >= 2:
            fan_in = shape[1:].numel()
            value = torch.randn(shape, generator=gen) / fan_in**0.5
        elif "norm" in name or "ln_q" in name:
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.05 * torch.randn(shape, generator=gen)
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def tiny_model(seed: int = 0) -> nn.Module:
    """The tiny float32 ``Qwen2_5_VLForConditionalGeneration`` with seeded weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(make_config(TINY_QWEN25_VL, "the tiny config"))
    seeded_init_(model, seed)
    return model.eval()


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src, dst = Path(src), Path(dst)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    for name in copied:
        shutil.copyfile(src / name, dst / name)


def build_tiny_qwen_folder(dst: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a Hugging Face style tiny Qwen2.5-VL folder (config.json, safetensors, tokenizer files)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tiny_model(seed).save_pretrained(dst)
    copy_tokenizer_files(tokenizer_dir, dst)
    return dst

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


def tiny_model(seed: int = 0, *, tie_word_embeddings: bool = True) -> nn.Module:
    """The tiny float32 ``Qwen2_5_VLForConditionalGeneration`` with seeded weights; untied, it has an LM head
    of its own as the 7B model does."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = copy.deepcopy(TINY_QWEN25_VL)
    config["tie_word_embeddings"] = tie_word_embeddings
    model = Qwen2_5_VLForConditionalGeneration(make_config(config, "the tiny config"))
    seeded_init_(model, seed)
    return model.eval()


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src, dst = Path(src), Path(dst)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    for name in copied:
        shutil.copyfile(src / name, dst / name)


def build_tiny_qwen_folder(
    dst: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    seed: int = 0,
    *,
    tie_word_embeddings: bool = True,
    max_shard_size: str | None = None,
) -> Path:
    """Write a Hugging Face style tiny Qwen2.5-VL folder (config.json, safetensors, tokenizer files unless
    ``tokenizer_dir`` is None); ``max_shard_size`` (e.g. "2MB") splits the weights into shards with an index."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed, tie_word_embeddings=tie_word_embeddings)
    if max_shard_size is None:
        model.save_pretrained(dst)
    else:
        model.save_pretrained(dst, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, dst)
    return dst


def build_tiny_diffusers_text_encoder(
    root: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    seed: int = 0,
    *,
    tokenizer_subfolder: str = "processor",
    tie_word_embeddings: bool = True,
    max_shard_size: str | None = "2MB",
) -> Path:
    """Write the text-encoder part of a diffusers-layout model folder as the released v1.1-diffusers/v1.2
    repos lay it out: ``text_encoder/`` (config.json, sharded safetensors and index) and the tokenizer in
    ``tokenizer_subfolder`` (``processor``, ``tokenizer`` or ``text_encoder`` itself). Returns ``root``."""
    root = Path(root)
    build_tiny_qwen_folder(
        root / "text_encoder", None, seed, tie_word_embeddings=tie_word_embeddings, max_shard_size=max_shard_size
    )
    tokenizer_folder = root / tokenizer_subfolder
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(tokenizer_dir, tokenizer_folder)
    return root

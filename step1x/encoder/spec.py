"""Model configurations as data, and turning them into a transformers ``Qwen2_5_VLConfig``.

Configs are written in the layout of the published ``config.json`` (text fields at the top level,
``vision_config`` nested), which every supported transformers release accepts.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

QWEN25_VL_7B: dict = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}
"""Qwen2.5-VL-7B-Instruct, the MLLM of Step1X-Edit."""

KNOWN = {"Qwen2.5-VL-7B-Instruct": QWEN25_VL_7B}

ATTENTION = "sdpa"


def read_config_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore the config.json of the model.") from None


def make_config(data: dict, source: object = "the config"):
    """A transformers ``Qwen2_5_VLConfig`` for ``data`` with SDPA attention everywhere."""
    from transformers import Qwen2_5_VLConfig

    kind = data.get("model_type")
    if kind != "qwen2_5_vl":
        raise ValueError(
            f"{source} describes model_type {kind!r}; Step1X-Edit needs a Qwen2.5-VL model (model_type "
            "'qwen2_5_vl', e.g. Qwen2.5-VL-7B-Instruct). Qwen2-VL and text-only Qwen2.5 do not work."
        )
    data = copy.deepcopy(data)
    for key in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        data.pop(key, None)
    config = Qwen2_5_VLConfig(**{k: v for k, v in data.items() if k != "model_type"})
    set_attention(config, ATTENTION)
    return config


def set_attention(config, name: str) -> None:
    for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = name


def text_config(config):
    """The text part: ``config.text_config`` on transformers >= 4.52, the config itself before."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None and hasattr(sub, "num_hidden_layers") else config

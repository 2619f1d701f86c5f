"""What a checkpoint holds, read from tensor shapes alone, and matching it against a config."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass

from .checkpoint import Checkpoint, CheckpointError
from .spec import KNOWN, make_config, text_config

EMBED = "model.embed_tokens.weight"
LAYER0 = "model.layers.0."
PATCH = "visual.patch_embed.proj.weight"
QWEN2_VL_MLP = "visual.blocks.0.mlp.fc1.weight"
LAYERS = r"model\.layers\.(\d+)\."
BLOCKS = r"visual\.blocks\.(\d+)\."
FIX = (
    "Use ComfyUI's qwen_2.5_vl_7b.safetensors / qwen_2.5_vl_7b_fp8_scaled.safetensors (Comfy-Org/Qwen-Image_ComfyUI, "
    "split_files/text_encoders) or the Qwen/Qwen2.5-VL-7B-Instruct folder."
)


@dataclass(frozen=True)
class Shapes:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    q_out: int
    kv_out: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    patch: int
    temporal_patch: int
    merge: int

    def describe(self) -> str:
        return (
            f"language model hidden {self.hidden}, {self.layers} layers, vocab {self.vocab}, MLP {self.intermediate}, "
            f"q/kv width {self.q_out}/{self.kv_out}; vision tower {self.vision_depth} blocks of width "
            f"{self.vision_hidden} (MLP {self.vision_intermediate}), patch {self.patch}, merge {self.merge}, "
            f"output {self.vision_out}"
        )


def _count(ckpt: Checkpoint, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for key in ckpt.entries if (m := rx.match(key))}
    return max(found) + 1 if found else 0


def _dim(ckpt: Checkpoint, key: str, axis: int) -> int:
    shape = ckpt.shape(key)
    if shape is None or len(shape) <= axis:
        raise CheckpointError(f"{ckpt.path}: tensor {key} is missing or has an unexpected shape {shape}. {FIX}")
    return shape[axis]


def read_shapes(ckpt: Checkpoint) -> Shapes:
    """The architecture of a checkpoint, or a CheckpointError saying why it is not Qwen2.5-VL."""
    keys = list(ckpt.entries)
    if EMBED not in ckpt.entries:
        sample = ", ".join(keys[:4]) or "no tensors"
        raise CheckpointError(
            f"{ckpt.path} holds no Qwen2.5 language model (no {EMBED}; found {len(keys)} tensors such as {sample}). "
            f"Expected Qwen2.5-VL-7B-Instruct. {FIX}"
        )
    if LAYER0 + "self_attn.q_proj.bias" not in ckpt.entries:
        raise CheckpointError(
            f"{ckpt.path} is a language model without attention biases (a Llama/Mistral-style model), "
            f"not Qwen2.5-VL. {FIX}"
        )
    if QWEN2_VL_MLP in ckpt.entries:
        raise CheckpointError(f"{ckpt.path} is a Qwen2-VL model; Step1X-Edit needs Qwen2.5-VL-7B-Instruct. {FIX}")
    if PATCH not in ckpt.entries:
        hidden, layers = _dim(ckpt, EMBED, 1), _count(ckpt, LAYERS)
        raise CheckpointError(
            f"{ckpt.path} is a text-only Qwen2.5 model (hidden {hidden}, {layers} layers, no visual.* tensors); "
            f"Step1X-Edit needs the vision tower of Qwen2.5-VL-7B-Instruct. {FIX}"
        )
    vision_hidden = _dim(ckpt, PATCH, 0)
    merged_in = _dim(ckpt, "visual.merger.mlp.0.weight", 1)
    return Shapes(
        vocab=_dim(ckpt, EMBED, 0),
        hidden=_dim(ckpt, EMBED, 1),
        layers=_count(ckpt, LAYERS),
        intermediate=_dim(ckpt, LAYER0 + "mlp.gate_proj.weight", 0),
        q_out=_dim(ckpt, LAYER0 + "self_attn.q_proj.weight", 0),
        kv_out=_dim(ckpt, LAYER0 + "self_attn.k_proj.weight", 0),
        vision_depth=_count(ckpt, BLOCKS),
        vision_hidden=vision_hidden,
        vision_intermediate=_dim(ckpt, "visual.blocks.0.mlp.gate_proj.weight", 0),
        vision_out=_dim(ckpt, "visual.merger.mlp.2.weight", 0),
        patch=_dim(ckpt, PATCH, 4),
        temporal_patch=_dim(ckpt, PATCH, 2),
        merge=math.isqrt(max(merged_in // max(vision_hidden, 1), 0)),
    )


def expected_shapes(config) -> Shapes:
    """The shapes a transformers ``Qwen2_5_VLConfig`` implies. Reading the config object rather than the
    config.json dict fills in transformers' defaults for the fields a saved config.json leaves out
    (``save_pretrained`` writes only the values that differ from them)."""
    text, vision = text_config(config), config.vision_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shapes(
        vocab=text.vocab_size,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        intermediate=text.intermediate_size,
        q_out=heads * head_dim,
        kv_out=text.num_key_value_heads * head_dim,
        vision_depth=vision.depth,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_out=vision.out_hidden_size,
        patch=vision.patch_size,
        temporal_patch=vision.temporal_patch_size,
        merge=vision.spatial_merge_size,
    )


def _difference(found: Shapes, expected: Shapes) -> str:
    a, b = asdict(found), asdict(expected)
    return ", ".join(f"{k} {a[k]} (expected {b[k]})" for k in a if a[k] != b[k])


def checked_config(ckpt: Checkpoint, config: dict, config_source: object):
    """The transformers config of ``config`` (config.json layout), once the checkpoint is known to be a
    Qwen2.5-VL with exactly its shapes; a CheckpointError naming the differences otherwise."""
    found = read_shapes(ckpt)
    model_config = make_config(config, config_source)
    expected = expected_shapes(model_config)
    if found != expected:
        raise CheckpointError(
            f"{ckpt.path} does not match {config_source}: {_difference(found, expected)}. "
            "Use the weights and config.json of the same model."
        )
    return model_config


def infer_config(ckpt: Checkpoint) -> tuple[str, dict]:
    """(name, config) of the known model whose shapes the checkpoint has; a CheckpointError otherwise."""
    found = read_shapes(ckpt)
    for name, config in KNOWN.items():
        if expected_shapes(make_config(config, name)) == found:
            return name, copy.deepcopy(config)
    name, config = next(iter(KNOWN.items()))
    raise CheckpointError(
        f"{ckpt.path} is a Qwen2.5-VL model but not {name}: found {found.describe()}; expected "
        f"{expected_shapes(make_config(config, name)).describe()}. Step1X-Edit was trained with {name}. {FIX}"
    )

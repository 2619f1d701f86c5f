"""Building the transformers Qwen2.5-VL model without allocating weights, then assigning the checkpoint.

Parameters are created on the meta device (buffers such as the RoPE frequencies stay real), so memory
holds one copy of the weights: each tensor is read, converted and moved to the target device, then
assigned in place of its meta placeholder.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..checkpoints.assign import declared_tensors, unloaded_tensors
from ..checkpoints.safetensors_file import open_tensors
from . import keys as K
from .checkpoint import Checkpoint, CheckpointError, is_fp8
from .fp8 import dequantize, quantize, swap_linear

QUANTIZED = ("model.layers.", "visual.blocks.", "visual.merger.mlp.")
"""Canonical prefixes of the Linear weights ``quantize_fp8`` stores in float8 (those of ComfyUI's fp8_scaled
files): the transformer blocks of the language model and of the vision tower, and the vision merger. The
embedding, the norms and the LM head stay in the compute dtype."""


@contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device while leaving buffers where they are made.

    Each layer's freshly allocated (untouched) CPU tensor is swapped for a meta one and freed at once.
    Deterministic mode would fill those allocations with NaN, so that filling is paused meanwhile."""
    original = nn.Module.register_parameter
    deterministic = getattr(torch.utils, "deterministic", None)
    fill = getattr(deterministic, "fill_uninitialized_memory", None)

    def register(module: nn.Module, name: str, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    if fill is not None:
        deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        if fill is not None:
            deterministic.fill_uninitialized_memory = fill


def empty_model(config, *, lm_head: bool = False) -> nn.Module:
    """``Qwen2_5_VLForConditionalGeneration`` with meta parameters.

    The encoder reads the hidden state after the final norm, so unless ``lm_head`` (text generation) is
    asked for, the LM head (a vocab x hidden matrix) is replaced by an identity and never loaded."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with parameters_on_meta():
        model = Qwen2_5_VLForConditionalGeneration(config)
    if not lm_head:
        model.lm_head = nn.Identity()
    model.requires_grad_(False)
    return model.eval()


def ties_embeddings(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _tie_head(model: nn.Module) -> None:
    """Share the input embedding with a kept LM head when the config ties them (as transformers does)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and ties_embeddings(model):
        head.weight = model.get_input_embeddings().weight


def _linear_weights(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def assign_weights(
    model: nn.Module,
    ckpt: Checkpoint,
    *,
    device: torch.device,
    dtype: torch.dtype,
    keep_fp8: bool = False,
    quantize_fp8: bool = False,
) -> None:
    """Read every tensor of ``ckpt`` into ``model`` on ``device``; float tensors become ``dtype``
    (fp8 ones dequantised with their scale unless ``keep_fp8`` keeps Linear weights in float8;
    ``quantize_fp8`` stores the block Linear weights of a full-precision checkpoint in float8 too)."""
    expected = declared_tensors(model)  # lazily built layers included
    new_layout = K.uses_new_layout(expected)
    linears = _linear_weights(model)
    state: dict[str, torch.Tensor] = {}
    kept_fp8: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    unexpected: list[str] = []
    for file, names in ckpt.by_file().items():
        with open_tensors(file) as handle:
            for name in names:
                target = K.for_model(name, new_layout)
                slot = expected.get(target)
                if slot is None:
                    unexpected.append(name)
                    continue
                entry = ckpt.entries[name]
                if slot != entry.shape:
                    raise CheckpointError(
                        f"{entry.file}: tensor {entry.stored} has shape {list(entry.shape)}, the model expects "
                        f"{list(slot)}. The weights do not belong to this model configuration."
                    )
                tensor = ckpt.read(handle, name)
                scale = ckpt.read_scale(handle, name)
                if is_fp8(entry.dtype) and (keep_fp8 or quantize_fp8) and target in linears:
                    kept_fp8[target] = (tensor.to(device), None if scale is None else scale.to(device))
                    continue
                if quantize_fp8 and target in linears and name.startswith(QUANTIZED) and tensor.is_floating_point():
                    weight, scale = quantize(tensor)
                    kept_fp8[target] = (weight.to(device), scale.to(device))
                    continue
                if is_fp8(entry.dtype) or scale is not None:
                    tensor = dequantize(tensor, scale, dtype)
                elif tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[target] = tensor.to(device)
    model.load_state_dict(state, strict=False, assign=True)
    for target, (weight, scale) in kept_fp8.items():
        swap_linear(model, target, weight, scale)
    _tie_head(model)
    _check_complete(model, ckpt)
    if unexpected:
        warnings.warn(
            f"{ckpt.path}: ignored {len(unexpected)} tensors the Qwen2.5-VL model does not use, e.g. "
            + ", ".join(unexpected[:5]),
            stacklevel=3,
        )
    model.to(device)


def _check_complete(model: nn.Module, ckpt: Checkpoint) -> None:
    missing = unloaded_tensors(model)
    if missing:
        shown = ", ".join(K.canonical(n) for n in missing[:6])
        raise CheckpointError(
            f"{ckpt.path} lacks {len(missing)} tensors of Qwen2.5-VL, e.g. {shown}. The file is incomplete or "
            "is a different model; use the complete Qwen2.5-VL-7B-Instruct weights."
        )

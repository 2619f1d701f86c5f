"""How much device memory a DiT call asks ComfyUI's model management for, shared by the Sampler, the v1.2 path and
the native MODEL."""

from __future__ import annotations

from ..step1x.models.quantized import dequant_workspace_bytes
from . import _comfy as bridge

ACTIVATION_FACTOR = 16
"""Activation bytes per token, hidden unit and byte of dtype in one DiT step (a rough upper bound)."""


def load_for_sampling(dit, noise, reference, *, text_tokens: int, rows_per_call: int) -> None:
    """Load the DiT with ComfyUI's model management, asking for the activation memory of one DiT call of
    ``rows_per_call`` rows per image (2: cond and uncond batched; 1: one side at a time) with ``text_tokens`` text
    tokens, plus RegionE's key/value caches and GGUF's dequantisation workspace when they apply."""
    params = dit.model.params
    itemsize = dit.compute_dtype.itemsize
    tokens = text_tokens + noise.shape[-2] * noise.shape[-1] // 4 * (1 if reference is None else 2)
    memory = rows_per_call * noise.shape[0] * tokens * params.hidden_size * itemsize * ACTIVATION_FACTOR
    if dit.regione is not None:  # RegionE keeps keys and values of every attention layer (one row at a time)
        memory += 2 * 2 * tokens * params.hidden_size * itemsize * (params.depth + params.depth_single_blocks)
    memory += dequant_workspace_bytes(dit.model, dit.compute_dtype)  # GGUF layers dequantise on the device
    bridge.load([dit.patcher], memory_required=memory)

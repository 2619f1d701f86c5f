"""Writing Step1X-Edit models in the diffusers layout: the inverse of :mod:`.diffusers_layout`'s key maps.

Used to make the tiny diffusers-layout model folders of the self-test and the tests (``transformer/`` sharded
with its index, ``vae/``), so that they go through exactly the loading code the released folders go through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.configs import AutoEncoderParams, DiTParams
from .diffusers_files import CONFIG_NAME, CONV, INDEX_NAME, STACK, SWAP, WEIGHTS_NAME
from .diffusers_layout import dit_sources, vae_sources

TRANSFORMER_CLASS = "Step1XEditTransformer2DModel"
VAE_CLASS = "AutoencoderKL"


def dit_to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """An official-layout DiT state dict (of a DiT ``hidden`` wide) under the diffusers names: fused
    q/k/v(/mlp) rows split, the final modulation's two halves swapped back."""
    out = {}
    for key, tensor in state.items():
        names, op = dit_sources(key)
        if op == STACK:
            sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(names) == 4 else [])
            parts = tensor.split(sizes)
        elif op == SWAP:
            first, second = tensor.chunk(2)
            parts = [torch.cat((second, first))]
        else:
            parts = [tensor]
        out.update(zip(names, (p.contiguous() for p in parts), strict=True))
    return out


def vae_to_diffusers(state: dict[str, torch.Tensor], params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    """An official FLUX VAE state dict in diffusers' ``AutoencoderKL`` names (1x1 attention convolutions as
    Linear weights)."""
    levels = len(params.ch_mult)
    out = {}
    for key, tensor in state.items():
        (name,), op = vae_sources(key, levels)
        out[name] = tensor.reshape(tensor.shape[:2]).contiguous() if op == CONV and tensor.ndim == 4 else tensor
    return out


def transformer_config(params: DiTParams) -> dict:
    """The diffusers ``config.json`` of a Step1X-Edit transformer with these params."""
    return {
        "_class_name": TRANSFORMER_CLASS, "patch_size": 1, "in_channels": params.in_channels,
        "out_channels": params.out_channels, "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks, "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
        "timestep_in_dim": 256, "vector_in_dim": params.vec_in_dim,
        "connector_in_channels": params.connector.in_channels,
        "connector_hidden_size": params.connector.hidden_size, "connector_heads_num": params.connector.num_heads,
        "connector_depth": params.connector.depth, "guidance_embeds": False, "axes_dims_rope": list(params.axes_dim),
        "enable_text_token_mapping": params.text_token_mapping,
    }


def vae_config(params: AutoEncoderParams) -> dict:
    """The diffusers ``config.json`` of the FLUX VAE with these params."""
    return {
        "_class_name": VAE_CLASS, "in_channels": params.in_channels, "out_channels": params.out_ch,
        "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
        "latent_channels": params.z_channels, "norm_num_groups": params.norm_groups,
        "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    }


def write_component(folder: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                    shards: int = 1) -> Path:
    """``state`` as a diffusers component folder: ``config.json`` and ``diffusion_pytorch_model.safetensors``,
    or ``shards`` files ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` with their index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if shards <= 1:
        save_file(state, str(folder / WEIGHTS_NAME))
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder

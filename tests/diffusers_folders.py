"""Writing diffusers-layout model folders for tests: the v1.2 reference set as a model folder, official weights
in diffusers names, shards with their index, and real-size folders whose shards are sparse holes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from step1x.checkpoints.diffusers_files import INDEX_NAME, STACK, SWAP, WEIGHTS_NAME
from step1x.checkpoints.diffusers_layout import dit_sources

SAFETENSORS_DTYPES = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float8_e4m3fn: ("F8_E4M3", 1)}


def v12_model_folder(root: Path, v12_dir: Path) -> Path:
    """The reference set's tiny v1.2 transformer and VAE as a diffusers model folder (transformer/, vae/)."""
    for component, stem in (("transformer", "dit_v12"), ("vae", "vae_v12")):
        (root / component).mkdir(parents=True, exist_ok=True)
        shutil.copy(v12_dir / f"{stem}_weights.safetensors", root / component / WEIGHTS_NAME)
        shutil.copy(v12_dir / f"{stem}_config.json", root / component / "config.json")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Step1XEditPipelineV1P2"}))
    return root


def to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """An official-layout DiT state dict under the diffusers names (the inverse of the loader's key map)."""
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
        out.update(zip(names, parts, strict=True))
    return out


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int, config: dict | None = None) -> Path:
    """``state`` as ``shards`` diffusers shards plus their index (and a config.json when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def merge_shards(folder: Path, target: Path) -> Path:
    """The shards of ``folder`` merged into one safetensors file."""
    index = json.loads((folder / INDEX_NAME).read_text())
    state = {}
    for name in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / name))
    save_file(state, str(target))
    return target


def header_only_shards(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, shards: int,
                       config: dict | None = None) -> Path:
    """Sharded safetensors files with these keys and shapes whose data is a sparse hole (no disk, no memory),
    plus the index and config: a stand-in for a real-size download whose header is all a test reads."""
    folder.mkdir(parents=True, exist_ok=True)
    name_of, size = SAFETENSORS_DTYPES[dtype]
    keys = sorted(shapes)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for key in keys[i::shards]:
            nbytes = int(torch.Size(shapes[key]).numel()) * size
            header[key] = {"dtype": name_of, "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def diffusers_config(params) -> dict:
    """The diffusers ``config.json`` of a Step1X-Edit transformer with these :class:`DiTParams`."""
    return {
        "_class_name": "Step1XEditTransformer2DModel", "patch_size": 1, "in_channels": params.in_channels,
        "out_channels": params.out_channels, "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks, "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
        "timestep_in_dim": 256, "vector_in_dim": params.vec_in_dim,
        "connector_in_channels": params.connector.in_channels,
        "connector_hidden_size": params.connector.hidden_size, "connector_heads_num": params.connector.num_heads,
        "connector_depth": params.connector.depth, "guidance_embeds": False, "axes_dims_rope": list(params.axes_dim),
        "enable_text_token_mapping": params.text_token_mapping,
    }

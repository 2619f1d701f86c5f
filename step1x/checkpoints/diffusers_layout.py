"""Step1X-Edit checkpoints in the diffusers layout, read onto the official key names.

v1.2 (``stepfun-ai/Step1X-Edit-v1p2``) is published only in this layout and v1.1 also ships in it
(``Step1X-Edit-v1p1-diffusers``). A model folder holds one folder per component::

    transformer/config.json
    transformer/diffusion_pytorch_model-00001-of-00005.safetensors ...   (shards)
    transformer/diffusion_pytorch_model.safetensors.index.json           (key -> shard)
    vae/config.json
    vae/diffusion_pytorch_model.safetensors

``load_dit`` / ``load_vae`` in :mod:`.loading` accept such a folder, a component folder or one of its
single files, and come here (:mod:`.diffusers_files` finds and checks the files). Every official tensor is
made from its diffusers tensors as it is assigned (one at a time, into a model built on the meta device), so
the loaded model has the official names and LoRA, fp8 storage and TeaCache work on it unchanged.

The transformer, official <- diffusers:

* ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``final_layer.linear`` <- ``x_embedder``,
  ``context_embedder``, ``time_embed``, ``vec_embed``, ``proj_out``.
* ``double_blocks.i`` <- ``transformer_blocks.i``: the fused ``img_attn.qkv`` / ``txt_attn.qkv`` are the rows
  of ``attn.to_q|to_k|to_v`` / ``attn.add_q_proj|add_k_proj|add_v_proj`` stacked in that order; the
  modulations, projections, MLPs and QK norms are renamed.
* ``single_blocks.i`` <- ``single_transformer_blocks.i``: ``linear1`` is ``attn.to_q|to_k|to_v|proj_mlp``
  stacked; ``linear2`` is ``proj_out``.
* ``final_layer.adaLN_modulation.1`` <- ``norm_out.linear`` with its two halves swapped (official
  shift|scale, diffusers scale|shift).
* ``connector.*`` and ``text_token_mapping.*`` keep their names.

The version comes from the weights: ``text_token_mapping.*`` is v1.2, ``connector.scale_factor`` is v1.0
(the converter copies it through; the diffusers model class has no use for it, so a diffusers-layout v1.0
without it cannot be told from v1.1 and would be run as v1.1), otherwise v1.1.

The VAE is diffusers' ``AutoencoderKL`` layout of the FLUX VAE: ``down_blocks.i.resnets.j`` /
``up_blocks.i.resnets.j`` (up blocks in reverse order), ``mid_block.resnets.0|1``, ``mid_block.attentions.0``
(Linear q/k/v/out where the official code has 1x1 convolutions), ``conv_shortcut`` for ``nin_shortcut`` and
``conv_norm_out`` for ``norm_out``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..models.autoencoder import AutoEncoder
from ..models.configs import FLUX_VAE, STEP1X_EDIT, AutoEncoderParams, ConnectorParams, DiTParams
from ..models.model import Step1XEdit
from ..models.ops import CastOps
from .diffusers_files import CONV, COPY, STACK, SWAP, DiffusersFiles, assign, looks_like_diffusers, open_component
from .loading import _KNOWN_AXES, DiTFileInfo, _count
from .safetensors_file import DTYPES, CheckpointError

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"
VAE = "vae"

_DIT_MARKERS = ("x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_q.weight")
_VAE_MARKERS = ("encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight")


def is_diffusers_dit(path: str | os.PathLike) -> bool:
    """Whether ``path`` is to be read as a diffusers-layout transformer (a folder, an index, or a file with
    diffusers tensor names) rather than an official-layout single file."""
    return looks_like_diffusers(path, _DIT_MARKERS)


def is_diffusers_vae(path: str | os.PathLike) -> bool:
    return looks_like_diffusers(path, _VAE_MARKERS)


# ---------------------------------------------------------------------------------- key map: transformer

_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_embed.in_layer", "time_in.out_layer": "time_embed.out_layer",
    "vector_in.in_layer": "vec_embed.in_layer", "vector_in.out_layer": "vec_embed.out_layer",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": "proj_out",
    "modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
}
_BLOCKS = {"double_blocks": ("transformer_blocks", _DOUBLE), "single_blocks": ("single_transformer_blocks", _SINGLE)}
_BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")

_DIFFUSERS_BLOCK_LINEAR = re.compile(
    r"^(transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|ff(_context)?\.net\.(0\.proj|2)"
    r"|norm1(_context)?\.linear)|single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear))"
    r"\.weight$"
)
"""The diffusers tensors that make up the official block matrices (their stored dtype is the file's)."""


def dit_sources(key: str) -> tuple[tuple[str, ...], str]:
    """The diffusers tensors an official DiT key is made of, and how they are combined."""
    if key.startswith(("connector.", "text_token_mapping.")):
        return (key,), COPY
    match = _BLOCK_KEY.match(key)
    if match:
        kind, index, module, param = match.groups()
        prefix, table = _BLOCKS[kind]
        target = table.get(module)
        if target is None:
            raise KeyError(key)
        param = "weight" if param == "scale" else param
        if isinstance(target, tuple):
            return tuple(f"{prefix}.{index}.{t}.{param}" for t in target), STACK
        return (f"{prefix}.{index}.{target}.{param}",), COPY
    module, _, param = key.rpartition(".")
    if module == "final_layer.adaLN_modulation.1":
        return (f"norm_out.linear.{param}",), SWAP
    if module not in _TOP:
        raise KeyError(key)
    return (f"{_TOP[module]}.{param}",), COPY


# ------------------------------------------------------------------------------------------ key map: VAE

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
"""Attention names of diffusers VAE files saved before the ``to_q`` names (still read by diffusers)."""
_VAE_KEY = [
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_VAE_RESNET[m[3]]}.{m[4]}"),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(\w+)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_VAE_RESNET[m[3]]}.{m[4]}"),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(\w+)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)$"),
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_VAE_RESNET[m[3]]}.{m[4]}"),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(\w+)$"),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN[m[2]]}.{m[3]}"),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(\w+)$"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(\w+)$"), lambda m, n: f"{m[1]}.{m[2]}.{m[3]}"),
]


def vae_sources(key: str, levels: int) -> tuple[tuple[str, ...], str]:
    """The diffusers tensor an official VAE key comes from (``levels``: resolution levels), and how."""
    for pattern, rename in _VAE_KEY:
        match = pattern.match(key)
        if match:
            op = CONV if ".attn_1." in key and key.endswith(".weight") and ".norm." not in key else COPY
            return (rename(match, levels),), op
    raise KeyError(key)


# ------------------------------------------------------------------------------------------ transformer


def describe_transformer(files: DiffusersFiles) -> str:
    """A short guess of which model a diffusers transformer is, for error messages."""
    keys = files.where
    name = str(files.config.get("_class_name", ""))
    if name == "FluxTransformer2DModel" or "time_text_embed.timestep_embedder.linear_1.weight" in keys:
        return "a FLUX.1 transformer (FluxTransformer2DModel), which has no Step1X-Edit connector"
    if name.startswith("QwenImage") or ("img_in.weight" in keys and "txt_norm.weight" in keys):
        return "a Qwen-Image transformer (QwenImageTransformer2DModel)"
    if name == "AutoencoderKL" or _VAE_MARKERS[0] in keys:
        return "a VAE"
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        return "a checkpoint in the official single-file layout (give the .safetensors file itself, not its folder)"
    if name and name != "Step1XEditTransformer2DModel":
        return f"a {name} model"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised model (first keys: {sample})"


def inspect_transformer(files: DiffusersFiles):
    """Check that ``files`` are a Step1X-Edit transformer; return its :class:`.loading.DiTFileInfo`."""
    keys = files.where
    required = ("x_embedder.weight", "transformer_blocks.0.attn.to_q.weight", "connector.S.input_embedder.weight")
    if any(k not in keys for k in required):
        raise CheckpointError(
            f"{files.label} is {describe_transformer(files)} in the diffusers layout, not Step1X-Edit. Expected the "
            "transformer of Step1X-Edit-v1p2 or Step1X-Edit-v1p1-diffusers, which has connector.*, "
            "transformer_blocks.* and single_transformer_blocks.* tensors."
        )
    params = _dit_params(files)
    dtypes = Counter(info.dtype for key, info in files.tensors.items() if _DIFFUSERS_BLOCK_LINEAR.match(key))
    if not dtypes:
        raise CheckpointError(f"{files.label} has no transformer block weights; the files are incomplete")
    stored = DTYPES.get(dtypes.most_common(1)[0][0])
    if stored is None:
        raise CheckpointError(
            f"{files.label} stores its weights as {dtypes.most_common(1)[0][0]}, which this torch cannot read; "
            "update torch or use bf16 weights"
        )
    return DiTFileInfo(Path(files.label), params, stored, "")


def _dit_params(files: DiffusersFiles) -> DiTParams:
    keys, config, s = files.where, files.config, files.shape
    try:
        hidden, in_channels = s("x_embedder.weight")
        head_dim = s("transformer_blocks.0.attn.norm_q.weight")[0]
        conn_hidden, conn_in = s("connector.S.input_embedder.weight")
        axes = config.get("axes_dims_rope") or _KNOWN_AXES.get(head_dim)
        if axes is None:
            raise CheckpointError(
                f"{files.label}: head dim {head_dim} is not a known Step1X-Edit size and there is no config.json "
                "with axes_dims_rope next to the weights, so the RoPE axes are unknown; keep the config.json"
            )
        heads = config.get("connector_heads_num") or (conn_hidden // 128 if conn_hidden >= 128 else conn_hidden // 16)
        mapping = "text_token_mapping.weight" in keys
        if mapping and s("text_token_mapping.weight") != (conn_hidden, conn_in):
            raise CheckpointError(
                f"{files.label}: text_token_mapping.weight is {list(s('text_token_mapping.weight'))} but the connector "
                f"maps {conn_in} -> {conn_hidden}; the files are not one Step1X-Edit v1.2 model"
            )
        if config.get("enable_text_token_mapping") and not mapping:
            raise CheckpointError(
                f"{files.label}: config.json enables text_token_mapping (v1.2) but the weights have no "
                "text_token_mapping.* tensors; the download is incomplete. Download the transformer folder again."
            )
        connector = ConnectorParams(
            in_channels=conn_in, hidden_size=conn_hidden, num_heads=max(1, heads),
            depth=_count(keys, r"connector\.S\.individual_token_refiner\.blocks\.(\d+)\."),
            mlp_ratio=s("connector.S.individual_token_refiner.blocks.0.mlp.fc1.weight")[0] / conn_hidden,
            global_out=s("connector.global_proj_out.weight")[0],
            has_scale_factor="connector.scale_factor" in keys,
        )
        params = DiTParams(
            in_channels=in_channels, out_channels=s("proj_out.weight")[0], vec_in_dim=s("vec_embed.in_layer.weight")[1],
            context_in_dim=s("context_embedder.weight")[1], hidden_size=hidden,
            mlp_ratio=s("transformer_blocks.0.ff.net.0.proj.weight")[0] / hidden, num_heads=hidden // head_dim,
            depth=_count(keys, r"transformer_blocks\.(\d+)\."),
            depth_single_blocks=_count(keys, r"single_transformer_blocks\.(\d+)\."),
            axes_dim=tuple(axes), theta=STEP1X_EDIT.theta, qkv_bias="transformer_blocks.0.attn.to_q.bias" in keys,
            connector=connector, text_token_mapping=mapping,
        )
    except KeyError as exc:
        raise CheckpointError(
            f"{files.label} looks like a Step1X-Edit transformer but lacks {exc.args[0]!r}; the files are incomplete. "
            "Download the transformer folder again."
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{files.label}: inconsistent tensor shapes or config ({exc})") from None
    for name, value in (("num_layers", params.depth), ("num_single_layers", params.depth_single_blocks),
                        ("attention_head_dim", head_dim), ("num_attention_heads", params.num_heads)):
        if name in config and config[name] != value:
            raise CheckpointError(
                f"{files.label}: config.json says {name} = {config[name]} but the weights have {value}; the download "
                "is incomplete or mixed. Download the transformer folder again."
            )
    return params


def load_dit(path: str | os.PathLike, *, device: torch.device, storage: Callable, attention: str,
             operations=CastOps) -> Step1XEdit:
    """Load a diffusers-layout Step1X-Edit transformer; ``storage(info)`` gives the per-key dtype function.
    Called by :func:`.loading.load_dit`, which documents the options."""
    files = open_component(path, TRANSFORMER)
    info = inspect_transformer(files)
    with torch.device("meta"):
        model = Step1XEdit(info.params, operations=operations)
    assign(model, files, dit_sources, storage(info), device, f"a Step1X-Edit {info.version} transformer")
    model.set_attention_backend(attention)
    log.info("loaded %s: Step1X-Edit %s (diffusers layout), stored %s", files.label, info.version, info.stored_dtype)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------- VAE


def inspect_vae(files: DiffusersFiles) -> AutoEncoderParams:
    """Check that ``files`` are the FLUX VAE in the ``AutoencoderKL`` layout and read its sizes."""
    keys, config, s = files.where, files.config, files.shape
    if any(k not in keys for k in _VAE_MARKERS):
        kind = "a transformer" if any(m in keys for m in _DIT_MARKERS) else "not a diffusers AutoencoderKL"
        raise CheckpointError(
            f"{files.label} is {kind}, not a VAE. Expected the FLUX VAE in the diffusers layout (vae/config.json "
            "and vae/diffusion_pytorch_model.safetensors of a Step1X-Edit or FLUX.1 model folder)."
        )
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys) or config.get("use_quant_conv"):
        raise CheckpointError(
            f"{files.label} has quant_conv layers, so it is an SD-style VAE, not the FLUX VAE Step1X-Edit needs"
        )
    try:
        z_channels = s("encoder.conv_out.weight")[0] // 2
        if z_channels != 16:
            raise CheckpointError(
                f"{files.label} is a {z_channels}-channel VAE (SD1.x/SDXL style); Step1X-Edit needs the 16-channel "
                "FLUX VAE."
            )
        ch = s("encoder.conv_in.weight")[0]
        levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
        widths = [s(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
        if any(w % ch for w in widths):
            raise CheckpointError(f"{files.label}: block widths {widths} are not multiples of {ch}")
        scale = float(config.get("scaling_factor", FLUX_VAE.scale_factor))
        shift = float(config.get("shift_factor", FLUX_VAE.shift_factor) or 0.0)
        if (scale, shift) != (FLUX_VAE.scale_factor, FLUX_VAE.shift_factor):
            raise CheckpointError(
                f"{files.label} has scaling_factor {scale} and shift_factor {shift}, not the FLUX VAE's "
                f"{FLUX_VAE.scale_factor} and {FLUX_VAE.shift_factor} (e.g. it is the SD3 VAE). Step1X-Edit needs "
                "the FLUX VAE: vae/ of a Step1X-Edit or FLUX.1 model folder."
            )
        if config.get("mid_block_add_attention") is False:
            raise CheckpointError(f"{files.label} has no mid-block attention; the FLUX VAE has one")
        return AutoEncoderParams(
            in_channels=s("encoder.conv_in.weight")[1], ch=ch, out_ch=s("decoder.conv_out.weight")[0],
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=_count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
            z_channels=z_channels, scale_factor=scale, shift_factor=shift,
            norm_groups=int(config.get("norm_num_groups", FLUX_VAE.norm_groups)),
        )
    except KeyError as exc:
        raise CheckpointError(
            f"{files.label} looks like a diffusers VAE but lacks {exc.args[0]!r}; the file is incomplete. Download "
            "the vae folder again."
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{files.label}: inconsistent VAE shapes or config ({exc})") from None


def _vae_alias(name: str) -> str | None:
    for new, old in _VAE_ATTN_LEGACY.items():
        marker = f".attentions.0.{new}."
        if marker in name:
            return name.replace(marker, f".attentions.0.{old}.")
    return None


def load_vae(path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype, operations=CastOps) -> AutoEncoder:
    """Load the FLUX VAE from a diffusers ``AutoencoderKL`` folder or file (see :func:`.loading.load_vae`)."""
    files = open_component(path, VAE)
    params = inspect_vae(files)
    with torch.device("meta"):
        vae = AutoEncoder(params, operations=operations)
    levels = len(params.ch_mult)
    assign(vae, files, lambda key: vae_sources(key, levels), lambda key: dtype, device, "the FLUX VAE",
           alias=_vae_alias)
    return vae.eval().requires_grad_(False)

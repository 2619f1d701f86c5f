"""Loading the Step1X-Edit DiT and the FLUX VAE from single .safetensors files, or from diffusers-layout
model folders (:mod:`.diffusers_layout`; ``load_dit``/``load_vae`` take either).

Models are built on the meta device and the checkpoint tensors are assigned into them one by one, so
memory never holds two copies. The file decides the architecture: the version (v1.0 has
``connector.scale_factor``, v1.2 has ``text_token_mapping``, v1.1 neither), the sizes (from tensor shapes)
and the stored dtype. A file of the wrong kind fails with an error that says what it is and what was expected.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.attention import select_backend
from ..models.autoencoder import AutoEncoder
from ..models.configs import STEP1X_EDIT, AutoEncoderParams, ConnectorParams, DiTParams
from ..models.model import Step1XEdit
from ..models.ops import FP8_DTYPES, CastOps
from .assign import check_file, declared_tensors, load_state
from .assign import unloaded_tensors as unloaded_tensors  # imported from here by callers and tests
from .gguf_file import is_gguf
from .safetensors_file import DTYPES, CheckpointError, Header, open_tensors, read_header

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "step1x_config"
STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "vae.")

WEIGHT_DTYPES = {
    "default": None,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

_BLOCK_LINEAR = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))\.weight$"
)
"""Weights that may be stored in fp8: the large matrices of the transformer blocks. Everything else
(norm scales, biases, the embedders, the final layer and the connector) stays in compute precision."""

_KNOWN_AXES = {128: (16, 56, 56), 16: (4, 6, 6)}
"""RoPE axes per head dim when a file carries no config: the released model and the tiny test model."""


@dataclass(frozen=True)
class DiTFileInfo:
    path: Path
    params: DiTParams
    stored_dtype: torch.dtype
    prefix: str

    @property
    def version(self) -> str:
        return self.params.version


# ------------------------------------------------------------------------------------------ inspection


def _strip_prefix(keys) -> str:
    for prefix in STRIP_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def describe(header: Header) -> str:
    """A short guess of what a checkpoint is, for error messages."""
    keys = set(header.tensors)
    prefix = _strip_prefix(keys)
    keys = {k[len(prefix):] if k.startswith(prefix) else k for k in keys}
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        if any(k.startswith("connector.") for k in keys):
            return "a Step1X-Edit DiT"
        if "guidance_in.in_layer.weight" in keys:
            return "a FLUX.1-dev style DiT (no Step1X connector)"
        return "a FLUX-style DiT without the Step1X connector (e.g. FLUX.1-schnell or Kontext)"
    if "encoder.conv_in.weight" in keys or "decoder.conv_in.weight" in keys:
        return "a VAE"
    if any(k.startswith(("model.layers.", "model.language_model.", "language_model.")) for k in keys):
        return "a language model (text encoder)"
    if any(k.startswith(("visual.", "model.visual.")) for k in keys):
        return "a vision-language model"
    if any("transformer_blocks" in k for k in keys):
        return "a diffusers-format transformer (load its model folder, or its transformer/ folder, instead)"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised model (first keys: {sample})"


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(ids) + 1 if ids else 0


def _shape(header: Header, prefix: str, key: str) -> tuple[int, ...]:
    return header.tensors[prefix + key].shape


def inspect_dit(path: str | os.PathLike) -> DiTFileInfo:
    """Check that ``path`` (a file, a ``.gguf`` file, or a diffusers-layout folder) is a Step1X-Edit DiT and
    read its architecture, version and dtype."""
    if is_gguf(path):
        from .gguf_loading import inspect_gguf_dit

        return inspect_gguf_dit(path)
    from . import diffusers_layout

    if diffusers_layout.is_diffusers_dit(path):
        return diffusers_layout.inspect_transformer(diffusers_layout.open_component(path, diffusers_layout.TRANSFORMER))
    return _inspect_dit(read_header(path))


def _inspect_dit(header: Header) -> DiTFileInfo:
    keys = set(header.tensors)
    prefix = _strip_prefix(keys)
    required = ("img_in.weight", "double_blocks.0.img_attn.qkv.weight", "connector.S.input_embedder.weight")
    if any(prefix + k not in keys for k in required):
        raise CheckpointError(
            f"{header.path.name} is {describe(header)}, not a Step1X-Edit DiT. Expected the Step1X-Edit "
            "checkpoint (step1x-edit-i1258.safetensors for v1.0 or step1x-edit-v1p1-official.safetensors for "
            "v1.1, or an fp8 conversion of one), which has double_blocks.*, single_blocks.* and connector.* keys."
        )
    params = _dit_params(header, prefix)
    block_dtypes = Counter(header.tensors[k].dtype for k in keys if _BLOCK_LINEAR.match(k[len(prefix):]))
    if not block_dtypes:
        raise CheckpointError(f"{header.path.name} has no transformer block weights; the file is incomplete")
    stored = DTYPES.get(block_dtypes.most_common(1)[0][0])
    if stored is None:
        raise CheckpointError(
            f"{header.path.name} stores its weights as {block_dtypes.most_common(1)[0][0]}, which this torch "
            "cannot read; update torch or use a bf16/fp8 file"
        )
    return DiTFileInfo(header.path, params, stored, prefix)


def _config_from_metadata(header: Header, params_cls):
    """The config a file carries in its metadata (tiny and custom models), or None for the released files."""
    meta = header.metadata.get(CONFIG_METADATA_KEY)
    if not meta:
        return None
    try:
        return params_cls.from_dict(json.loads(meta))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{header.path.name}: its {CONFIG_METADATA_KEY} metadata is invalid ({exc})") from None


def _dit_params(header: Header, prefix: str) -> DiTParams:
    stored = _config_from_metadata(header, DiTParams)
    if stored is not None:
        return stored
    keys = [k[len(prefix):] for k in header.tensors if k.startswith(prefix)]
    s = lambda key: _shape(header, prefix, key)  # noqa: E731
    try:
        hidden, in_channels = s("img_in.weight")
        head_dim = s("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        conn_hidden, conn_in = s("connector.S.input_embedder.weight")
        conn_mlp = s("connector.S.individual_token_refiner.blocks.0.mlp.fc1.weight")[0]
        axes = _KNOWN_AXES.get(head_dim)
        if axes is None:
            raise CheckpointError(
                f"{header.path.name}: head dim {head_dim} is not one of the known Step1X-Edit sizes and the file "
                f"carries no '{CONFIG_METADATA_KEY}' metadata, so its RoPE axes are unknown"
            )
        connector = ConnectorParams(
            in_channels=conn_in,
            hidden_size=conn_hidden,
            num_heads=max(1, conn_hidden // 128) if conn_hidden >= 128 else max(1, conn_hidden // 16),
            depth=_count(keys, r"connector\.S\.individual_token_refiner\.blocks\.(\d+)\."),
            mlp_ratio=conn_mlp / conn_hidden,
            global_out=s("connector.global_proj_out.weight")[0],
            has_scale_factor="connector.scale_factor" in keys,
        )
        mapping = "text_token_mapping.weight" in keys
        if mapping and s("text_token_mapping.weight") != (conn_hidden, conn_in):
            found = list(s("text_token_mapping.weight"))
            raise CheckpointError(f"{header.path.name}: text_token_mapping.weight is {found} but the connector maps "
                                  f"{conn_in} -> {conn_hidden}")
        return DiTParams(
            in_channels=in_channels,
            out_channels=s("final_layer.linear.weight")[0],
            vec_in_dim=s("vector_in.in_layer.weight")[1],
            context_in_dim=s("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_ratio=s("double_blocks.0.img_mlp.0.weight")[0] / hidden,
            num_heads=hidden // head_dim,
            depth=_count(keys, r"double_blocks\.(\d+)\."),
            depth_single_blocks=_count(keys, r"single_blocks\.(\d+)\."),
            axes_dim=axes,
            theta=STEP1X_EDIT.theta,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in keys,
            connector=connector,
            text_token_mapping=mapping,
        )
    except KeyError as exc:
        raise CheckpointError(
            f"{header.path.name} looks like a Step1X-Edit DiT but lacks {exc.args[0]!r}; the file is incomplete or "
            "from an unsupported conversion. Download the official file again."
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{header.path.name}: inconsistent tensor shapes ({exc})") from None


# ---------------------------------------------------------------------------------------------- dtypes


def weight_dtype_for(name: str) -> torch.dtype | None:
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {name!r}; choose one of {list(WEIGHT_DTYPES)}")
    dtype = WEIGHT_DTYPES[name]
    if name.startswith("fp8") and dtype is None:
        raise ValueError(f"weight dtype {name!r} needs torch >= 2.1 with float8 support")
    return dtype


def storage_dtype(key: str, stored: torch.dtype, compute: torch.dtype, weight: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is kept in: block matrices in ``weight`` (or as stored when that is fp8 and no
    override is given), everything else in ``compute``."""
    if _BLOCK_LINEAR.match(key):
        if weight is not None:
            return weight
        return stored if stored in FP8_DTYPES else compute
    return compute


def cast_model(model: torch.nn.Module, compute_dtype: torch.dtype, weight_dtype: str = "default") -> torch.nn.Module:
    """Apply the storage policy of :func:`load_dit` to a model already in memory, in place."""
    weight = weight_dtype_for(weight_dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            target = storage_dtype(name, param.dtype, compute_dtype, weight)
            if param.dtype != target:
                param.data = param.data.to(target)
    return model


# --------------------------------------------------------------------------------------------- loading


def _assign(model: torch.nn.Module, header: Header, prefix: str, dtype_of, device: torch.device) -> None:
    """Read every tensor of the model from the file (under ``prefix``) as ``dtype_of(key)`` onto ``device``.

    The file is checked against the tensors the model declares (lazy layers included) before anything is
    read; a model whose layers then refuse a tensor is a fault of those layers, not of the file."""
    expected = declared_tensors(model)
    present = {k[len(prefix):]: k for k in header.tensors if k.startswith(prefix)}
    check_file(header.path.name, expected, {k: tuple(header.tensors[full].shape) for k, full in present.items()},
               ignored=(".scale_weight", "scaled_fp8"))
    state = {}
    with open_tensors(header.path) as f:
        for key in sorted(expected):
            full = present[key]
            tensor = f.get_tensor(full)
            scale_key = full[: -len("weight")] + "scale_weight" if full.endswith(".weight") else None
            if scale_key and scale_key in header.tensors:
                tensor = tensor.float() * f.get_tensor(scale_key).float()
            state[key] = tensor.to(device=device, dtype=dtype_of(key))
            del tensor
    load_state(model, state, header.path.name)


def load_dit(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.bfloat16,
    weight_dtype: str = "default",
    attention: str = "auto",
    operations=CastOps,
) -> Step1XEdit:
    """Load a Step1X-Edit DiT (v1.0, v1.1 or v1.2, any stored dtype) onto ``device`` from a single file or a
    diffusers-layout model folder (its ``transformer/`` folder, shard index or weight file also work).

    ``weight_dtype`` sets how the large block matrices are kept: "default" keeps plain fp8 files in fp8 and
    everything else in ``compute_dtype``; "fp8_e4m3fn"/"fp8_e5m2" cast them to fp8 (about half the memory
    of bf16); they are upcast per layer at compute time. A scaled-fp8 file (``*.scale_weight`` tensors) is
    dequantised with its scales; "default" then keeps it in ``compute_dtype``, because storing the
    dequantised values as fp8 again, without their scale, would lose more than a plain fp8 cast.
    ``attention`` picks the attention backend. A ``.gguf`` file keeps its quantised block weights quantised
    (:mod:`step1x.checkpoints.gguf_loading`)."""
    if is_gguf(path):
        from .gguf_loading import load_gguf_dit

        return load_gguf_dit(path, device=device, compute_dtype=compute_dtype, weight_dtype=weight_dtype,
                             attention=attention, operations=operations)
    select_backend(attention)  # an unavailable backend fails before any weights are read
    from . import diffusers_layout

    if diffusers_layout.is_diffusers_dit(path):
        weight = weight_dtype_for(weight_dtype)
        return diffusers_layout.load_dit(
            path, device=torch.device(device), attention=attention, operations=operations,
            storage=lambda info: lambda key: storage_dtype(key, info.stored_dtype, compute_dtype, weight),
        )
    header = read_header(path)
    info = _inspect_dit(header)
    weight = weight_dtype_for(weight_dtype)
    stored = info.stored_dtype
    if weight is None and any(k.endswith(".scale_weight") for k in header.tensors):
        stored = compute_dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = Step1XEdit(info.params, operations=operations)
    _assign(
        model, header, info.prefix, lambda key: storage_dtype(key, stored, compute_dtype, weight), device
    )
    model.set_attention_backend(attention)
    log.info("loaded %s: Step1X-Edit %s, stored %s", info.path.name, info.version, info.stored_dtype)
    return model.eval().requires_grad_(False)


def inspect_vae(path: str | os.PathLike) -> tuple[Header, str, AutoEncoderParams]:
    header = read_header(path)
    keys = set(header.tensors)
    prefix = _strip_prefix(keys)
    if prefix + "encoder.conv_in.weight" not in keys or prefix + "decoder.conv_in.weight" not in keys:
        raise CheckpointError(
            f"{header.path.name} is {describe(header)}, not a VAE. Expected the FLUX VAE: Step1X-Edit's "
            "vae.safetensors or FLUX's ae.safetensors."
        )
    return header, prefix, _vae_params(header, prefix)


def _vae_params(header: Header, prefix: str) -> AutoEncoderParams:
    stored = _config_from_metadata(header, AutoEncoderParams)
    if stored is not None:
        return stored
    s = lambda key: _shape(header, prefix, key)  # noqa: E731
    try:
        z_channels = s("encoder.conv_out.weight")[0] // 2
        if z_channels != 16:
            raise CheckpointError(
                f"{header.path.name} is a {z_channels}-channel VAE (SD1.x/SDXL style); Step1X-Edit needs the "
                "16-channel FLUX VAE (vae.safetensors from Step1X-Edit or ae.safetensors from FLUX)."
            )
        ch = s("encoder.conv_in.weight")[0]
        levels = _count(header.tensors, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
        mult = tuple(s(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
        res_blocks = _count(header.tensors, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
        return AutoEncoderParams(
            in_channels=s("encoder.conv_in.weight")[1], ch=ch, out_ch=s("decoder.conv_out.weight")[0],
            ch_mult=mult, num_res_blocks=res_blocks, z_channels=z_channels,
        )
    except KeyError as exc:
        raise CheckpointError(
            f"{header.path.name} looks like a VAE but lacks {exc.args[0]!r}; the file is incomplete or from an "
            "unsupported conversion. Download vae.safetensors (Step1X-Edit) or ae.safetensors (FLUX) again."
        ) from None


def vae_params(path: str | os.PathLike) -> AutoEncoderParams:
    """The sizes of the FLUX VAE at ``path`` in either layout (a file, or a diffusers ``vae/`` folder or the model
    folder holding it), read from headers and config alone: a file that is not that VAE is an error naming it."""
    from . import diffusers_layout

    if diffusers_layout.is_diffusers_vae(path):
        return diffusers_layout.inspect_vae(diffusers_layout.open_component(path, diffusers_layout.VAE))
    return inspect_vae(path)[2]


def load_vae(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             operations=CastOps) -> AutoEncoder:
    """Load the FLUX VAE (Step1X-Edit ``vae.safetensors`` or FLUX ``ae.safetensors``; same keys), or its
    diffusers ``AutoencoderKL`` layout (a model folder with ``vae/``, the ``vae/`` folder or its weight file)."""
    from . import diffusers_layout

    if diffusers_layout.is_diffusers_vae(path):
        return diffusers_layout.load_vae(path, device=torch.device(device), dtype=dtype, operations=operations)
    header, prefix, params = inspect_vae(path)
    with torch.device("meta"):
        vae = AutoEncoder(params, operations=operations)
    _assign(vae, header, prefix, lambda key: dtype, torch.device(device))
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- saving


def save_with_config(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     params: DiTParams | AutoEncoderParams) -> None:
    """Write a checkpoint with its config in the metadata (for sizes whose config cannot be inferred)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(params.to_dict())})

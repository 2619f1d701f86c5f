"""Loaders for the three models: the DiT (with its connector), the MLLM instruction encoder and the VAE. Each
also lists diffusers-layout model folders (see :mod:`.model_lists`)."""

from __future__ import annotations

import logging

import torch

from ..step1x import encoder as encoder_library  # imported with the nodes, so its errors get the pack's names
from ..step1x.checkpoints.loading import load_dit, load_vae
from ..step1x.checkpoints.model_files import dit_version_beside
from ..step1x.checkpoints.safetensors_file import CheckpointError
from ..step1x.encoder.loader import TOKENIZER_DIRS, text_encoder_path
from ..step1x.encoder.tokens import has_tokenizer_files
from ..step1x.models.attention import backend_names
from ..step1x.models.speed import apply_speed_options
from . import _comfy as bridge
from .model_lists import dit_choices, find, mllm_choices, vae_choices
from .sockets import CATEGORY, DIT, LAYOUT_V11, LAYOUT_V12, MLLM, DiT, Mllm
from .vae import Step1XVAE

log = logging.getLogger("step1x_edit")

DIT_WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e5m2", "bf16"]
MLLM_DTYPES = {"bf16": (torch.bfloat16, False, False), "fp16": (torch.float16, False, False),
               "fp32": (torch.float32, False, False), "bf16 + fp8 weights": (torch.bfloat16, True, False),
               "bf16, quantized to fp8": (torch.bfloat16, True, True)}
"""Compute dtype; whether an fp8_scaled file keeps its Linear weights in float8; whether a full-precision file
has its block Linear weights quantised to float8."""


class DiTLoader:
    DESCRIPTION = ("Loads the Step1X-Edit DiT (v1.0 step1x-edit-i1258 or v1.1 step1x-edit-v1p1-official, an fp8 "
                   "conversion, or a GGUF file: Q8_0 ... Q2_K; or a diffusers-layout model folder such as "
                   "Step1X-Edit-v1p2 or Step1X-Edit-v1p1-diffusers) from models/diffusion_models. The version is "
                   "read from the weights. Its connector is used by the Connector node.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Step1X-Edit transformer and connector, managed by ComfyUI's model management.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (dit_choices(), {"tooltip": (
                "The Step1X-Edit DiT in models/diffusion_models (or models/unet): a .safetensors or .gguf file "
                "(made with `python -m step1x quantize`, or a ComfyUI-GGUF style file), a diffusers-layout model "
                "folder (Step1X-Edit-v1p2 with transformer/, vae/, text_encoder/), or a lone transformer folder.")}),
            "weight_dtype": (DIT_WEIGHT_DTYPES, {"default": "default", "tooltip": (
                "How the large block weights are kept in memory. default: as stored (fp8 files stay fp8, GGUF "
                "files stay quantised, others in the compute dtype). fp8_e4m3fn / fp8_e5m2: about half the memory "
                "of bf16, slightly lower quality. bf16: full quality (a GGUF file is dequantised once at load).")}),
            "attention": (backend_names(), {"default": "auto", "tooltip": (
                "Attention kernel. auto picks flash-attn or xformers when installed and suitable, else PyTorch "
                "SDPA. Choosing a package that is not installed fails with an install hint.")}),
        }, "optional": {
            "fp8_matmul": ("BOOLEAN", {"default": False, "tooltip": (
                "Multiply the block weights in fp8 (torch._scaled_mm, a scale per token) instead of upcasting "
                "them on every call. Needs float8_e4m3fn block weights (an fp8 file, or weight_dtype fp8_e4m3fn) "
                "and a GPU with fp8 units (Ada, Hopper: compute capability 8.9+). Faster there, slightly "
                "different results; refused for bf16 or GGUF weights.")}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": (
                "Run each transformer block through torch.compile. The first step of each new image size waits "
                "for the compiler (tens of seconds); later steps are faster. Same results within rounding.")}),
        }}

    def load(self, unet_name, weight_dtype, attention, fp8_matmul=False, compile=False):
        model, dtype, load_device, offload_device = load_dit_from_widgets(unet_name, weight_dtype, attention,
                                                                          fp8_matmul, compile)
        return (DiT(bridge.manage(model, load_device, offload_device), dtype, unet_name),)


def load_dit_from_widgets(unet_name, weight_dtype, attention, fp8_matmul=False, compile=False):
    """The DiT the loader widgets (:meth:`DiTLoader.INPUT_TYPES`) name, on ComfyUI's offload device with the speed
    settings applied: ``(model, compute dtype, load device, offload device)``. The DiT Loader and the native Model
    Loader both load through it."""
    path = find(("diffusion_models",), unet_name)
    load_device, offload_device = bridge.dit_devices()
    dtype = bridge.compute_dtype(load_device)
    model = load_dit(path, device=offload_device, compute_dtype=dtype, weight_dtype=weight_dtype,
                     attention=attention, operations=bridge.operations())
    apply_speed_options(model, fp8_matmul=fp8_matmul, compile=compile, device=load_device)
    return model, dtype, load_device, offload_device


class MllmLoader:
    DESCRIPTION = ("Loads the Qwen2.5-VL instruction encoder: a Qwen2.5-VL-7B-Instruct folder or a single ComfyUI "
                   "text encoder file (qwen_2.5_vl_7b*.safetensors) from models/text_encoders, or the text_encoder/ "
                   "of a diffusers-layout model folder (Step1X-Edit-v1p2 ships its own fine-tuned Qwen2.5-VL, which "
                   "v1.2 needs). From a model folder it also reads which encoder layout its DiT takes.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MLLM,)
    RETURN_NAMES = ("MLLM",)
    OUTPUT_TOOLTIPS = ("The multimodal instruction encoder, managed by ComfyUI's model management.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mllm_name": (mllm_choices(), {"tooltip": (
                "A Qwen2.5-VL-7B-Instruct folder (config.json + safetensors shards) or a single .safetensors file "
                "in models/text_encoders (or models/clip), or a diffusers-layout model folder (its text_encoder/) "
                "in models/text_encoders or models/diffusion_models. A single file uses the tokenizer ComfyUI "
                "ships. For Step1X-Edit v1.2 pick the v1.2 model folder.")}),
            "dtype": (list(MLLM_DTYPES), {"default": "bf16", "tooltip": (
                "Compute dtype. bf16 is what the official code uses; fp32 doubles the memory; fp16 may overflow. "
                "'bf16 + fp8 weights' keeps the Linear weights of an fp8_scaled file in fp8 (about 8.3 GB instead "
                "of 15.5 GB), dequantised layer by layer; other files load as bf16. 'bf16, quantized to fp8' also "
                "stores the block weights of a bf16 checkpoint (such as the v1.2 text_encoder) in fp8.")}),
            "device": (list(bridge.TEXT_ENCODER_DEVICES), {"default": "default", "tooltip": (
                "Where the encoder runs. default: ComfyUI's choice for text encoders (the CPU under --lowvram, "
                "--novram and --cpu). other_gpu: a second GPU, so the DiT keeps the main one.")}),
        }, "optional": {
            "lm_head": ("BOOLEAN", {"default": False, "tooltip": (
                "Keep the language-model head so the encoder can also write text: needed by the Think, Reflect "
                "and Reason Edit nodes (Step1X-Edit v1.2). Costs about 1.1 GB more for the 7B model; off for plain "
                "encoding.")}),
        }}

    def load(self, mllm_name, dtype, device, lm_head=False):
        path = find(("text_encoders", "diffusion_models"), mllm_name)
        source = text_encoder_path(path)
        folder = source if source.is_dir() else source.parent
        own = has_tokenizer_files(folder) or (source.name == "text_encoder" and any(
            has_tokenizer_files(source.parent / sub) for sub in TOKENIZER_DIRS))
        tokenizer = None if own else bridge.default_tokenizer_dir()
        load_device, offload_device = bridge.text_encoder_devices(device)
        compute, keep_fp8, quantize = MLLM_DTYPES[dtype]
        encoder = encoder_library.load_text_encoder(path, tokenizer_dir=tokenizer, device=offload_device,
                                                    dtype=compute, keep_fp8=keep_fp8, quantize_fp8=quantize,
                                                    generation=lm_head)
        patcher = bridge.manage(encoder.model, load_device, offload_device)
        return (Mllm(patcher, encoder, mllm_name, layout=learned_layout(path)),)


def learned_layout(path) -> str | None:
    """The encoder layout the DiT of the model folder ``path`` comes from takes, read from that DiT's weights
    (v1.2, or v1.0/v1.1); None when the encoder is not part of a model folder with a transformer."""
    try:
        version = dit_version_beside(path)
    except CheckpointError as exc:
        log.warning("Step1X-Edit: the transformer beside %s cannot be read (%s); Instruction Encode's layout 'auto' "
                    "will take v1.0-v1.1", path, exc)
        return None
    if version is None:
        return None
    return LAYOUT_V12 if version == "v1.2" else LAYOUT_V11


class VaeLoader:
    DESCRIPTION = ("Loads the FLUX VAE (Step1X-Edit's vae.safetensors or FLUX's ae.safetensors) from models/vae, "
                   "or the vae/ of a diffusers-layout model folder. ComfyUI's own Load VAE with ae.safetensors works "
                   "in its place.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("VAE",)
    OUTPUT_TOOLTIPS = ("A ComfyUI VAE: it also plugs into the built-in VAE Decode and VAE Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (vae_choices(), {
                "tooltip": ("The 16-channel FLUX VAE in models/vae: Step1X-Edit's vae.safetensors (e.g. saved as "
                            "step1x-edit-vae.safetensors), FLUX's ae.safetensors or a diffusers vae folder; or the "
                            "vae of a model folder in models/diffusion_models (Step1X-Edit-v1p2/vae).")}),
        }}

    def load(self, vae_name):
        path = find(("vae", "diffusion_models"), vae_name)
        load_device, offload_device = bridge.vae_devices()
        autoencoder = load_vae(path, device=offload_device, dtype=torch.float32, operations=bridge.operations())
        return (Step1XVAE(autoencoder, bridge.manage(autoencoder, load_device, offload_device), vae_name),)

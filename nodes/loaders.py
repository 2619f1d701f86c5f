"""Loaders for the three models: the DiT (with its connector), the MLLM instruction encoder and the VAE."""

from __future__ import annotations

import torch

from ..step1x import encoder as encoder_library  # imported with the nodes, so its errors get the pack's names
from ..step1x.checkpoints.loading import load_dit, load_vae
from ..step1x.encoder.tokens import has_tokenizer_files
from ..step1x.models.attention import backend_names
from . import _comfy as bridge
from .sockets import CATEGORY, DIT, MLLM, DiT, Mllm
from .vae import Step1XVAE

DIT_WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e5m2", "bf16"]
MLLM_DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
               "bf16 + fp8 weights": (torch.bfloat16, True)}
"""Compute dtype, and whether an fp8_scaled file keeps its Linear weights in float8."""


class DiTLoader:
    DESCRIPTION = ("Loads the Step1X-Edit DiT (v1.0 step1x-edit-i1258 or v1.1 step1x-edit-v1p1-official, an fp8 "
                   "conversion, or a GGUF file: Q8_0 ... Q2_K) from models/diffusion_models. Its connector is used by "
                   "the Connector node.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Step1X-Edit transformer and connector, managed by ComfyUI's model management.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (dit_choices(), {
                "tooltip": ("The Step1X-Edit DiT file in models/diffusion_models (or models/unet): .safetensors or "
                            ".gguf (made with `python -m step1x quantize`, or a ComfyUI-GGUF style file).")}),
            "weight_dtype": (DIT_WEIGHT_DTYPES, {"default": "default", "tooltip": (
                "How the large block weights are kept in memory. default: as stored (fp8 files stay fp8, GGUF "
                "files stay quantised, others in the compute dtype). fp8_e4m3fn / fp8_e5m2: about half the memory "
                "of bf16, slightly lower quality. bf16: full quality (a GGUF file is dequantised once at load).")}),
            "attention": (backend_names(), {"default": "auto", "tooltip": (
                "Attention kernel. auto picks flash-attn or xformers when installed and suitable, else PyTorch "
                "SDPA. Choosing a package that is not installed fails with an install hint.")}),
        }}

    def load(self, unet_name, weight_dtype, attention):
        path = bridge.model_path("diffusion_models", unet_name)
        load_device, offload_device = bridge.dit_devices()
        dtype = bridge.compute_dtype(load_device)
        model = load_dit(path, device=offload_device, compute_dtype=dtype, weight_dtype=weight_dtype,
                         attention=attention, operations=bridge.operations())
        return (DiT(bridge.manage(model, load_device, offload_device), dtype, unet_name),)


def dit_choices() -> list[str]:
    """The DiT files: what ComfyUI lists for models/diffusion_models, and the GGUF files there."""
    return sorted(set(bridge.model_files("diffusion_models")) | set(bridge.gguf_files("diffusion_models")))


class MllmLoader:
    DESCRIPTION = ("Loads the Qwen2.5-VL-7B-Instruct instruction encoder: a Hugging Face folder or a single "
                   "ComfyUI text encoder file (qwen_2.5_vl_7b*.safetensors) from models/text_encoders.")
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
                "in models/text_encoders (or models/clip). A single file uses the tokenizer ComfyUI ships.")}),
            "dtype": (list(MLLM_DTYPES), {"default": "bf16", "tooltip": (
                "Compute dtype. bf16 is what the official code uses; fp32 doubles the memory; fp16 may overflow. "
                "'bf16 + fp8 weights' keeps the Linear weights of an fp8_scaled file in fp8 (about 8.3 GB instead "
                "of 15.5 GB), dequantised layer by layer; other files load as bf16.")}),
            "device": (list(bridge.TEXT_ENCODER_DEVICES), {"default": "default", "tooltip": (
                "Where the encoder runs. default: ComfyUI's choice for text encoders (the CPU under --lowvram, "
                "--novram and --cpu). other_gpu: a second GPU, so the DiT keeps the main one.")}),
        }}

    def load(self, mllm_name, dtype, device):
        path = bridge.model_path("text_encoders", mllm_name)
        folder = path if path.is_dir() else path.parent
        tokenizer = None if has_tokenizer_files(folder) else bridge.default_tokenizer_dir()
        load_device, offload_device = bridge.text_encoder_devices(device)
        compute, keep_fp8 = MLLM_DTYPES[dtype]
        encoder = encoder_library.load_text_encoder(path, tokenizer_dir=tokenizer, device=offload_device,
                                                    dtype=compute, keep_fp8=keep_fp8)
        return (Mllm(bridge.manage(encoder.model, load_device, offload_device), encoder, mllm_name),)


def mllm_choices() -> list[str]:
    """Hugging Face folders, and single files that are not part of such a folder."""
    folders = bridge.hf_folders("text_encoders")
    files = [f for f in bridge.model_files("text_encoders")
             if f.endswith(".safetensors") and not any(f.startswith(d + "/") for d in folders)]
    return folders + files


class VaeLoader:
    DESCRIPTION = ("Loads the FLUX VAE (Step1X-Edit's vae.safetensors or FLUX's ae.safetensors) from models/vae. "
                   "ComfyUI's own Load VAE with ae.safetensors works in its place.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("VAE",)
    OUTPUT_TOOLTIPS = ("A ComfyUI VAE: it also plugs into the built-in VAE Decode and VAE Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (bridge.model_files("vae"), {
                "tooltip": ("The 16-channel FLUX VAE in models/vae: Step1X-Edit's vae.safetensors (e.g. saved as "
                            "step1x-edit-vae.safetensors) or FLUX's ae.safetensors.")}),
        }}

    def load(self, vae_name):
        path = bridge.model_path("vae", vae_name)
        load_device, offload_device = bridge.vae_devices()
        autoencoder = load_vae(path, device=offload_device, dtype=torch.float32, operations=bridge.operations())
        return (Step1XVAE(autoencoder, bridge.manage(autoencoder, load_device, offload_device), vae_name),)

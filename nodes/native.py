"""The native path: Step1X-Edit as ComfyUI's MODEL and CONDITIONING, for KSampler, SamplerCustomAdvanced,
ReferenceLatent, LoraLoaderModelOnly and ComfyUI's other model and conditioning nodes.

The ComfyUI-facing model lives in :mod:`._native`, imported when a node runs (it needs ComfyUI); the encode
and sigmas nodes are plain tensors and run anywhere.
"""

from __future__ import annotations

import torch

from ..step1x import stepwise
from ..step1x.checkpoints.loading import inspect_dit, load_dit
from ..step1x.graph_io import DOWNSCALE, check_latent, resize_images
from ..step1x.models.attention import backend_names
from ..step1x.sampling.denoise import LATENT_CHANNELS, TextConditioning
from . import _comfy as bridge
from .conditioning import InstructionEncode
from .loaders import DIT_WEIGHT_DTYPES
from .sockets import CATEGORY, LAYOUT_V11, LAYOUT_V12, MLLM
from .vae import check_vae

CONDITIONING_KEYS = {"mask": "step1x_mask", "txt_ids": "step1x_txt_ids", "text_embeds": "step1x_text_embeds",
                     "text_mask": "step1x_text_mask"}
"""TextConditioning field -> entry of the CONDITIONING dict (the embedding itself is the tensor)."""


def _native():
    if not bridge.IN_COMFYUI:
        raise RuntimeError("the Step1X-Edit MODEL nodes run inside ComfyUI only; outside it use the Step1X-Edit "
                           "Sampler (or step1x.pipeline)")
    from . import _native

    return _native


class ModelLoader:
    DESCRIPTION = ("Loads the Step1X-Edit DiT (with its connector) as a ComfyUI MODEL, for KSampler, "
                   "SamplerCustomAdvanced, LoraLoaderModelOnly and ComfyUI's model patches. The model carries the "
                   "official guidance (CFG renorm at 0.93) and the schedule shift of a 512x512 image; Step1X-Edit "
                   "Model Sampling sets the shift for your latent. Same files as the DiT Loader.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Step1X-Edit as a ComfyUI flow model; its conditioning comes from Step1X-Edit Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (bridge.model_files("diffusion_models"), {
                "tooltip": "The Step1X-Edit DiT file in models/diffusion_models (or models/unet)."}),
            "weight_dtype": (DIT_WEIGHT_DTYPES, {"default": "default", "tooltip": (
                "How the large block weights are kept in memory. default: as stored (fp8 files stay fp8, others "
                "in the compute dtype). fp8_e4m3fn / fp8_e5m2: about half the memory of bf16. bf16: full quality.")}),
            "attention": (backend_names(), {"default": "auto", "tooltip": (
                "Attention kernel. auto picks flash-attn or xformers when installed and suitable, else PyTorch "
                "SDPA.")}),
        }}

    def load(self, unet_name, weight_dtype, attention):
        native = _native()
        path = bridge.model_path("diffusion_models", unet_name)
        if inspect_dit(path).version == "v1.2":
            raise ValueError(f"{unet_name} is Step1X-Edit v1.2, which the native MODEL path does not run (it takes "
                             "the official v1.0/v1.1 sampler apart); load it with the Step1X-Edit DiT Loader and "
                             "use the Step1X-Edit Sampler (workflows/step1x_v12_edit.json)")
        load_device, offload_device = bridge.dit_devices()
        dtype = bridge.compute_dtype(load_device)
        dit = load_dit(path, device=offload_device, compute_dtype=dtype, weight_dtype=weight_dtype,
                       attention=attention, operations=bridge.operations())
        return (native.native_model(dit, dtype, load_device, offload_device),)


class Encode:
    DESCRIPTION = ("Encodes the instruction and the negative prompt with the MLLM (the image resized to size_level, "
                   "as the official editor does) into ComfyUI CONDITIONING for a Step1X-Edit MODEL. With a VAE, the "
                   "image is also encoded at the working size: attached to both conditionings as the reference (as "
                   "ReferenceLatent attaches it) and returned as the latent to sample. Without an image it encodes "
                   "a text-to-image prompt (v1.1).")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = (
        "The instruction (with the reference latent when a VAE is connected).",
        "The negative prompt, with the same reference: the official negative side of guidance.",
        "The reference latent at the working size (the latent to sample, or to start img2img from); for "
        "text-to-image an empty size_level x size_level latent.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": (MLLM, {"tooltip": "The instruction encoder from the Step1X-Edit MLLM loader."}),
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "What to change, e.g. 'make the sky purple'. For text-to-image: the description of the image.")}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "The negative side of guidance. Editing officially uses an empty string.")}),
                "size_level": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16, "tooltip": (
                    "Working resolution: the image is resized to about size_level x size_level pixels at its aspect "
                    "ratio (sides multiples of 16); the result has this size.")}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to edit (original size). Leave empty for text-to-image."}),
                "vae": ("VAE", {"tooltip": (
                    "The FLUX VAE (Step1X-Edit VAE loader or Load VAE with ae.safetensors). Without it, attach the "
                    "reference yourself with ReferenceLatent.")}),
            },
        }

    def encode(self, mllm, instruction, negative_prompt, size_level, image=None, vae=None):
        if mllm.layout == LAYOUT_V12:
            raise ValueError(f"'{mllm.name}' is the text encoder of a Step1X-Edit v1.2 model folder, and the native "
                             "MODEL path runs v1.0/v1.1 only; for v1.2 use Instruction Encode, Connector and the "
                             "Step1X-Edit Sampler (workflows/step1x_v12_edit.json)")
        embeds = InstructionEncode().encode(mllm, instruction, negative_prompt, size_level, image, LAYOUT_V11)[0]
        reference = None
        if image is not None:
            width, height = embeds.working_size
            if vae is not None:
                check_vae(vae)
                reference = latent = vae.encode(resize_images(image, (width, height)))
            else:
                latent = torch.zeros(image.shape[0], LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE)
        else:
            side = size_level // 16 * 16 // DOWNSCALE
            latent = torch.zeros(1, LATENT_CHANNELS, side, side)
        edit = image is not None
        return (conditioning(embeds.cond, reference, edit), conditioning(embeds.uncond, reference, edit),
                {"samples": latent.to(bridge.intermediate_device())})


def conditioning(text: TextConditioning, reference: torch.Tensor | None, edit: bool) -> list:
    """One side of CFG as ComfyUI CONDITIONING: ``[[embedding, {entries}]]``."""
    entries = {key: getattr(text, field) for field, key in CONDITIONING_KEYS.items()
               if getattr(text, field) is not None}
    entries["step1x_edit"] = edit
    if reference is not None:
        entries["reference_latents"] = [reference]
    return [[text.llm_embedding, entries]]


class Sigmas:
    DESCRIPTION = ("The official Step1X-Edit schedule for the size of a latent, as SIGMAS for SamplerCustomAdvanced: "
                   "steps + 1 times from 1 to 0 with the resolution shift. denoise < 1 starts at the official img2img "
                   "step int((1 - denoise) * steps), as the Step1X-Edit Sampler does.")
    CATEGORY = CATEGORY
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("The official times (float32), one more than the steps that run.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "The latent to be sampled; only its size is used (the shift grows "
                                             "with it)."}),
            "steps": ("INT", {"default": 28, "min": 1, "max": 10000, "tooltip": "Denoising steps (official: 28)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "1.0 starts from noise. Lower values skip the first int((1 - denoise) * steps) steps (img2img).")}),
        }}

    def get_sigmas(self, latent, steps, denoise):
        samples = check_latent(latent, "latent")
        return (stepwise.official_sigmas(steps, samples.shape[-2], samples.shape[-1], denoise),)


class ModelSampling:
    DESCRIPTION = ("Sets the Step1X-Edit model's schedule shift for the size of a latent (the official shift grows "
                   "with the image token count), for KSampler's schedulers. With scheduler 'simple' KSampler then "
                   "steps through the official times.")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the schedule of this latent size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Step1X-Edit MODEL (Step1X-Edit Model Loader)."}),
            "latent": ("LATENT", {"tooltip": "The latent KSampler will sample; only its size is used."}),
        }}

    def patch(self, model, latent):
        samples = check_latent(latent, "latent")
        return (_native().with_schedule(model, samples.shape[-2], samples.shape[-1]),)


class CFGRenorm:
    DESCRIPTION = ("Sets the official CFG renorm of a Step1X-Edit MODEL: while the time is above the threshold, the "
                   "guidance difference is divided by max(|cond - uncond|, 1)^0.4 per token. The loader sets the "
                   "official 0.93; 1.0 turns it off (plain CFG, as the first release).")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this renorm threshold.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Step1X-Edit MODEL (Step1X-Edit Model Loader)."}),
            "renorm_threshold": ("FLOAT", {"default": 0.93, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "The time (1 = noise, 0 = image) above which the guidance is renormalised (official: 0.93; 1.0 "
                "turns it off).")}),
        }}

    def patch(self, model, renorm_threshold):
        if not 0.0 <= renorm_threshold <= 1.0:
            raise ValueError(f"renorm_threshold must be within [0, 1], got {renorm_threshold} (0.93 official, 1.0 off)")
        return (_native().with_guidance(model, renorm_threshold),)

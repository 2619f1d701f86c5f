"""The native path: Step1X-Edit as ComfyUI's MODEL and CONDITIONING, for KSampler, SamplerCustomAdvanced,
ReferenceLatent, LoraLoaderModelOnly and ComfyUI's other model and conditioning nodes.

The ComfyUI-facing model lives in :mod:`._native`, imported when a node runs (it needs ComfyUI); the encode
and sigmas nodes are plain tensors and run anywhere.
"""

from __future__ import annotations

import torch

from ..step1x import stepwise
from ..step1x.graph_io import DOWNSCALE, check_latent, resize_images
from ..step1x.sampling import v12
from ..step1x.sampling.calls import TextConditioning
from ..step1x.sampling.denoise import LATENT_CHANNELS
from ..step1x.sampling.rules import OFFICIAL
from . import _comfy as bridge
from .conditioning import InstructionEncode
from .loaders import DiTLoader, load_dit_from_widgets
from .sockets import CATEGORY, LAYOUT_V12
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
                   "SamplerCustomAdvanced, LoraLoaderModelOnly and ComfyUI's model patches: v1.0, v1.1 or v1.2, as a "
                   "file (safetensors, fp8, GGUF) or a diffusers-layout model folder (Step1X-Edit-v1p2). The model "
                   "samples by the rules its version was published with and carries that guidance (CFG renorm at "
                   "0.93; v1.2 renorms at every step) and the schedule shift of a 512x512 image; Step1X-Edit Model "
                   "Sampling sets the shift for your latent. Same files as the DiT Loader.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Step1X-Edit as a ComfyUI flow model; its conditioning comes from Step1X-Edit Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return DiTLoader.INPUT_TYPES()

    def load(self, unet_name, weight_dtype, attention, fp8_matmul=False, compile=False):
        native = _native()
        dit, dtype, load_device, offload_device = load_dit_from_widgets(unet_name, weight_dtype, attention,
                                                                        fp8_matmul, compile)
        return (native.native_model(dit, dtype, load_device, offload_device),)


class Encode:
    DESCRIPTION = ("Encodes the instruction and the negative prompt with the MLLM (the image resized to size_level, "
                   "as the official editor does) into ComfyUI CONDITIONING for a Step1X-Edit MODEL, in the layout of "
                   "the MLLM's model (v1.2 from a v1.2 model folder: text positions and the quote mask ride along). "
                   "With a VAE, the image is also encoded at the working size: attached to both conditionings as the "
                   "reference (as ReferenceLatent attaches it) and returned as the latent to sample. Without an image "
                   "it encodes a text-to-image prompt.")
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
        shared = InstructionEncode.INPUT_TYPES()
        size = shared["required"]["size_level"]
        return {
            "required": {**shared["required"], "size_level": (size[0], {**size[1], "tooltip": (
                "Working resolution: the image is resized to about size_level x size_level pixels at its aspect "
                "ratio (sides multiples of 16); the result has this size (v1.2 was published at 1024).")})},
            "optional": {
                "image": shared["optional"]["image"],
                "vae": ("VAE", {"tooltip": (
                    "The FLUX VAE (Step1X-Edit VAE loader or Load VAE with ae.safetensors). Without it, attach the "
                    "reference yourself with ReferenceLatent.")}),
            },
        }

    def encode(self, mllm, instruction, negative_prompt, size_level, image=None, vae=None):
        embeds = InstructionEncode().encode(mllm, instruction, negative_prompt, size_level, image)[0]
        is_v12 = embeds.layout == LAYOUT_V12
        reference = None
        if image is not None:
            width, height = embeds.working_size
            if vae is not None:
                check_vae(vae)
                reference = latent = reference_latent(vae, image, (width, height), is_v12)
            else:
                latent = torch.zeros(image.shape[0], LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE)
        else:
            side = size_level // 16 * 16 // DOWNSCALE
            latent = torch.zeros(1, LATENT_CHANNELS, side, side)
        edit = image is not None
        cond, uncond = (padded(s) if is_v12 else s for s in (embeds.cond, embeds.uncond))
        return (conditioning(cond, reference, edit), conditioning(uncond, reference, edit),
                {"samples": latent.to(bridge.intermediate_device())})


def reference_latent(vae, image: torch.Tensor, size: tuple[int, int], is_v12: bool) -> torch.Tensor:
    """The raw latent of ``image`` resized to ``size`` (width, height): LANCZOS as the official v1.0/v1.1 code
    resizes, or v1.2's antialiased bilinear resize of the VAE input. The VAE's mean (the Step1X-Edit Sampler
    draws v1.2's posterior sample from its seed; give it this latent as reference_latent for the same result)."""
    if not is_v12:
        return vae.encode(resize_images(image, size))
    pixels = v12.vae_input_pixels(image.movedim(-1, 1), size)
    return vae.encode(((pixels + 1) / 2).clamp(0, 1).movedim(1, -1))


def conditioning(text: TextConditioning, reference: torch.Tensor | None, edit: bool) -> list:
    """One side of CFG as ComfyUI CONDITIONING: ``[[embedding, {entries}]]``."""
    entries = {key: getattr(text, field) for field, key in CONDITIONING_KEYS.items()
               if getattr(text, field) is not None}
    entries["step1x_edit"] = edit
    if reference is not None:
        entries["reference_latents"] = [reference]
    return [[text.llm_embedding, entries]]


def padded(texts: list[TextConditioning]) -> TextConditioning:
    """v1.2's per-image conditionings (each trimmed to its tokens) as one batch padded with zeros to the longest;
    the model cuts every row back to its mask, so the padding never reaches the DiT."""
    length = max(t.llm_embedding.shape[1] for t in texts)

    def pad(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        grown = t.new_zeros((t.shape[0], length) + tuple(t.shape[2:]))
        grown[:, :t.shape[1]] = t
        return grown

    rows = [TextConditioning(*(pad(x) for x in (t.llm_embedding, t.mask, t._ids(), t.text_embeds, t.text_mask)))
            for t in texts]
    if len(rows) == 1:
        return rows[0]
    return TextConditioning(*(None if getattr(rows[0], f) is None else torch.cat([getattr(r, f) for r in rows])
                              for f in ("llm_embedding", "mask", "txt_ids", "text_embeds", "text_mask")))


class Sigmas:
    DESCRIPTION = ("The Step1X-Edit schedule for the size of a latent, as SIGMAS for SamplerCustomAdvanced: steps + 1 "
                   "times from 1 to 0 with the resolution shift. denoise < 1 starts at the official img2img step "
                   "int((1 - denoise) * steps), as the Step1X-Edit Sampler does. With the model connected, the "
                   "schedule of its version (v1.2 computes it in numpy float32: the same times within 1 ulp).")
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
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The Step1X-Edit MODEL to be sampled: its version's schedule (without it, "
                                           "the official v1.0/v1.1 one)."}),
        }}

    def get_sigmas(self, latent, steps, denoise, model=None):
        samples = check_latent(latent, "latent")
        rules = OFFICIAL if model is None else _native().rules(model)
        return (stepwise.sigmas(steps, samples.shape[-2], samples.shape[-1], denoise, rules),)


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
    DESCRIPTION = ("Sets the CFG renorm of a Step1X-Edit MODEL: while the time is above the threshold, the guidance "
                   "difference is divided by max(|cond - uncond|, 1)^0.4 per token. The loader sets the official "
                   "0.93; 1.0 turns it off (plain CFG, as the first release). v1.2 compares its 0-1000 timestep with "
                   "the threshold, as its reference does, so any threshold renorms at every step but the last.")
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

"""The DiT denoising node: the official Step1X-Edit sampler on ComfyUI's LATENT, IMAGE and MASK types."""

from __future__ import annotations

import torch

from ..step1x.graph_io import (
    batch_of,
    check_image,
    check_latent,
    check_settings,
    latent_from_model_space,
    latent_to_model_space,
    mask_to_latent,
    repeat_rows,
    resize_images,
)
from ..step1x.sampling.denoise import TextConditioning, denoise, make_noise
from . import _comfy as bridge
from .dit_memory import load_for_sampling
from .sockets import CATEGORY, CONDITIONING, DIT, LAYOUT_V12
from .v12 import sample_v12
from .vae import check_vae


class Sampler:
    DESCRIPTION = ("Denoises with the Step1X-Edit DiT: the official schedule, Euler steps and true CFG with the "
                   "official renorm (v1.2: its reference's rules, the VAE posterior and the noise from the seed's "
                   "generator). Edits the reference (an IMAGE with a VAE, or a LATENT); without a reference it "
                   "does text-to-image at the size of init_latent. Returns a LATENT in ComfyUI's convention, so "
                   "ComfyUI's VAE Decode with ae.safetensors decodes it.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited latent (16-channel FLUX latent at the working size).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The Step1X-Edit DiT (the one bound by the Connector node)."}),
                "conditioning": (CONDITIONING, {"tooltip": "The output of the Step1X-Edit Connector node."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same noise as ComfyUI's samplers."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 200, "tooltip": "Denoising steps (official: 28)."}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Guidance scale of true CFG (official: 6.0)."}),
                "renorm_threshold": ("FLOAT", {"default": 0.93, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "While the time is above this, the guidance difference is renormalised (official: 0.93; 1.0 "
                    "turns it off, as in the first release).")}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "1.0 starts from noise. Lower values start from init_latent (or the reference) and change less; "
                    "0 returns that start point unchanged, as ComfyUI's KSampler does.")}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": (
                    "Results per reference image. The whole batch's noise comes from the one seed, as in ComfyUI's "
                    "samplers.")}),
            },
            "optional": {
                "reference_image": ("IMAGE", {"tooltip": (
                    "The image to edit, at its original size: it is resized to the working size of the conditioning "
                    "and encoded with the VAE. Give this or reference_latent; neither for text-to-image.")}),
                "vae": ("VAE", {"tooltip": "The FLUX VAE (Step1X-Edit VAE loader or ComfyUI's Load VAE with "
                                           "ae.safetensors); needed with reference_image."}),
                "reference_latent": ("LATENT", {"tooltip": "An already encoded reference (16-channel FLUX latent)."}),
                "init_latent": ("LATENT", {"tooltip": (
                    "Start point when denoise < 1 (img2img). For text-to-image it sets the size (e.g. Empty SD3 "
                    "Latent Image); at denoise 1.0 only its size is used.")}),
                "mask": ("MASK", {"tooltip": (
                    "Edit only where the mask is 1; elsewhere the result keeps the reference. Same size as "
                    "reference_image (e.g. the MASK output of Load Image).")}),
            },
        }

    def sample(self, model, conditioning, seed, steps, cfg, renorm_threshold, denoise, batch_size,
               reference_image=None, vae=None, reference_latent=None, init_latent=None, mask=None):
        check_settings(steps, cfg, renorm_threshold, denoise)
        conditioning.check_model(model)
        if conditioning.embeds.layout == LAYOUT_V12:
            return (sample_v12(model, conditioning, seed=seed, steps=steps, cfg=cfg, renorm_threshold=renorm_threshold,
                               denoise_strength=denoise, batch_size=batch_size, reference_image=reference_image,
                               vae=vae, reference_latent=reference_latent, init_latent=init_latent, mask=mask),)
        embeds, n = conditioning.embeds, batch_size
        reference, image_size = prepare_reference(embeds, reference_image, vae, reference_latent)
        init = None if init_latent is None else latent_to_model_space(check_latent(init_latent, "init_latent"))
        refs, h, w = _grid(reference, init)
        keep = None if mask is None else _keep_mask(mask, reference, image_size, refs, h, w)
        latent = run(
            model, conditioning.connector, make_noise((refs * n, 16, h, w), seed),
            _rows(embeds.cond, refs, n), _rows(embeds.uncond, refs, n),
            reference=_repeat(reference, n), keep=_repeat(keep, n),
            init=None if init is None or denoise >= 1.0 else _repeat(_batch(init, refs, "init_latent"), n),
            steps=steps, cfg=cfg, renorm_threshold=renorm_threshold, strength=denoise,
        )
        return ({"samples": latent},)


def prepare_reference(embeds, image, vae, latent) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    """The model-space reference latent (or None), and the pixel size (H, W) a mask must have."""
    if image is not None and latent is not None:
        raise ValueError("connect either reference_image or reference_latent, not both")
    if latent is not None:
        return latent_to_model_space(check_latent(latent, "reference_latent")), None
    if image is None:
        if not embeds.text_to_image:
            raise ValueError("the instruction was encoded with an image: connect that image as reference_image "
                             "(or its latent as reference_latent)")
        return None, None
    if embeds.text_to_image:
        raise ValueError("the instruction was encoded without an image (text-to-image) but a reference image is "
                         "connected; give the image to the Instruction Encode node too")
    image = check_image(image, "reference_image")
    check_vae(vae)
    if embeds.cond.llm_embedding.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"the instruction was encoded for {embeds.cond.llm_embedding.shape[0]} images but "
                         f"reference_image holds {image.shape[0]}; connect the same images to both nodes")
    resized = resize_images(image, embeds.working_size)
    return latent_to_model_space(vae.encode(resized)), tuple(image.shape[1:3])


def _grid(reference, init) -> tuple[int, int, int]:
    """(rows before batch_size: the references, or the init latents for text-to-image; latent height, width)."""
    if reference is None and init is None:
        raise ValueError("text-to-image needs a size: connect an Empty SD3 Latent Image (16 channels) to init_latent")
    if reference is not None and init is not None and init.shape[-2:] != reference.shape[-2:]:
        raise ValueError(
            f"init_latent is {init.shape[-1] * 8}x{init.shape[-2] * 8} px but the reference is "
            f"{reference.shape[-1] * 8}x{reference.shape[-2] * 8} px at the working size; encode an image of that size")
    shape = (reference if reference is not None else init).shape
    return shape[0], shape[-2], shape[-1]


def _keep_mask(mask, reference, image_size, refs, h, w):
    if reference is None:
        raise ValueError("a mask needs a reference: outside the mask the result keeps the reference image")
    return mask_to_latent(mask, image_size or (h * 8, w * 8), (h, w), refs)


def _batch(t: torch.Tensor, refs: int, what: str) -> torch.Tensor:
    return batch_of(t, refs, what, "the reference")


def _repeat(t: torch.Tensor | None, per_ref: int) -> torch.Tensor | None:
    return None if t is None else repeat_rows(t, per_ref)


def _rows(side: TextConditioning, refs: int, per_ref: int) -> TextConditioning:
    """One conditioning row per sample: per reference image, then ``per_ref`` times each."""
    emb = _batch(side.llm_embedding, refs, "the conditioning")
    mask = _batch(side.mask, refs, "the conditioning")
    return TextConditioning(repeat_rows(emb, per_ref), repeat_rows(mask, per_ref))


def run(dit, connector, noise, cond, uncond, *, reference, init, keep, steps, cfg, renorm_threshold, strength):
    """Load the DiT with ComfyUI's model management and denoise; returns the raw latent."""
    load_for_sampling(dit, noise, reference, text_tokens=640, rows_per_call=2)
    device = dit.patcher.load_device
    progress = bridge.Progress(steps, device)
    with torch.no_grad():
        latent = denoise(
            dit.model, noise, cond, uncond, reference=reference, steps=steps, cfg_scale=cfg,
            renorm_threshold=renorm_threshold, strength=strength, init_latent=init, keep_mask=keep,
            compute_dtype=dit.compute_dtype, device=device, connector=connector, teacache=dit.teacache,
            regione=dit.regione, callback=progress,
        )
    return latent_from_model_space(latent).to(bridge.intermediate_device())

"""Step1X-Edit v1.2 in the nodes: the Sampler's v1.2 path, and the stages of a v1.2 edit on ComfyUI's model
management (for Reason Edit).

As in the v1.2 reference, one CPU generator seeded with the sampler's seed gives the VAE posterior noise of
each reference image and then the initial noise (drawn in the DiT's compute dtype); the VAE sees a bilinear,
antialiased resize of the original image. With the pack's VAE loader the posterior is sampled as the reference
does; ComfyUI's own VAE gives only the mean, which is then used (the draw is still made, so the noise is the
same).
"""

from __future__ import annotations

import logging

import torch

from ..step1x.graph_io import check_image, check_latent, latent_from_model_space, latent_to_model_space
from ..step1x.pipeline_v12 import V12Settings
from ..step1x.sampling import v12
from ..step1x.sampling.denoise import LATENT_CHANNELS, TextConditioning, check_seed, denoise
from . import _comfy as bridge
from .dit_memory import load_for_sampling
from .vae import check_vae

log = logging.getLogger("step1x_edit")

V12_TEXT_TOKENS = 2048


# ----------------------------------------------------------------------------------------------------- VAE


def reference_latents(vae, pixels: torch.Tensor, generator: torch.Generator, sample: bool = True) -> torch.Tensor:
    """Model-space reference latents of VAE input ``pixels`` (B, 3, H, W) in [-1, 1], float32 on the
    intermediate device; the generator is drawn once per image (the posterior noise)."""
    check_vae(vae)
    if hasattr(vae, "sample_latent"):
        return vae.sample_latent(pixels, generator, sample).to(bridge.intermediate_device())
    log.info("Step1X-Edit v1.2: this VAE gives only the mean of the reference latent; the Step1X-Edit VAE loader "
             "samples it as the v1.2 reference does")
    mean = latent_to_model_space(vae.encode(((pixels + 1) / 2).movedim(1, -1)))
    for row in mean.split(1):
        torch.randn(row.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return mean.to(bridge.intermediate_device())


def decoded(vae, latent: torch.Tensor) -> torch.Tensor:
    """The decoder's output (B, 3, H, W) in about [-1, 1] for a model-space latent."""
    check_vae(vae)
    if hasattr(vae, "decode_model_space"):
        return vae.decode_model_space(latent)
    return vae.decode(latent_from_model_space(latent)).movedim(-1, 1).float() * 2 - 1


# ------------------------------------------------------------------------------------------------- the DiT


def run_dit(dit, noise, cond, uncond, *, reference=None, init=None, keep=None, steps: int, cfg: float,
            renorm_threshold: float, strength: float = 1.0, callback=None) -> torch.Tensor:
    """Load the DiT with ComfyUI's model management and sample under its version's rules (v1.2: one call per
    image row and CFG side), with the DiT's TeaCache or RegionE settings; progress, preview and Cancel per step.
    Returns the model-space latent, float32."""
    load_for_sampling(dit, noise, reference, text_tokens=V12_TEXT_TOKENS, rows_per_call=1)
    device = dit.patcher.load_device
    progress = bridge.Progress(steps, device)

    def step(info):
        progress(info)
        if callback is not None:
            callback(info)

    with torch.no_grad():
        return denoise(dit.model, noise, cond, uncond, reference=reference, steps=steps, cfg_scale=cfg,
                       renorm_threshold=renorm_threshold, strength=strength, init_latent=init, keep_mask=keep,
                       compute_dtype=dit.compute_dtype, device=device, teacache=dit.teacache,
                       regione=dit.regione, callback=step)


# ----------------------------------------------------------------------------------------------- the sampler


def sample_v12(dit, conditioning, *, seed, steps, cfg, renorm_threshold, denoise_strength, batch_size,
               reference_image=None, vae=None, reference_latent=None, init_latent=None, mask=None) -> dict:
    """The Sampler node with v1.2 embeddings; returns its LATENT."""
    from .sampler import _grid, _keep_mask, _repeat

    embeds, n = conditioning.embeds, batch_size
    generator = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    dtype = dit.compute_dtype
    reference, image_size = None, None
    if reference_image is not None and reference_latent is not None:
        raise ValueError("connect either reference_image or reference_latent, not both")
    if reference_latent is not None:
        reference = latent_to_model_space(check_latent(reference_latent, "reference_latent"))
    elif reference_image is not None:
        if embeds.text_to_image:
            raise ValueError("the instruction was encoded without an image (text-to-image) but a reference image is "
                             "connected; give the image to the Instruction Encode node too")
        image = check_image(reference_image, "reference_image")
        if embeds.rows not in (1, image.shape[0]):
            raise ValueError(f"the instruction was encoded for {embeds.rows} images but reference_image holds "
                             f"{image.shape[0]}; connect the same images to both nodes")
        pixels = v12.vae_input_pixels(image.movedim(-1, 1), embeds.working_size)
        reference, image_size = reference_latents(vae, pixels, generator), tuple(image.shape[1:3])
    elif not embeds.text_to_image:
        raise ValueError("the instruction was encoded with an image: connect that image as reference_image "
                         "(or its latent as reference_latent)")
    init = None if init_latent is None else latent_to_model_space(check_latent(init_latent, "init_latent"))
    refs, h, w = _grid(reference, init)
    keep = None if mask is None else _keep_mask(mask, reference, image_size, refs, h, w)
    if embeds.rows not in (1, refs):
        raise ValueError(f"the instruction was encoded for {embeds.rows} images but the reference holds {refs}")
    noise = torch.randn((refs * n, LATENT_CHANNELS, h, w), generator=generator, dtype=dtype)
    start = None if init is None or denoise_strength >= 1.0 else _repeat(_match(init, refs), n)
    latent = run_dit(dit, noise, _rows(embeds.cond, refs, n), _rows(embeds.uncond, refs, n),
                     reference=None if reference is None else _repeat(reference.to(dtype), n), init=start,
                     keep=_repeat(keep, n), steps=steps, cfg=cfg, renorm_threshold=renorm_threshold,
                     strength=denoise_strength)
    return {"samples": latent_from_model_space(latent).to(bridge.intermediate_device())}


def _rows(side: list[TextConditioning], refs: int, per_ref: int) -> list[TextConditioning]:
    """One conditioning per sample: per reference image, ``per_ref`` times each."""
    return [side[r if len(side) > 1 else 0] for r in range(refs) for _ in range(per_ref)]


def _match(t: torch.Tensor, refs: int) -> torch.Tensor:
    if t.shape[0] in (1, refs):
        return t.expand(refs, -1, -1, -1) if t.shape[0] == 1 else t
    raise ValueError(f"init_latent has batch {t.shape[0]} but there are {refs} reference images; give 1 or {refs}")


# -------------------------------------------------------------------------------------- stages (Reason Edit)


class ComfyStages:
    """:class:`step1x.pipeline_v12.V12Stages` on ComfyUI's model management: each stage loads its model with
    ComfyUI, which unloads others when memory is short (the DiT and the encoder are never loaded together)."""

    def __init__(self, dit, vae, mllm):
        self.dit, self.vae, self.mllm = dit, vae, mllm

    def load_encoder(self) -> None:
        encoder = self.mllm.encoder
        bridge.load([self.mllm.patcher], memory_required=V12_TEXT_TOKENS * encoder.hidden_size * 4 * 16, full=True)

    def encode(self, image, prompts):
        self.load_encoder()
        return self.mllm.encoder.encode_v12(image, prompts)

    def encode_reference(self, pixels, generator, sample):
        return reference_latents(self.vae, pixels, generator, sample)

    def denoise(self, noise, cond, uncond, reference, settings: V12Settings, callback, init=None):
        options = settings.sampling
        return run_dit(self.dit, noise, cond, uncond, reference=reference, init=init, steps=options.steps,
                       cfg=options.cfg_scale, renorm_threshold=options.renorm_threshold, strength=settings.strength,
                       callback=callback)

    def decode(self, latent):
        return decoded(self.vae, latent)

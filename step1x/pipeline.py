"""The whole edit in one object: resize -> MLLM encode -> VAE encode -> denoise -> decode -> resize back.

``Step1XPipeline`` is what the command line and scripts use; the ComfyUI nodes call the same functions
one stage per node.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .checkpoints.loading import inspect_dit, load_dit, load_vae
from .checkpoints.lora import LoraHandle, apply_lora, load_lora
from .checkpoints.model_files import ModelFilesError, ModelPaths, resolve_models
from .geometry import check_dims, resize_to_size_level, restore_size
from .graph_io import check_sampling
from .image_io import pil_to_tensor, tensor_to_pil
from .models.autoencoder import AutoEncoder
from .models.configs import T2I_NEGATIVE_PROMPT
from .models.model import Step1XEdit
from .sampling.denoise import StepInfo, TextConditioning, autocast_for, denoise, make_noise
from .sampling.regione_rules import RegionEConfig

log = logging.getLogger(__name__)

T2I_CONDITIONING_SIZE = (1024, 1024)
"""Text-to-image still shows the MLLM an image: the official code passes a black 1024x1024 one."""


@dataclass
class EditOptions:
    steps: int = 28
    cfg_scale: float = 6.0
    renorm_threshold: float = 0.93
    """Renorm the CFG difference while t is above this (0.93: later official default; 1.0: first release)."""
    seed: int = 0
    size_level: int = 512
    negative_prompt: str | None = None
    """None: "" for editing, the official long negative prompt for text-to-image."""
    strength: float = 1.0
    resize_filter: str = "lanczos"
    sample_vae: bool = False
    """Sample the reference latent like the official encode instead of taking the mean."""
    restore_size: bool = True
    sequential_cfg: bool = False
    teacache: float = 0.0
    """TeaCache threshold (0: off; 0.2: the official default). Faster, slightly different results."""
    regione: RegionEConfig | None = None
    """RegionE settings (None: off): after the warm-up only the edited region is computed. Edits only."""

    def validate(self) -> None:
        check_sampling(self.steps, self.cfg_scale, self.renorm_threshold)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be within [0, 1], got {self.strength}")
        if not self.teacache >= 0:
            raise ValueError(f"teacache threshold must be 0 (off) or positive, got {self.teacache}")
        if self.regione is not None and self.teacache:
            raise ValueError("RegionE and TeaCache both skip DiT work per step and cannot be combined; turn one off")


@dataclass
class Timings:
    encode_s: float = 0.0
    sample_s: float = 0.0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)


def encode_reference(vae: AutoEncoder, images: list[Image.Image], device: torch.device,
                     autocast_dtype: torch.dtype | None = None, sample: bool = False, seed: int = 0) -> torch.Tensor:
    """PIL images (same size) -> model-space latents (B, 16, H/8, W/8) float32.

    ``autocast_dtype`` reproduces the official encode under bf16 autocast on CUDA."""
    pixels = torch.stack([pil_to_tensor(im) for im in images]).to(device) * 2 - 1
    generator = torch.Generator().manual_seed(int(seed)) if sample else None
    with torch.no_grad(), autocast_for(device, autocast_dtype or torch.float32):
        pixels = pixels.to(vae_dtype(vae))
        z = vae.encode(pixels, sample=sample, generator=generator)
    return z.float()


def decode_latent(vae: AutoEncoder, latent: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images (B, 3, H, W) in [0, 1] float32 (official clamp and rescale)."""
    with torch.no_grad():
        x = vae.decode(latent.to(device=vae_device(vae), dtype=vae_dtype(vae)))
    return x.float().clamp(-1, 1).mul(0.5).add(0.5)


def vae_dtype(vae: torch.nn.Module) -> torch.dtype:
    return next(vae.parameters()).dtype


def vae_device(vae: torch.nn.Module) -> torch.device:
    return next(vae.parameters()).device


def find_models(folder: str | Path | None = None, *, version: str | None = None, dit: str | Path | None = None,
                vae: str | Path | None = None, mllm: str | Path | None = None,
                tokenizer: str | Path | None = None) -> ModelPaths:
    """:func:`~step1x.checkpoints.model_files.resolve_models`, then a check that the DiT found is a Step1X-Edit DiT of
    ``version`` (when given). Reads only the DiT's header, so it costs nothing before a load."""
    paths = resolve_models(folder, version=version, dit=dit, vae=vae, mllm=mllm, tokenizer=tokenizer)
    found = inspect_dit(paths.dit).version
    if version is not None and found != version:
        raise ModelFilesError(f"{paths.dit.name} is Step1X-Edit {found}, but version {version} was asked for")
    return paths


class Step1XPipeline:
    """Holds the three models and runs edits. With ``offload`` each model sits on the CPU until its stage
    runs, so the MLLM (about 16 GB in bf16) and the DiT (about 25 GB, 13 GB in fp8) never share the GPU."""

    def __init__(self, dit: Step1XEdit, vae: AutoEncoder, encoder, *, device: torch.device,
                 compute_dtype: torch.dtype = torch.bfloat16, offload: bool = False,
                 offload_encoder: bool | None = None):
        self.dit, self.vae, self.encoder = dit, vae, encoder
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.offload = offload
        self.offload_encoder = offload if offload_encoder is None else offload_encoder
        """Move the MLLM to ``device`` for encoding; off when it was given a device of its own."""
        self.loras: list[LoraHandle] = []

    @classmethod
    def from_files(cls, dit: str | Path, vae: str | Path, mllm: str | Path, *, tokenizer_dir: str | Path | None = None,
                   device: torch.device | str | None = None, mllm_device: torch.device | str | None = None,
                   compute_dtype: torch.dtype = torch.bfloat16, mllm_dtype: torch.dtype | None = None,
                   weight_dtype: str = "default", attention: str = "auto", offload: bool = False,
                   loras: Sequence[tuple[str | Path, float]] = ()) -> "Step1XPipeline":
        """``loras``: (file, strength) pairs applied to the DiT in order (see :meth:`add_lora`)."""
        from .encoder import load_text_encoder

        device = torch.device(device or default_device())
        home = torch.device("cpu") if offload else device
        model = load_dit(dit, device=home, compute_dtype=compute_dtype, weight_dtype=weight_dtype, attention=attention)
        patches = [(load_lora(path, model), strength) for path, strength in loras]
        ae = load_vae(vae, device=home, dtype=torch.float32)
        text = load_text_encoder(mllm, tokenizer_dir=tokenizer_dir, device=torch.device(mllm_device or home),
                                 dtype=mllm_dtype or compute_dtype)
        pipe = cls(model, ae, text, device=device, compute_dtype=compute_dtype, offload=offload,
                   offload_encoder=offload and mllm_device is None)
        for patch, strength in patches:
            pipe.loras.append(apply_lora(model, patch, strength))
        return pipe

    @classmethod
    def from_folder(cls, folder: str | Path | None = None, *, version: str | None = None,
                    dit: str | Path | None = None, vae: str | Path | None = None, mllm: str | Path | None = None,
                    tokenizer_dir: str | Path | None = None, **kwargs) -> "Step1XPipeline":
        """Load from a models folder in the standalone or ComfyUI layout (see :mod:`step1x.checkpoints.model_files`);
        any of the three paths may be given instead. Other arguments are those of :meth:`from_files`."""
        paths = find_models(folder, version=version, dit=dit, vae=vae, mllm=mllm, tokenizer=tokenizer_dir)
        return cls.from_files(paths.dit, paths.vae, paths.mllm, tokenizer_dir=paths.tokenizer, **kwargs)

    def add_lora(self, path: str | Path, strength: float = 1.0) -> LoraHandle:
        """Apply a LoRA file to the DiT: merged into 16/32-bit weights, beside fp8 weights as a low-rank
        branch (see :func:`step1x.checkpoints.lora.apply_lora`). ``handle.remove()`` takes it off again."""
        handle = apply_lora(self.dit, load_lora(path, self.dit), strength)
        self.loras.append(handle)
        return handle

    @property
    def version(self) -> str:
        return self.dit.version

    @property
    def devices(self) -> list[torch.device]:
        """The devices the models compute on (for memory reports)."""
        return list(dict.fromkeys([self.device, torch.device(self.encoder.device)]))

    # ------------------------------------------------------------------------------------------ stages

    def _on_device(self, module):
        if self.offload:
            module.to(self.device)
        return module

    def _off_device(self, module):
        if self.offload:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode_prompts(self, image: Image.Image, prompt: str,
                       negative: str) -> tuple[TextConditioning, TextConditioning]:
        encoder = self.encoder
        moved = self.offload_encoder and encoder.device.type == "cpu"
        if moved:
            encoder.to(self.device)
        try:
            out = encoder.encode([image, image], [prompt, negative])
        finally:
            if moved:
                encoder.to("cpu")
        emb, mask = out.embedding, out.mask
        return TextConditioning(emb[:1], mask[:1]), TextConditioning(emb[1:], mask[1:])

    def edit(self, image: Image.Image, prompt: str, options: EditOptions | None = None,
             callback: Callable[[StepInfo], None] | None = None, timings: Timings | None = None) -> Image.Image:
        """Edit ``image`` following ``prompt``; returns the result at the input size (or the working size)."""
        options = options or EditOptions()
        options.validate()
        timings = timings if timings is not None else Timings()
        original_size = image.size
        ref = resize_to_size_level(image, options.size_level, options.resize_filter)
        t0 = time.perf_counter()
        negative = "" if options.negative_prompt is None else options.negative_prompt
        cond, uncond = self.encode_prompts(ref, prompt, negative)
        vae = self._on_device(self.vae)
        autocast = self.compute_dtype if self.device.type == "cuda" else None
        reference = encode_reference(vae, [ref], self.device, autocast, options.sample_vae, options.seed)
        timings.encode_s = time.perf_counter() - t0
        result = self._sample_and_decode(reference.shape, reference, cond, uncond, options, callback, timings)
        return restore_size(result, original_size) if options.restore_size else result

    def text_to_image(self, prompt: str, width: int = 1024, height: int = 1024, options: EditOptions | None = None,
                      callback: Callable[[StepInfo], None] | None = None,
                      timings: Timings | None = None) -> Image.Image:
        """Generate an image from text (v1.1). ``width``/``height`` must be multiples of 16."""
        options = options or EditOptions()
        options.validate()
        check_dims(width, height)
        if self.version == "v1.0":
            log.warning("text-to-image was released with Step1X-Edit v1.1; v1.0 was not trained for it")
        timings = timings if timings is not None else Timings()
        t0 = time.perf_counter()
        negative = T2I_NEGATIVE_PROMPT if options.negative_prompt is None else options.negative_prompt
        cond, uncond = self.encode_prompts(Image.new("RGB", T2I_CONDITIONING_SIZE), prompt, negative)
        timings.encode_s = time.perf_counter() - t0
        return self._sample_and_decode((1, 16, height // 8, width // 8), None, cond, uncond, options, callback, timings)

    def _sample_and_decode(self, shape, reference, cond, uncond, options, callback, timings) -> Image.Image:
        t0 = time.perf_counter()
        self._off_device(self.vae)
        dit = self._on_device(self.dit)
        try:
            with torch.no_grad():
                latent = denoise(
                    dit, make_noise(tuple(shape), options.seed), cond, uncond, reference=reference,
                    steps=options.steps, cfg_scale=options.cfg_scale, renorm_threshold=options.renorm_threshold,
                    strength=options.strength, compute_dtype=self.compute_dtype, device=self.device,
                    sequential_cfg=options.sequential_cfg, teacache=options.teacache, regione=options.regione,
                    callback=callback,
                )
        finally:
            self._off_device(self.dit)
        timings.sample_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vae = self._on_device(self.vae)
        try:
            image = tensor_to_pil(decode_latent(vae, latent)[0])
        finally:
            self._off_device(self.vae)
        timings.decode_s = time.perf_counter() - t0
        return image


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

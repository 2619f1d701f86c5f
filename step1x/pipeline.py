"""The whole edit in one object: resize -> MLLM encode -> VAE encode -> denoise -> decode -> resize back.

``Step1XPipeline`` is what the command line and scripts use; the ComfyUI nodes call the same functions
one stage per node. The DiT's version (read from its weights) decides the encoder layout and the sampler:
v1.0/v1.1 run the official code's steps below, v1.2 those of its reference pipeline (:mod:`.pipeline_v12`),
including the reasoning edit (:meth:`Step1XPipeline.reason_edit`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import pipeline_v12
from .checkpoints.loading import inspect_dit, load_dit, load_vae
from .checkpoints.lora import LoraHandle, apply_lora, load_lora
from .checkpoints.model_files import ModelFilesError, ModelPaths, resolve_models
from .encoder.image_chain import FETCH_RULE, check_aspect, smart_size
from .encoder.image_v12 import processor_rule_v12
from .encoder.template import IMAGE_PAD, chat_text, chat_text_v12, split_quoted
from .encoder.tokens import PLACEHOLDER_FIX, PLACEHOLDER_FIX_V12
from .geometry import check_dims, resize_to_size_level, restore_size, size_level_dims
from .graph_io import check_finite, check_sampling
from .image_io import ImageValueError, pil_to_tensor, tensor_to_pil, to_rgb
from .models.autoencoder import AutoEncoder
from .models.configs import T2I_NEGATIVE_PROMPT
from .models.model import Step1XEdit
from .models.speed import apply_speed_options
from .pipeline_v12 import V12_SIZE_LEVEL, ModuleStages, ReasoningOptions, V12Settings, check_generation
from .reasoning import GenerateFn, ReasonEditResult
from .sampling import v12
from .sampling.denoise import StepInfo, TextConditioning, autocast_for, check_seed, denoise, make_noise
from .sampling.regione_rules import RegionEConfig

log = logging.getLogger(__name__)

T2I_CONDITIONING_SIZE = (1024, 1024)
"""Text-to-image still shows the MLLM an image: the official code passes a black 1024x1024 one."""
OFFICIAL_SIZE_LEVEL = 512


@dataclass
class EditOptions:
    steps: int = 28
    cfg_scale: float = 6.0
    renorm_threshold: float = 0.93
    """Renorm the CFG difference while t is above this (0.93: later official default; 1.0: first release)."""
    seed: int = 0
    """Noise seed, 0 to 2**64 - 1."""
    size_level: int | None = None
    """None: the version's default, 512 for v1.0/v1.1 (official ``inference.py``), 1024 for v1.2."""
    negative_prompt: str | None = None
    """None: "" for editing, the version's long negative prompt for text-to-image."""
    strength: float = 1.0
    """img2img: below 1, sampling starts part way from the init image (or the reference) and changes less; 0 returns
    that start point unchanged."""
    init_image: Image.Image | None = None
    """img2img start point other than the reference (any size: resized to the working size, nearest, as the
    official code does), used with ``strength`` below 1."""
    resize_filter: str = "lanczos"
    sample_vae: bool | None = None
    """Sample the reference (and init) latent like the official encode instead of taking the mean. None: the mean
    for v1.0/v1.1 (deterministic), a sample for v1.2 (as its reference pipeline, from the seeded generator)."""
    restore_size: bool = True
    sequential_cfg: bool = False
    teacache: float = 0.0
    """TeaCache threshold (0: off; 0.2: the official default). Faster, slightly different results."""
    regione: RegionEConfig | None = None
    """RegionE settings (None: off): after the warm-up only the edited region is computed. Edits only."""

    def level(self, version: str) -> int:
        """The ``size_level`` for Step1X-Edit ``version``."""
        if self.size_level is not None:
            return self.size_level
        return V12_SIZE_LEVEL if version == "v1.2" else OFFICIAL_SIZE_LEVEL

    def validate(self) -> None:
        check_sampling(self.steps, self.cfg_scale, self.renorm_threshold)
        check_seed(self.seed)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be within [0, 1], got {self.strength}")
        if self.init_image is not None and not isinstance(self.init_image, Image.Image):
            raise ValueError(f"init_image must be a PIL image, got {type(self.init_image).__name__}")
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


def check_instruction(instruction: str, what: str = "instruction", version: str = "v1.1") -> None:
    """Raise when the instruction holds ``<|image_pad|>`` or ``<|video_pad|>`` where the encoder of ``version``
    reads them as placeholders: it refuses them (the official code crashes), and this finds them without a
    tokenizer, before any model loads. The v1.0/v1.1 encoder feeds quoted text one character at a time, so there
    quoted ones are plain text; the v1.2 encoder cuts special tokens out before it looks at quotes, so there they
    are placeholders anywhere."""
    if not isinstance(instruction, str):
        raise ValueError(f"the {what} must be text, got {type(instruction).__name__}")
    if version == "v1.2":
        pieces, fix = [chat_text_v12(instruction)], PLACEHOLDER_FIX_V12
    else:
        pieces, fix = split_quoted(chat_text(instruction)), PLACEHOLDER_FIX
    found = [t for t, allowed in ((IMAGE_PAD, 1), ("<|video_pad|>", 0)) if sum(p.count(t) for p in pieces) > allowed]
    if found:
        shown = instruction if len(instruction) <= 80 else instruction[:77] + "..."
        raise ValueError(f"the {what} {shown!r} contains {', '.join(found)}, a placeholder reserved for the reference "
                         f"image; {fix}")


def check_edit_image(width: int, height: int, size_level: int, version: str = "v1.1") -> tuple[int, int]:
    """The working size of a ``width x height`` image at ``size_level``, or the reason it cannot be edited at that
    size_level: the size_level geometry, then the aspect limit of the image chain of ``version``'s encoder."""
    size = size_level_dims(width, height, size_level)
    check_aspect(*size, f"at size_level {size_level} ({size[0]}x{size[1]})")
    rule = processor_rule_v12() if version == "v1.2" else FETCH_RULE
    check_aspect(*smart_size(*size, rule), "after rounding to multiples of 28")
    return size


def rgb_image(image: Image.Image, what: str) -> Image.Image:
    """``image`` as 8-bit RGB, refusing NaN/Inf pixels of float images with ``what`` named."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} must be a PIL image, got {type(image).__name__}")
    try:
        return to_rgb(image)
    except ImageValueError as exc:
        raise ImageValueError(f"{what}: {exc}") from None


def encode_pixels(vae: AutoEncoder, pixels: torch.Tensor, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, sample: bool = False,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> model-space latents (B, 16, H/8, W/8) float32. With ``sample`` the
    Gaussian is sampled with ``noise`` (the shape of the latent) or else from ``generator``."""
    pixels = pixels.to(device) * 2 - 1
    with torch.no_grad(), autocast_for(device, autocast_dtype or torch.float32):
        z = vae.encode(pixels.to(vae_dtype(vae)), sample=sample, generator=generator, noise=noise)
    return z.float()


def encode_reference(vae: AutoEncoder, images: list[Image.Image], device: torch.device,
                     autocast_dtype: torch.dtype | None = None, sample: bool = False, seed: int = 0,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """PIL images (same size) -> model-space latents (B, 16, H/8, W/8) float32.

    ``autocast_dtype`` reproduces the official encode under bf16 autocast on CUDA. ``sample`` draws from the
    Gaussian like the official encode: with ``noise`` (B, 16, H/8, W/8) when given, else from a CPU generator
    seeded with ``seed``."""
    pixels = torch.stack([pil_to_tensor(im) for im in images])
    if noise is not None:
        noise = check_finite(noise, "the reference-encode noise")
        expected = (len(images), 16, pixels.shape[-2] // 8, pixels.shape[-1] // 8)
        if tuple(noise.shape) != expected:
            raise ValueError(f"the reference-encode noise has shape {tuple(noise.shape)}; the latent of the "
                             f"{pixels.shape[-1]}x{pixels.shape[-2]} working size needs {expected}")
    generator = torch.Generator().manual_seed(int(seed)) if sample and noise is None else None
    return encode_pixels(vae, pixels, device, autocast_dtype, sample, generator, noise)


def latent_shape(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The latent (1, 16, H/8, W/8) of one image of ``size`` (W, H)."""
    return (1, 16, size[1] // 8, size[0] // 8)


def init_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An img2img init image as (1, 3, H, W) in [0, 1] at the working ``size`` (W, H), resized as the official
    code resizes it: ``F.interpolate`` with its default, nearest."""
    pixels = pil_to_tensor(rgb_image(image, "the init image")).unsqueeze(0)
    if tuple(pixels.shape[-2:]) == (size[1], size[0]):
        return pixels
    return F.interpolate(pixels, size=(size[1], size[0]))


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
    runs, so the MLLM (about 16 GB in bf16) and the DiT (about 25 GB, 13 GB in fp8) never share the GPU.

    The DiT's version decides the rest: a v1.2 DiT gets the v1.2 encoder layout, sampler and output rules, and
    :meth:`reason_edit` (thinking and reflection, which need the v1.2 text encoder loaded with
    ``generation=True``)."""

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
                   loras: Sequence[tuple[str | Path, float]] = (), generation: bool = False,
                   mllm_fp8: bool = False, fp8_matmul: bool = False, compile: bool = False) -> "Step1XPipeline":
        """``loras``: (file, strength) pairs applied to the DiT in order (see :meth:`add_lora`).
        ``fp8_matmul``: the DiT's float8_e4m3fn block weights multiply in fp8 (:mod:`step1x.models.fp8_matmul`;
        needs fp8 block weights: an fp8 file or ``weight_dtype`` fp8_e4m3fn). ``compile``: each DiT block runs
        through ``torch.compile`` (:mod:`step1x.models.compile`).
        ``generation``: keep the text encoder's language-model head, for :meth:`reason_edit` (v1.2).
        ``mllm_fp8``: keep the text encoder's block Linear weights in float8 (an fp8_scaled file as stored, a
        full-precision one quantised per tensor): about half the memory of bf16.

        Each of ``dit``, ``vae`` and ``mllm`` may be a diffusers-layout model folder (Step1X-Edit-v1p2,
        Step1X-Edit-v1p1-diffusers), whose ``transformer/``, ``vae/`` and ``text_encoder/`` are then used."""
        from .encoder import load_text_encoder

        device = torch.device(device or default_device())
        home = torch.device("cpu") if offload else device
        model = load_dit(dit, device=home, compute_dtype=compute_dtype, weight_dtype=weight_dtype, attention=attention)
        apply_speed_options(model, fp8_matmul=fp8_matmul, compile=compile, device=device)
        patches = [(load_lora(path, model), strength) for path, strength in loras]
        ae = load_vae(vae, device=home, dtype=torch.float32)
        text = load_text_encoder(mllm, tokenizer_dir=tokenizer_dir, device=torch.device(mllm_device or home),
                                 dtype=mllm_dtype or compute_dtype, generation=generation, keep_fp8=mllm_fp8,
                                 quantize_fp8=mllm_fp8)
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

    @property
    def _encode_autocast(self) -> torch.dtype | None:
        """The official code encodes under bf16 autocast on CUDA."""
        return self.compute_dtype if self.device.type == "cuda" else None

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
             callback: Callable[[StepInfo], None] | None = None, timings: Timings | None = None, *,
             reference_noise: torch.Tensor | None = None) -> Image.Image:
        """Edit ``image`` following ``prompt``; returns the result at the input size (or the working size).

        ``reference_noise`` (1, 16, H/8, W/8 of the working size): the noise of a sampled reference encode, as
        :func:`~step1x.sampling.denoise.denoise` takes its noise; giving it samples the reference latent."""
        options = options or EditOptions()
        options.validate()
        image = rgb_image(image, "the image to edit")
        check_edit_image(image.width, image.height, options.level(self.version), self.version)
        check_instruction(prompt, version=self.version)
        timings = timings if timings is not None else Timings()
        if self.version == "v1.2":
            if reference_noise is not None:
                raise ValueError("reference_noise is the noise of the v1.0/v1.1 reference encode; a v1.2 edit draws "
                                 "its reference noise from the generator seeded with options.seed, as its reference "
                                 "pipeline does: leave reference_noise out")
            stages = self._v12_stages()
            try:
                generator = torch.Generator(device="cpu").manual_seed(int(options.seed))
                return pipeline_v12.edit(stages, image, prompt, self.v12_settings(options), generator,
                                         dtype=self.compute_dtype, callback=callback, timings=timings)
            finally:
                stages.release()
        original_size = image.size
        ref = resize_to_size_level(image, options.level(self.version), options.resize_filter)
        t0 = time.perf_counter()
        negative = "" if options.negative_prompt is None else options.negative_prompt
        check_instruction(negative, "negative prompt", self.version)
        cond, uncond = self.encode_prompts(ref, prompt, negative)
        vae = self._on_device(self.vae)
        autocast = self._encode_autocast
        # One CPU generator for the sampled encodes: the reference's noise first, then the init image's.
        generator = torch.Generator().manual_seed(options.seed) if options.sample_vae else None
        if reference_noise is None and generator is not None:
            reference_noise = torch.randn(latent_shape(ref.size), generator=generator)
        reference = encode_reference(vae, [ref], self.device, autocast, reference_noise is not None,
                                     noise=reference_noise)
        init = self._encode_init(options, ref.size, autocast, generator)
        timings.encode_s = time.perf_counter() - t0
        result = self._sample_and_decode(reference.shape, reference, cond, uncond, options, callback, timings, init)
        return restore_size(result, original_size) if options.restore_size else result

    def text_to_image(self, prompt: str, width: int = 1024, height: int = 1024, options: EditOptions | None = None,
                      callback: Callable[[StepInfo], None] | None = None,
                      timings: Timings | None = None) -> Image.Image:
        """Generate an image from text (v1.1). ``width``/``height`` must be multiples of 16."""
        options = options or EditOptions()
        options.validate()
        check_dims(width, height, "Choose a width and height that are multiples of 16, e.g. 1024x768.")
        check_instruction(prompt, "prompt", self.version)
        if self.version == "v1.0":
            log.warning("text-to-image was released with Step1X-Edit v1.1; v1.0 was not trained for it")
        timings = timings if timings is not None else Timings()
        if self.version == "v1.2":
            stages = self._v12_stages()
            try:
                generator = torch.Generator(device="cpu").manual_seed(int(options.seed))
                return pipeline_v12.text_to_image(stages, prompt, (width, height), self.v12_settings(options),
                                                  generator, dtype=self.compute_dtype, callback=callback,
                                                  timings=timings)
            finally:
                stages.release()
        t0 = time.perf_counter()
        negative = T2I_NEGATIVE_PROMPT if options.negative_prompt is None else options.negative_prompt
        cond, uncond = self.encode_prompts(Image.new("RGB", T2I_CONDITIONING_SIZE), prompt, negative)
        generator = torch.Generator().manual_seed(options.seed) if options.sample_vae else None
        init = self._encode_init(options, (width, height), self._encode_autocast, generator)
        timings.encode_s = time.perf_counter() - t0
        return self._sample_and_decode(latent_shape((width, height)), None, cond, uncond, options, callback, timings,
                                       init)

    # ---------------------------------------------------------------------------------------------- v1.2

    def v12_settings(self, options: EditOptions) -> V12Settings:
        """``options`` as the settings of a v1.2 edit (the reference's sampler with the v1.2 defaults where
        ``options`` leaves the choice to the version)."""
        sampling = v12.V12Options(steps=options.steps, cfg_scale=options.cfg_scale,
                                  renorm_threshold=options.renorm_threshold, size_level=options.level("v1.2"),
                                  seed=options.seed, regione=options.regione)
        if options.negative_prompt is not None:
            check_instruction(options.negative_prompt, "negative prompt", "v1.2")
        return V12Settings(sampling=sampling, negative_prompt=options.negative_prompt,
                           resize_filter=options.resize_filter,
                           sample_vae=True if options.sample_vae is None else options.sample_vae,
                           restore_size=options.restore_size, strength=options.strength,
                           init_image=None if options.init_image is None else rgb_image(options.init_image,
                                                                                        "the init image"),
                           teacache=options.teacache)

    def _v12_stages(self) -> ModuleStages:
        return ModuleStages(self.dit, self.vae, self.encoder, device=self.device, dtype=self.compute_dtype,
                            offload=self.offload, offload_encoder=self.offload_encoder)

    def reason_edit(self, image: Image.Image, prompt: str, options: EditOptions | None = None,
                    reasoning: ReasoningOptions | None = None, *, generate: GenerateFn | None = None,
                    callback: Callable[[StepInfo], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    on_stage: Callable[[str, int], None] | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    timings: Timings | None = None) -> ReasonEditResult:
        """Step1X-Edit v1.2 with thinking and/or reflection: optionally rewrite ``prompt`` (one model reply),
        edit, judge the result (five replies normally) and retry up to ``reasoning.max_tries`` edits, as the v1.2
        reference does. Returns every try (``result.images``), the chosen one (``result.best_image``) and the
        model's text (``result.reasoning_text()``). Images are at the input size.

        ``generate``: a stand-in for the model's replies (``(ChatCall) -> str``); by default the loaded text
        encoder writes them (loaded with ``generation=True``), sampled from a stream seeded with
        ``reasoning.seed`` (default: ``options.seed``). With offloading the DiT and the encoder take turns on
        the compute device. ``should_stop`` is checked between replies, tokens and stages, and ``callback``
        after every denoising step (raise from it to cancel)."""
        options = options or EditOptions()
        options.validate()
        reasoning = reasoning or ReasoningOptions()
        reasoning.validate()
        if self.version != "v1.2":
            raise ValueError(
                f"thinking and reflection are Step1X-Edit v1.2 features, but the DiT is {self.version}; load the "
                "v1.2 model folder (Step1X-Edit-v1p2: transformer/, vae/, text_encoder/)"
            )
        stages = self._v12_stages()
        if generate is None and reasoning.uses_model:
            check_generation(self.encoder, " (Step1XPipeline.from_files(..., generation=True); on the command line "
                             "--think/--reflect do this)")
            seed = options.seed if reasoning.seed is None else reasoning.seed
            generate = pipeline_v12.qwen_generate(self.encoder, lambda: stages.place("encoder"), reasoning, seed,
                                                  should_stop=should_stop, on_token=on_token)
        try:
            return pipeline_v12.reasoning_edit(
                stages, image, prompt, self.v12_settings(options), reasoning, dtype=self.compute_dtype,
                generate=generate, callback=callback, should_stop=should_stop, on_stage=on_stage,
                timings=timings)
        finally:
            stages.release()

    # ---------------------------------------------------------------------------------------------- v1.0/v1.1

    def _encode_init(self, options: EditOptions, size: tuple[int, int], autocast, generator) -> torch.Tensor | None:
        """The model-space latent of ``options.init_image`` at the working ``size``, or None."""
        if options.init_image is None:
            return None
        vae = self._on_device(self.vae)
        return encode_pixels(vae, init_pixels(options.init_image, size), self.device, autocast,
                             bool(options.sample_vae), generator)

    def _sample_and_decode(self, shape, reference, cond, uncond, options, callback, timings, init=None) -> Image.Image:
        t0 = time.perf_counter()
        self._off_device(self.vae)
        dit = self._on_device(self.dit)
        try:
            with torch.no_grad():
                latent = denoise(
                    dit, make_noise(tuple(shape), options.seed), cond, uncond, reference=reference,
                    steps=options.steps, cfg_scale=options.cfg_scale, renorm_threshold=options.renorm_threshold,
                    strength=options.strength, init_latent=init, compute_dtype=self.compute_dtype, device=self.device,
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

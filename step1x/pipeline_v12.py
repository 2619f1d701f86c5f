"""Step1X-Edit v1.2 edits end to end: the plain edit, text-to-image, and the reasoning edit (thinking and
reflection), on models that a front end places on its devices.

The steps are those of the v1.2 reference pipeline (:mod:`step1x.sampling.v12` documents the numerics): the
encoder sees the ``size_level`` resize of the image, the VAE a bilinear antialiased resize of the original; one
CPU generator, seeded once, gives the VAE posterior noise and then the initial noise; the sampler runs under
the v1.2 rules; the output is rounded to 8 bits and resized back. In a reasoning edit the same generator
carries on from try to try, as the reference's does.

Where the models live is the front end's business: :class:`V12Stages` is the four things a v1.2 edit needs
(encode prompts, encode the reference, denoise, decode), and :class:`ModuleStages` implements them on plain
modules, with optional offloading that keeps one large model on the compute device at a time. The ComfyUI
nodes implement the same stages on ComfyUI's model management.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor

from .encoder.image_v12 import blank_reference
from .encoder.template import default_negative_prompt_v12
from .geometry import resize_to_size_level
from .reasoning import (
    GenerateFn,
    GenerationSettings,
    QwenGenerator,
    ReasonEditResult,
    Thinker,
    check_can_generate,
    reason_edit,
)
from .reasoning.generation import CannotGenerateError
from .sampling import v12
from .sampling.denoise import StepInfo, TextConditioning, denoise

LARGE = frozenset({"dit", "encoder"})
"""The models that never share the compute device under offloading (about 24 and 16 GB in bf16)."""
V12_SIZE_LEVEL = 1024
"""The v1.2 reference's default ``size_level`` (v1.0/v1.1: 512)."""


class V12Stages(Protocol):
    """The four stages of a v1.2 edit. Latents are in model space ``(B, 16, H/8, W/8)``."""

    def encode(self, image: Image.Image, prompts: list[str]) -> list[TextConditioning]:
        """One v1.2 conditioning per prompt, each with ``image`` (already at the working size)."""

    def encode_reference(self, pixels: Tensor, generator: torch.Generator, sample: bool) -> Tensor:
        """The reference latent of VAE input ``pixels`` (1, 3, H, W) in [-1, 1], in the latent dtype: a
        posterior sample whose noise is the generator's next draw (the mean when ``sample`` is False; the
        draw is made all the same, so the initial noise does not change)."""

    def denoise(self, noise: Tensor, cond: TextConditioning, uncond: TextConditioning | None,
                reference: Tensor | None, settings: V12Settings,
                callback: Callable[[StepInfo], None] | None, init: Tensor | None = None) -> Tensor:
        """Sample from ``noise`` under the v1.2 rules; below strength 1 from ``init`` (else the reference)
        noised to the start time."""

    def decode(self, latent: Tensor) -> Tensor:
        """The decoder's output (B, 3, H, W) in about [-1, 1], float32."""


@dataclass(frozen=True)
class V12Settings:
    """One v1.2 edit: the reference's sampling options and the pack's extras."""

    sampling: v12.V12Options = v12.V12Options()
    negative_prompt: str | None = None
    """None: ``""`` for an edit, the v1.2 text-to-image negative prompt without an image."""
    resize_filter: str = "lanczos"
    """Filter of the ``size_level`` resize the encoder sees (the reference: LANCZOS)."""
    sample_vae: bool = True
    """Sample the VAE posterior as the reference does (False: its mean)."""
    restore_size: bool = True
    strength: float = 1.0
    """Below 1, start from the init image's (else the reference's) latent noised to the start time (not in the
    reference pipeline)."""
    init_image: Image.Image | None = None
    """The img2img start point other than the reference, used below strength 1: resized to the working size as
    the reference is for the VAE (bilinear, antialiased), encoded like it with the generator's draw after the
    initial noise (so the reference's and the noise's draws do not move)."""
    teacache: float = 0.0

    def negative(self, text_to_image: bool) -> str:
        if self.negative_prompt is not None:
            return self.negative_prompt
        return default_negative_prompt_v12(text_to_image)


@dataclass(frozen=True)
class ReasoningOptions:
    """Thinking and reflection around v1.2 edits (reference defaults: 3 tries, 20 retries per step, at most 128
    new tokens per reply, sampling with top_p 0.9 and temperature 0.7)."""

    think: bool = True
    reflect: bool = True
    max_tries: int = 3
    """Edits at most, the first included (used with reflection)."""
    seed: int | None = None
    """Seed of the model's sampling; None: the edit's seed."""
    max_new_tokens: int | None = 128
    retries: int = 20

    def validate(self) -> None:
        if isinstance(self.max_tries, bool) or not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise ValueError(
                f"max_tries must be at least 1 (it counts edits, the first one included), got {self.max_tries!r}; "
                "use 1 to reflect once without retrying."
            )
        if not isinstance(self.retries, int) or self.retries < 1:
            raise ValueError(f"retries must be a positive integer, got {self.retries!r}")
        GenerationSettings(max_new_tokens=self.max_new_tokens)

    @property
    def uses_model(self) -> bool:
        return self.think or self.reflect


# ------------------------------------------------------------------------------------------------- edits


def _add(timings, name: str, seconds: float) -> None:
    if timings is not None:
        setattr(timings, name, getattr(timings, name) + seconds)


def edit(stages: V12Stages, image: Image.Image, prompt: str, settings: V12Settings, generator: torch.Generator,
         *, dtype: torch.dtype, callback: Callable[[StepInfo], None] | None = None, timings=None) -> Image.Image:
    """One v1.2 edit of ``image`` by ``prompt``; ``generator`` is drawn for the VAE posterior, then the noise.
    Returns the result at the input size (or the working size without ``restore_size``). ``timings``: an object
    with ``encode_s``, ``sample_s``, ``decode_s`` that the seconds are added to."""
    options = settings.sampling
    t0 = time.perf_counter()
    work = v12.working_size(image, options.size_level)
    cond, uncond = stages.encode(resize_to_size_level(image, options.size_level, settings.resize_filter),
                                 [prompt, settings.negative(False)])
    reference = stages.encode_reference(v12.vae_input(image, work), generator, settings.sample_vae).to(dtype)
    noise = v12.initial_noise(work, generator, dtype)
    init = _init_latent(stages, settings, work, generator, dtype)
    _add(timings, "encode_s", time.perf_counter() - t0)
    return _sample_decode(stages, noise, cond, uncond, reference, settings, image.size, callback, timings, init)


def text_to_image(stages: V12Stages, prompt: str, size: tuple[int, int], settings: V12Settings,
                  generator: torch.Generator, *, dtype: torch.dtype,
                  callback: Callable[[StepInfo], None] | None = None, timings=None) -> Image.Image:
    """v1.2 text-to-image at ``size`` (width, height; floored to multiples of 16): the encoder sees a black
    ``size_level`` square, the negative prompt defaults to v1.2's list, the noise is the generator's first draw.
    Below strength 1 an ``init_image`` is the start point (without one, strength has nothing to start from
    and sampling runs in full)."""
    options = settings.sampling
    t0 = time.perf_counter()
    work = v12.working_size(None, options.size_level, size)
    cond, uncond = stages.encode(blank_reference(options.size_level), [prompt, settings.negative(True)])
    noise = v12.initial_noise(work, generator, dtype)
    init = _init_latent(stages, settings, work, generator, dtype)
    if init is None:
        settings = replace(settings, strength=1.0)
    _add(timings, "encode_s", time.perf_counter() - t0)
    return _sample_decode(stages, noise, cond, uncond, None, settings, size, callback, timings, init)


def _init_latent(stages, settings: V12Settings, work: tuple[int, int], generator: torch.Generator,
                 dtype: torch.dtype) -> Tensor | None:
    """The latent of ``settings.init_image`` at the working size ``work``, or None (none given, or strength 1)."""
    if settings.init_image is None or settings.strength >= 1.0:
        return None
    pixels = v12.vae_input(settings.init_image, work)
    return stages.encode_reference(pixels, generator, settings.sample_vae).to(dtype)


def _sample_decode(stages, noise, cond, uncond, reference, settings, original, callback, timings,
                   init=None) -> Image.Image:
    t0 = time.perf_counter()
    latent = stages.denoise(noise, cond, uncond, reference, settings, callback, init)
    _add(timings, "sample_s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    pixels = v12.to_uint8(stages.decode(latent))
    _add(timings, "decode_s", time.perf_counter() - t0)
    if not settings.restore_size:
        return Image.fromarray(pixels[0].numpy())
    return v12.restore_size(pixels[0], original)


# --------------------------------------------------------------------------------------------- reasoning


def reasoning_edit(stages: V12Stages, image: Image.Image, prompt: str, settings: V12Settings,
                   reasoning: ReasoningOptions, *, dtype: torch.dtype, generate: GenerateFn | None,
                   callback: Callable[[StepInfo], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   on_stage: Callable[[str, int], None] | None = None, timings=None) -> ReasonEditResult:
    """The think → edit → reflect → retry loop of v1.2 with ``stages`` as the editor (see
    :func:`step1x.reasoning.reason_edit`). ``generate`` answers the model calls (a :class:`QwenGenerator` on the
    text encoder, or a stand-in); it may be None only with thinking and reflection both off. Every try's image
    is at the input size (the reflection compares it with the input)."""
    reasoning.validate()
    if reasoning.uses_model and generate is None:
        raise ValueError("thinking and reflection need a generate function (a QwenGenerator on the text encoder)")
    generator = torch.Generator(device="cpu").manual_seed(int(settings.sampling.seed))
    settings = replace(settings, restore_size=True)

    def edit_fn(current: Image.Image, instruction: str, index: int) -> Image.Image:
        return edit(stages, current, instruction, settings, generator, dtype=dtype, callback=callback,
                    timings=timings)

    thinker = None
    if reasoning.uses_model:
        thinker = Thinker(generate, retries=reasoning.retries, should_stop=should_stop)
    return reason_edit(image, prompt, edit_fn, thinker, think=reasoning.think, reflect=reasoning.reflect,
                       max_tries=reasoning.max_tries, should_stop=should_stop, on_stage=on_stage)


def check_generation(encoder, where: str = "") -> None:
    """Raise :class:`CannotGenerateError` naming the fix unless ``encoder`` (a ``TextEncoder``) can write text."""
    try:
        check_can_generate(encoder.model)
    except CannotGenerateError:
        source = getattr(encoder, "source", None)
        raise CannotGenerateError(
            f"thinking and reflection need a text encoder that can write text, but the encoder"
            f"{f' from {source}' if source else ''} was loaded without its language-model head. Load the v1.2 "
            f"text_encoder (of the Step1X-Edit-v1p2 model folder) with generation on{where}."
        ) from None


def qwen_generate(encoder, place: Callable[[], None], reasoning: ReasoningOptions, seed: int, *,
                  should_stop: Callable[[], bool] | None = None,
                  on_token: Callable[[int, int], None] | None = None) -> GenerateFn:
    """A ``GenerateFn`` on the encoder's own model that calls ``place()`` (bring the encoder to its compute
    device) before every reply. The sampling stream is made on the first call, once the encoder is in place."""
    settings = GenerationSettings(max_new_tokens=reasoning.max_new_tokens)
    made: list[QwenGenerator] = []

    def generate(call) -> str:
        place()
        if not made:
            made.append(QwenGenerator.from_encoder(encoder, settings=settings, seed=seed, should_stop=should_stop,
                                                   on_token=on_token))
        return made[0](call)

    return generate


# ----------------------------------------------------------------------------------- stages on modules


def reference_latent(vae, pixels: Tensor, generator: torch.Generator, sample: bool = True) -> Tensor:
    """The model-space latent of VAE input ``pixels`` (B, 3, H, W) in [-1, 1] on the FLUX ``AutoEncoder``
    ``vae``: per image, a posterior sample whose noise is the generator's next draw (v1.2's rule), or the mean
    when ``sample`` is False (the draw is made all the same, so later draws do not move)."""
    rows = []
    with torch.no_grad():
        param = next(vae.parameters())
        for row in pixels.to(device=param.device, dtype=param.dtype).split(1):
            if sample:
                rows.append(v12.encode_reference(vae, row, generator))
                continue
            mean, _ = vae.moments(row)
            torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            rows.append((mean - vae.shift_factor) * vae.scale_factor)
    return torch.cat(rows)



class ModuleStages:
    """:class:`V12Stages` on plain modules: the DiT, the VAE and the text encoder.

    With ``offload`` the models wait on the CPU and each is moved to ``device`` when a stage needs it; the DiT
    and the text encoder are never there together (each sends the other back), and nothing is moved needlessly
    (the encoder stays while several replies are generated). :meth:`release` moves everything back.
    ``offload_encoder`` False leaves the encoder where it is (a device of its own)."""

    def __init__(self, dit, vae, encoder, *, device: torch.device, dtype: torch.dtype, offload: bool = False,
                 offload_encoder: bool | None = None):
        self.dit, self.vae, self.encoder = dit, vae, encoder
        self.device, self.dtype = torch.device(device), dtype
        self.offload = offload
        self.offload_encoder = offload if offload_encoder is None else offload_encoder
        self._here: set[str] = set()

    def _movable(self) -> dict[str, object]:
        out = {"dit": self.dit, "vae": self.vae}
        if self.offload_encoder:
            out["encoder"] = self.encoder
        return out

    def place(self, name: str) -> None:
        """Bring ``name`` ("dit", "vae" or "encoder") to the compute device; the DiT and the encoder each send
        the other back to the CPU first (the VAE is small and sends nothing away)."""
        if not self.offload:
            return
        movable = self._movable()
        if name in LARGE:
            for other in sorted(self._here & (LARGE - {name})):
                movable[other].to("cpu")
                self._here.discard(other)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if name in movable and name not in self._here:
            movable[name].to(self.device)
            self._here.add(name)

    def release(self) -> None:
        """Everything back to the CPU (with offload)."""
        if not self.offload:
            return
        movable = self._movable()
        for name in sorted(self._here):
            movable[name].to("cpu")
        self._here.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def encode(self, image, prompts):
        self.place("encoder")
        return self.encoder.encode_v12(image, prompts)

    def encode_reference(self, pixels, generator, sample):
        self.place("vae")
        return reference_latent(self.vae, pixels, generator, sample)

    def denoise(self, noise, cond, uncond, reference, settings, callback, init=None):
        self.place("dit")
        options = settings.sampling
        with torch.no_grad():
            return denoise(self.dit, noise, cond, uncond, reference=reference, steps=options.steps,
                           cfg_scale=options.cfg_scale, renorm_threshold=options.renorm_threshold,
                           renorm_power=options.renorm_power, strength=settings.strength, init_latent=init,
                           compute_dtype=self.dtype, device=self.device, rules=options.rules,
                           teacache=settings.teacache, regione=options.regione, callback=callback)

    def decode(self, latent):
        self.place("vae")
        with torch.no_grad():
            return v12.decode(self.vae, latent.to(self.dtype))

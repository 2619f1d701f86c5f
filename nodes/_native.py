"""Step1X-Edit as a native ComfyUI ``MODEL``, driven by ComfyUI's own samplers (KSampler, SamplerCustomAdvanced).

Besides :mod:`._comfy`, this is the one module that imports ComfyUI's model classes (``comfy.model_base``,
``comfy.model_sampling``, ``comfy.conds``, ``comfy.lora``, ``comfy.latent_formats``,
``comfy.supported_models_base``). The native nodes import it when they run, so the pack still imports outside
ComfyUI.

* :class:`Step1XEditModel` is a ``comfy.model_base.BaseModel`` of flow type whose ``diffusion_model`` is the
  pack's own ``Step1XEdit`` module. Every model evaluation is the pack's sampler step taken to time 0
  (:func:`step1x.stepwise.denoised`), under the sampler rules of the DiT's version (v1.0/v1.1 official, v1.2
  its reference pipeline's: DiT time, reference positions, one DiT call per row with its own text length):
  connector and DiT run from the conditioning at every step.
* Its conditioning (made by the Step1X-Edit Encode node) is ComfyUI's: the MLLM embedding is the tensor, the
  text mask and v1.2's optional inputs are ``step1x_*`` entries, the reference latent is the
  ``reference_latents`` list that ComfyUI's ReferenceLatent node fills. Every part becomes a ``CONDRegular``,
  which batches the two sides of CFG only when their shapes match: texts of unequal length run as separate
  evaluations, never padded or repeated.
* :class:`Step1XModelSampling` is the official schedule's shift (FLUX's time shift with ``mu`` from the image
  token count); :class:`OfficialGuidance` is the CFG renorm of the version (v1.2: at every step with the
  default threshold), set as ComfyUI's ``sampler_cfg_function``.
* :func:`register_lora_keys` teaches ``comfy.lora.model_lora_keys_unet`` the module names the pack's LoRA
  reader understands, so LoraLoaderModelOnly applies Step1X-Edit LoRA files to this model.

Latents: ComfyUI keeps the raw FLUX VAE latent outside sampling and converts with ``comfy.latent_formats.Flux``
(``(raw - 0.1159) * 0.3611``), which is the pack's model space; sigma is the official time ``t``.
"""

from __future__ import annotations

import comfy.conds
import comfy.latent_formats
import comfy.lora
import comfy.model_base
import comfy.model_sampling
import comfy.supported_models_base
import torch

from ..step1x import stepwise
from ..step1x.checkpoints.lora import linear_shapes, module_names
from ..step1x.sampling.calls import TextConditioning
from ..step1x.sampling.rules import SamplerRules, rules_for
from . import _comfy as bridge
from .dit_memory import ACTIVATION_FACTOR

SIGMA_TABLE = 720720
"""Entries of the model's sigma table (ComfyUI's FLUX uses 10000). ComfyUI's ``simple`` scheduler picks every
``len(table) / steps``-th entry; 720720 is divisible by every step count up to 16 and by 18, 20, 21, 24, 28,
30, 36, 40, 42, 48, 56, 60..., so for those counts ``simple`` lands on the official times."""

TEXT_TOKENS = {"v1.2": 2048}
"""Text tokens assumed for the memory estimate when the conditioning is not known yet: the official maximum, 640
(v1.2: its prompt limit)."""

V12_FIELDS = (("step1x_txt_ids", "txt_ids"), ("step1x_text_embeds", "text_embeds"), ("step1x_text_mask", "text_mask"))
"""Conditioning entries of v1.2 and the model inputs (and TextConditioning fields) they become."""


class Step1XModelSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    """Rectified flow (``x = (1 - t) x0 + t noise``) with the official resolution shift for ``image_tokens``
    tokens: ``sigma(t) = e^mu / (e^mu + 1/t - 1)``, as ComfyUI's FLUX sampling with the official ``mu``."""

    def __init__(self, image_tokens: int = stepwise.DEFAULT_IMAGE_TOKENS):
        torch.nn.Module.__init__(self)
        self.image_tokens = int(image_tokens)
        self.set_parameters(shift=stepwise.schedule_mu(self.image_tokens), timesteps=SIGMA_TABLE)


class Step1XEditConfig(comfy.supported_models_base.BASE):
    """What ComfyUI reads from a model's config: FLUX latents and no network to build (the pack loads it)."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.Flux
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


class Step1XEditModel(comfy.model_base.BaseModel):
    """The Step1X-Edit DiT (with its connector) as a ComfyUI flow model. ``diffusion_model`` is the pack's
    ``Step1XEdit``, so its weights have the official names under ``diffusion_model.``."""

    def __init__(self, dit: torch.nn.Module, compute_dtype: torch.dtype, device=None):
        super().__init__(Step1XEditConfig(Step1XEditConfig.unet_config), comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = dit
        self.model_sampling = Step1XModelSampling()
        self.compute_dtype = compute_dtype
        self.rules = rules_for(dit.params.version)
        storage = self.get_dtype()
        self.manual_cast_dtype = None if storage == compute_dtype else compute_dtype
        self._lora_keys = None

    @property
    def params(self):
        return self.diffusion_model.params

    def get_dtype(self):
        """The dtype the block weights are stored in (fp8 for fp8 files)."""
        return self.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype

    def get_dtype_inference(self):
        return self.compute_dtype

    # ------------------------------------------------------------------------------------- conditioning

    def extra_conds(self, **kwargs):
        cross = kwargs.get("cross_attn")
        width = self.params.connector.in_channels
        if cross is None or cross.ndim != 3 or cross.shape[-1] != width:
            got = "nothing" if cross is None else f"a tensor of shape {tuple(cross.shape)}"
            raise ValueError(f"Step1X-Edit needs the MLLM embedding (batch, tokens, {width}) as conditioning but got "
                             f"{got}: connect the positive and negative outputs of Step1X-Edit Encode")
        mask = kwargs.get("step1x_mask")
        if mask is None:
            mask = torch.ones(cross.shape[:2], dtype=torch.long)
        out = {"c_crossattn": comfy.conds.CONDRegular(cross), "txt_mask": comfy.conds.CONDRegular(mask)}
        for key, name in V12_FIELDS:
            if kwargs.get(key) is not None:
                out[name] = comfy.conds.CONDRegular(kwargs[key])
        refs = kwargs.get("reference_latents")
        noise = kwargs.get("noise")
        if refs:
            reference = self.process_latent_in(refs[-1].float())
            if noise is not None and tuple(reference.shape[-2:]) != tuple(noise.shape[-2:]):
                raise ValueError(
                    f"the reference latent is {reference.shape[-1] * 8}x{reference.shape[-2] * 8} px but the latent "
                    f"being sampled is {noise.shape[-1] * 8}x{noise.shape[-2] * 8} px; Step1X-Edit edits at the "
                    "reference's size: sample the latent output of Step1X-Edit Encode (or an empty latent that size)")
            out["ref_latent"] = comfy.conds.CONDRegular(reference)
        elif kwargs.get("step1x_edit"):
            raise ValueError("this conditioning was encoded with an image but carries no reference latent: connect a "
                             "VAE to Step1X-Edit Encode, or add ReferenceLatent with the image resized to the working "
                             "size (Step1X-Edit Resize) and encoded with the FLUX VAE")
        return out

    def extra_conds_shapes(self, **kwargs):
        out = {}
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = list(kwargs["cross_attn"].shape)
        if kwargs.get("reference_latents"):
            out["ref_latent"] = list(kwargs["reference_latents"][-1].shape)
        return out

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006 (ComfyUI's signature)
        """Activation memory of one evaluation of ``input_shape`` latents, as the pack's sampler estimates it."""
        unknown = TEXT_TOKENS.get(self.params.version, 640)
        text = max((s[1] for s in cond_shapes.get("c_crossattn", [])), default=unknown)
        copies = 2 if cond_shapes.get("ref_latent") else 1
        tokens = text + copies * stepwise.image_tokens(input_shape[-2], input_shape[-1])
        return input_shape[0] * tokens * self.params.hidden_size * self.compute_dtype.itemsize * ACTIVATION_FACTOR

    # ----------------------------------------------------------------------------------------- forward

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},  # noqa: B006
                     **kwargs):
        """The denoised latent ``x - t * v`` for every row, each row with its own text (cond and uncond rows may
        share the batch) and the reference latent."""
        bridge.check_interrupt()
        if control is not None:
            raise ValueError("ControlNets do not apply to Step1X-Edit; remove the Apply ControlNet node")
        text = TextConditioning(c_crossattn, kwargs["txt_mask"], *(kwargs.get(name) for _, name in V12_FIELDS))
        reference = kwargs.get("ref_latent")
        if reference is not None and reference.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"the latent reached the model cropped to {x.shape[-1] * 8}x{x.shape[-2] * 8} px, but Step1X-Edit sees "
                "the whole image with its reference: area conditioning (ConditioningSetArea, or ConditioningSetMask "
                "with set_cond_area 'mask bounds') is not supported; use set_cond_area 'default'")
        with torch.no_grad():
            return stepwise.denoised(self.diffusion_model, x, t, text, reference, compute_dtype=self.compute_dtype,
                                     device=x.device, rules=self.rules)

    # -------------------------------------------------------------------------------------------- LoRA

    def lora_keys(self) -> dict:
        """ComfyUI LoRA key map entries for every module name the pack's LoRA reader understands: the weight
        key, or (key, (dim, offset, rows)) for the q/k/v/mlp parts diffusers files keep apart."""
        if self._lora_keys is None:
            shapes = linear_shapes(self.diffusion_model)
            keys = {}
            for name, (module, part) in module_names(shapes).items():
                key = f"diffusion_model.{module}.weight"
                if part is None:
                    keys[name] = key
                    continue
                out, inp = shapes[module]
                keys[name] = (key, (0, part * inp, inp) if part < 3 else (0, 3 * inp, out - 3 * inp))
            self._lora_keys = keys
        return self._lora_keys


class OfficialGuidance:
    """ComfyUI ``sampler_cfg_function``: the true CFG of the version's ``rules``, whose guidance difference is
    renormalised per token while the renorm condition holds (official: the time above ``renorm_threshold``, 0.93;
    1.0 off; v1.2: the 0-1000 timestep above it, so at every step)."""

    def __init__(self, renorm_threshold: float = 0.93, rules: SamplerRules | None = None):
        self.renorm_threshold = float(renorm_threshold)
        self.rules = rules or rules_for("v1.1")

    def __call__(self, args):
        if args.get("input_uncond") is None:  # no negative conditioning: no guidance
            return args["cond"]
        return stepwise.guided_eps(args["cond"], args["uncond"], args["cond_scale"], args["sigma"],
                                   self.renorm_threshold, self.rules)


# ---------------------------------------------------------------------------------------- model patcher


def native_model(dit: torch.nn.Module, compute_dtype: torch.dtype, load_device, offload_device):
    """A ModelPatcher over :class:`Step1XEditModel` with the official guidance and the schedule of a 512x512
    latent (:func:`with_schedule` sets another size)."""
    register_lora_keys()
    model = Step1XEditModel(dit, compute_dtype, device=offload_device)
    patcher = bridge.manage(model, load_device, offload_device)
    set_guidance(patcher, 0.93)
    return patcher


def check(patcher) -> None:
    if not isinstance(getattr(patcher, "model", None), Step1XEditModel):
        name = type(getattr(patcher, "model", patcher)).__name__
        raise ValueError(f"this node patches a Step1X-Edit model but got a {name}: connect the MODEL output of "
                         "Step1X-Edit Model Loader (or a node after it)")


def set_guidance(patcher, renorm_threshold: float) -> None:
    """Make ``patcher``'s CFG the one its version was published with; ComfyUI's cfg-1 shortcut is turned off
    because that guidance renormalises even at scale 1."""
    guidance = OfficialGuidance(renorm_threshold, patcher.model.rules)
    patcher.set_model_sampler_cfg_function(guidance, disable_cfg1_optimization=True)


def rules(patcher) -> SamplerRules:
    """The sampler rules of a Step1X-Edit MODEL (its version's)."""
    check(patcher)
    return patcher.model.rules


def with_guidance(patcher, renorm_threshold: float):
    check(patcher)
    clone = patcher.clone()
    set_guidance(clone, renorm_threshold)
    return clone


def with_schedule(patcher, height: int, width: int):
    """A clone whose model sampling is the official shift for a (height, width) latent."""
    check(patcher)
    clone = patcher.clone()
    clone.add_object_patch("model_sampling", Step1XModelSampling(stepwise.image_tokens(height, width)))
    return clone


def register_lora_keys() -> None:
    """Wrap ``comfy.lora.model_lora_keys_unet`` (once) so that it adds :meth:`Step1XEditModel.lora_keys` for
    this model; ComfyUI's own entries (``lora_unet_*``, ``diffusion_model.*``) are kept."""
    original = comfy.lora.model_lora_keys_unet
    if getattr(original, "step1x_edit", False):
        return

    def model_lora_keys_unet(model, key_map={}):  # noqa: B006 (ComfyUI's signature)
        key_map = original(model, key_map)
        if isinstance(model, Step1XEditModel):
            for name, target in model.lora_keys().items():
                key_map.setdefault(name, target)
        return key_map

    model_lora_keys_unet.step1x_edit = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet

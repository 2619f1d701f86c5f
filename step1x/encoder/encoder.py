"""The Step1X-Edit instruction encoder.

v1.0/v1.1 (``encode``): (reference image, instruction) -> 640-token embedding and mask, padded batch.
v1.2 (``encode_v12``): one ``TextConditioning`` per instruction, trimmed to its own length, with the text
positions, input embeddings and quote mask the v1.2 DiT needs. The caller picks the layout from the DiT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..sampling.denoise import TextConditioning
from .fp8 import Fp8Linear
from .inputs import MAX_LENGTH, EncoderInputs, build_inputs
from .inputs_v12 import MAX_LENGTH_V12, EncoderInputsV12, build_inputs_v12
from .spec import text_config


@dataclass
class TextEncoderOutput:
    embedding: torch.Tensor
    """[B, max_length, hidden] final-norm hidden states from token 217 on, zero-padded."""
    mask: torch.Tensor
    """[B, max_length] int64, 1 for the filled positions."""


class GenerationUnavailableError(RuntimeError):
    """The loaded encoder has no language-model head, so it cannot write text."""


class TextEncoder:
    """Qwen2.5-VL with the tokenizer and image processor of the Step1X-Edit encoders (v1.0/v1.1 and v1.2)."""

    def __init__(self, model: nn.Module, tokenizer, image_processor, *, dtype: torch.dtype, source: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.dtype = dtype
        self.source = source

    @property
    def hidden_size(self) -> int:
        return text_config(self.model.config).hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def to(self, device: torch.device | str) -> TextEncoder:
        self.model.to(torch.device(device))
        return self

    @property
    def can_generate(self) -> bool:
        """True when the model kept its language-model head (``load_text_encoder(..., generation=True)``)."""
        return isinstance(getattr(self.model, "lm_head", None), (nn.Linear, Fp8Linear))

    @property
    def generation_model(self) -> nn.Module:
        """The same ``Qwen2_5_VLForConditionalGeneration`` (no second copy), for ``generate()``; raises when the
        head was not loaded."""
        if not self.can_generate:
            raise GenerationUnavailableError(
                f"the text encoder{_from(self.source)} was loaded without its language-model head, so it cannot "
                "write text (thinking/reflection). Load it with generation=True from a checkpoint that has "
                "lm_head.weight (or tied embeddings), e.g. the text_encoder folder of Step1X-Edit-v1p2."
            )
        return self.model

    def inputs(self, image: Image.Image, prompt: str, *, max_length: int = MAX_LENGTH) -> EncoderInputs:
        return build_inputs(self.tokenizer, self.image_processor, image, prompt, max_length=max_length)

    @torch.inference_mode()
    def hidden_states(self, inputs: EncoderInputs) -> torch.Tensor:
        """Final-norm hidden states [run_length, hidden] of one prompt, in the model dtype."""
        n = inputs.run_length
        device = self.device
        out = self.model(
            input_ids=inputs.input_ids[:, :n].to(device),
            attention_mask=inputs.attention_mask[:, :n].to(device),
            position_ids=inputs.position_ids[:, :, :n].to(device),
            pixel_values=inputs.pixel_values.to(device),
            image_grid_thw=inputs.image_grid_thw.to(device),
            use_cache=False,
            output_hidden_states=True,
            return_dict=True,
        )
        return out.hidden_states[-1][0]

    @torch.inference_mode()
    def encode(
        self,
        images: Image.Image | Sequence[Image.Image],
        prompts: str | Sequence[str],
        *,
        max_length: int = MAX_LENGTH,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> TextEncoderOutput:
        """Encode each prompt with its image (one image may serve all prompts), one prompt per forward
        as the official encoder does. Images must already be resized to the editing size."""
        images, prompts = _pair_up(images, prompts)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        pairs = zip(images, prompts, strict=True)
        batch = [self.inputs(image, prompt, max_length=max_length) for image, prompt in pairs]
        device = self.device
        embedding = torch.zeros(len(batch), max_length, self.hidden_size, dtype=out_dtype, device=device)
        mask = torch.zeros(len(batch), max_length, dtype=torch.long, device=device)
        for row, inputs in enumerate(batch):
            start, stop = inputs.kept
            kept = self.hidden_states(inputs)[start:stop]
            embedding[row, : stop - start] = kept.to(out_dtype)
            mask[row, : stop - start] = 1
        return TextEncoderOutput(embedding=embedding, mask=mask)

    def encode_pair(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        *,
        max_length: int = MAX_LENGTH,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> TextEncoderOutput:
        """[cond, uncond] for classifier-free guidance; both see the image, as in the official editor."""
        return self.encode([image], [prompt, negative_prompt], max_length=max_length, out_dtype=out_dtype)

    # ------------------------------------------------------------------------------------------------- v1.2

    def inputs_v12(self, image: Image.Image, prompt: str, *, max_length: int = MAX_LENGTH_V12) -> EncoderInputsV12:
        vision = self.model.config.vision_config
        return build_inputs_v12(
            self.tokenizer, image, prompt, max_length=max_length, patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
        )

    @torch.inference_mode()
    def forward_v12(self, inputs: EncoderInputsV12) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings with the image features scattered in, final-norm hidden states), each [L, hidden]
        in the model dtype. The language model runs with plain causal attention over every token."""
        device = self.device
        input_ids = inputs.input_ids.to(device)
        embeds = self.model.get_input_embeddings()(input_ids)
        pixel_values = inputs.pixel_values.to(device, self.dtype)
        features = _image_features(self.model, pixel_values, inputs.image_grid_thw.to(device))
        pads = input_ids == self.model.config.image_token_id
        if int(pads.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt holds {int(pads.sum())} image tokens but the image gives {features.shape[0]} features"
            )
        embeds = embeds.masked_scatter(pads.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))
        out = _language_model(self.model)(
            inputs_embeds=embeds, position_ids=inputs.position_ids.to(device), use_cache=False, return_dict=True
        )
        return embeds[0], out.last_hidden_state[0]

    @torch.inference_mode()
    def encode_v12(
        self,
        image: Image.Image,
        prompts: str | Sequence[str],
        *,
        max_length: int = MAX_LENGTH_V12,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> list[TextConditioning]:
        """One v1.2 conditioning per prompt, each with the same reference ``image`` (already resized to the
        editing size; for text-to-image ``image_v12.blank_reference(size_level)``). Each holds only its own
        tokens (no padding): ``llm_embedding`` and ``text_embeds`` [1, L, hidden] in ``out_dtype`` (bf16 as the
        reference), ``mask`` all ones [1, L] int64, ``txt_ids`` [1, L, 3] float32, ``text_mask`` [1, L] int64."""
        _, prompts = _pair_up(image, prompts)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        batch = [self.inputs_v12(image, prompt, max_length=max_length) for prompt in prompts]
        return [self._conditioning_v12(inputs, out_dtype) for inputs in batch]

    def encode_pair_v12(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        *,
        max_length: int = MAX_LENGTH_V12,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> tuple[TextConditioning, TextConditioning]:
        """(cond, uncond) for v1.2's separate guidance passes; both see the image. The v1.2 negative prompt is
        ``""`` for an edit and ``template.T2I_NEGATIVE_PROMPT_V12`` for text-to-image."""
        cond, uncond = self.encode_v12(image, [prompt, negative_prompt], max_length=max_length, out_dtype=out_dtype)
        return cond, uncond

    def _conditioning_v12(self, inputs: EncoderInputsV12, out_dtype: torch.dtype) -> TextConditioning:
        embeds, hidden = self.forward_v12(inputs)
        start, stop = inputs.kept
        device = hidden.device
        return TextConditioning(
            llm_embedding=hidden[start:stop].to(out_dtype).unsqueeze(0),
            mask=torch.ones(1, stop - start, dtype=torch.long, device=device),
            txt_ids=inputs.txt_ids().unsqueeze(0).to(device),
            text_embeds=embeds[start:stop].to(out_dtype).unsqueeze(0),
            text_mask=inputs.text_mask[:, start:stop].to(device),
        )


def _language_model(model: nn.Module) -> nn.Module:
    """The text decoder: ``model.model.language_model`` (transformers >= 4.52) or ``model.model`` before."""
    inner = model.model
    language_model = getattr(inner, "language_model", None)
    return inner if language_model is None else language_model


def _image_features(model: nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """[image tokens, hidden] merged vision features, whatever the transformers release returns."""
    visual = getattr(model.model, "visual", None)
    visual = model.visual if visual is None else visual
    out = visual(pixel_values, grid_thw=grid)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _from(source: Path | None) -> str:
    return "" if source is None else f" from {source}"


def _pair_up(images, prompts) -> tuple[list[Image.Image], list[str]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(images, Image.Image):
        images = [images]
    prompts, images = list(prompts), list(images)
    if not prompts:
        raise ValueError("no instructions given; pass at least one prompt (it may be an empty string)")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"each instruction must be a string, got {type(prompt).__name__}")
    for image in images:
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"reference images must be PIL images, got {type(image).__name__}; convert ComfyUI IMAGE "
                "tensors with step1x.image_io.comfy_to_pil."
            )
    if len(images) == 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(
            f"got {len(images)} images for {len(prompts)} instructions; pass one image or one per instruction"
        )
    return images, prompts

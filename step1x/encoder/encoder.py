"""The Step1X-Edit instruction encoder: (reference image, instruction) -> 640-token embedding and mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .inputs import MAX_LENGTH, EncoderInputs, build_inputs
from .spec import text_config


@dataclass
class TextEncoderOutput:
    embedding: torch.Tensor
    """[B, max_length, hidden] final-norm hidden states from token 217 on, zero-padded."""
    mask: torch.Tensor
    """[B, max_length] int64, 1 for the filled positions."""


class TextEncoder:
    """Qwen2.5-VL with the tokenizer and image processor of the official Step1X-Edit encoder."""

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

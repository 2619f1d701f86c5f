"""A chat call -> the tensors ``generate()`` gets, as the reference's Qwen2.5-VL processor makes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoder.template import IMAGE_PAD, VISION_END, VISION_START
from ..encoder.tokens import IMAGE_PAD_ID, VIDEO_PAD_ID
from .images import pixel_inputs, prepare_image
from .messages import ChatCall, chat_text


@dataclass(frozen=True)
class ModelInputs:
    text: str
    """The templated text, one ``<|image_pad|>`` per image (what ``apply_chat_template`` returns)."""
    input_ids: torch.Tensor  # [1, L] int64, image pads expanded
    attention_mask: torch.Tensor  # [1, L] int64, all ones
    pixel_values: torch.Tensor | None  # [patches, 1176] float32, all images in order
    image_grid_thw: torch.Tensor | None  # [n_images, 3] int64
    image_sizes: tuple[tuple[int, int], ...]
    """(width, height) of each image after the ``fetch_image`` resize."""

    @property
    def mm_token_type_ids(self) -> torch.Tensor:
        """[1, L] int32: 1 at image tokens, 0 elsewhere. transformers 5 needs it to place the image tokens on
        the multimodal RoPE grid; without it every token gets a plain 1-D position."""
        return (self.input_ids == IMAGE_PAD_ID).to(torch.int32)

    def generate_kwargs(self, device: torch.device | str, *, token_types: bool = True) -> dict[str, torch.Tensor]:
        """Tensors for ``generate()``; ``token_types`` adds ``mm_token_type_ids`` (transformers 5)."""
        out = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values.to(device)
            out["image_grid_thw"] = self.image_grid_thw.to(device)
            if token_types:
                out["mm_token_type_ids"] = self.mm_token_type_ids.to(device)
        return out


def build_model_inputs(call: ChatCall, tokenizer, image_processor) -> ModelInputs:
    prepared = [prepare_image(image) for image in call.images]
    pixel_values = grid = None
    slots: list[str] = []
    if prepared:
        pixel_values, grid = pixel_inputs(image_processor, prepared)
        merge = image_processor.merge_size
        slots = [f"{VISION_START}{IMAGE_PAD * (int(thw.prod()) // (merge * merge))}{VISION_END}" for thw in grid]
    ids = tokenizer(chat_text(call, slots), add_special_tokens=False)["input_ids"]
    _check_placeholders(call, ids, sum(slot.count(IMAGE_PAD) for slot in slots))
    input_ids = torch.tensor([ids], dtype=torch.long)
    return ModelInputs(
        text=chat_text(call),
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        image_sizes=tuple(image.size for image in prepared),
    )


def _check_placeholders(call: ChatCall, ids: list[int], image_tokens: int) -> None:
    found = []
    if ids.count(IMAGE_PAD_ID) != image_tokens:
        found.append("<|image_pad|>")
    if VIDEO_PAD_ID in ids:
        found.append("<|video_pad|>")
    if found:
        raise ValueError(
            f"the {call.kind} prompt contains {', '.join(found)}, a placeholder reserved for images; remove it "
            "from the instruction (or from the text that was fed back into the prompt)."
        )

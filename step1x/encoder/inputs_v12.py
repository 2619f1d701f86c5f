"""Model inputs of one v1.2 (reference image, instruction) pair, built exactly as the v1.2 pipeline builds them.

Pure data: needs the tokenizer, no model. ``kept`` is the slice of the sequence the DiT receives: from
token ``PREFIX_TOKENS_V12`` (the ``:`` that ends "The editing instruction is:") for at most ``max_length``
tokens. The image follows the instruction, so a long instruction truncates the image tokens themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..image_io import to_rgb
from .image_chain import ImageInputError
from .image_v12 import pixel_inputs_v12
from .positions_v12 import shifted_positions, source_to_vision, text_ids, vision_token_grid
from .rope_index import mrope_positions
from .tokens import IMAGE_PAD_ID, prompt_ids_v12

PREFIX_TOKENS_V12 = 90
"""Leading tokens v1.2 discards: the system turn and its preamble up to, not including, the final ``:``."""
MAX_LENGTH_V12 = 2048
COLON_ID = 25


@dataclass(frozen=True)
class EncoderInputsV12:
    input_ids: torch.Tensor  # [1, L] int64
    text_mask: torch.Tensor  # [1, L] int64, 1 on the tokens of quoted characters
    attention_mask: torch.Tensor  # [1, L] int64, 0 where the token id is 0 ("!"); used for the positions only
    position_ids: torch.Tensor  # [3, 1, L] int64, multimodal RoPE positions
    pixel_values: torch.Tensor  # [patches, C*T*P*P] float32
    image_grid_thw: torch.Tensor  # [1, 3] int64
    image_size: tuple[int, int]  # (width, height) of the reference image as given
    num_image_tokens: int
    kept: tuple[int, int]  # [start, stop) of the tokens the DiT receives
    merge_size: int = 2

    @property
    def length(self) -> int:
        return self.kept[1] - self.kept[0]

    @property
    def vision_mask(self) -> torch.Tensor:
        """[length] bool: the kept image-pad tokens."""
        start, stop = self.kept
        return self.input_ids[0, start:stop] == IMAGE_PAD_ID

    @property
    def vision_grid(self) -> tuple[int, int]:
        """(rows, cols) of merged vision tokens."""
        return vision_token_grid(self.image_grid_thw, self.merge_size)

    def affine(self) -> torch.Tensor:
        """[3, 3] float32: reference-image pixels -> vision cells."""
        return source_to_vision(self.image_grid_thw, self.image_size, self.merge_size)

    def shifted_positions(self) -> torch.Tensor:
        """[length, 3] float32 M-RoPE ids of the kept tokens, shifted so the last text token has t = -1."""
        return shifted_positions(self.position_ids[:, 0], self.kept[0], self.length)

    def txt_ids(self) -> torch.Tensor:
        """[length, 3] float32 text positions for the DiT."""
        rows, cols = self.vision_grid
        return text_ids(self.shifted_positions(), self.vision_mask, rows, cols, self.affine())


def build_inputs_v12(
    tokenizer,
    image: Image.Image,
    prompt: str,
    *,
    max_length: int = MAX_LENGTH_V12,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> EncoderInputsV12:
    """``image`` is the reference exactly as the DiT sees it: already resized to the editing size (for
    text-to-image, ``image_v12.blank_reference(size_level)``)."""
    if not isinstance(prompt, str):
        raise ValueError(f"the instruction must be a string, got {type(prompt).__name__}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if not isinstance(image, Image.Image):
        raise ImageInputError(
            f"the reference image must be a PIL image, got {type(image).__name__}; convert ComfyUI IMAGE tensors "
            "with step1x.image_io.comfy_to_pil."
        )
    image = to_rgb(image)
    pixel_values, grid = pixel_inputs_v12(
        image, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size
    )
    num_image_tokens = int(grid.prod()) // (merge_size * merge_size)
    ids, text_mask = prompt_ids_v12(tokenizer, prompt, num_image_tokens)
    if len(ids) <= PREFIX_TOKENS_V12 or ids[PREFIX_TOKENS_V12] != COLON_ID:
        raise ValueError(
            "the tokenizer does not reproduce the v1.2 prompt layout (the ':' ending the preamble is not token "
            f"{PREFIX_TOKENS_V12}); use the Qwen2.5-VL tokenizer files."
        )
    input_ids = torch.tensor([ids], dtype=torch.long)
    attention_mask = (input_ids > 0).long()
    positions = mrope_positions(input_ids[0], attention_mask[0], grid, merge_size).unsqueeze(1)
    stop = PREFIX_TOKENS_V12 + min(max_length, len(ids) - PREFIX_TOKENS_V12)
    return EncoderInputsV12(
        input_ids=input_ids,
        text_mask=torch.tensor([text_mask], dtype=torch.long),
        attention_mask=attention_mask,
        position_ids=positions,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        image_size=image.size,
        num_image_tokens=num_image_tokens,
        kept=(PREFIX_TOKENS_V12, stop),
        merge_size=merge_size,
    )

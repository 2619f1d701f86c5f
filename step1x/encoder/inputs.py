"""Model inputs of one (image, instruction) pair, built exactly as the official encoder builds them.

Pure data: needs the tokenizer and the image processor, no model. ``kept`` is the slice of the final
hidden states the official encoder keeps: from index ``DROP_TOKENS`` for at most ``max_length`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .image_chain import fetch_image, pixel_inputs
from .rope_index import mrope_positions
from .tokens import VISION_END_ID, VISION_START_ID, prompt_ids

DROP_TOKENS = 217
"""Leading tokens the official encoder discards: the system turn and the prefix up to, not including,
the ``:`` that ends "User Prompt:". The kept part starts ``:``, ``<|vision_start|>``, image tokens."""

MAX_LENGTH = 640


@dataclass(frozen=True)
class EncoderInputs:
    input_ids: torch.Tensor  # [1, L] int64
    attention_mask: torch.Tensor  # [1, L] int64, 0 where the token id is 0 ("!")
    position_ids: torch.Tensor  # [3, 1, L] int64, multimodal RoPE positions
    pixel_values: torch.Tensor  # [patches, C*T*P*P] float32
    image_grid_thw: torch.Tensor  # [1, 3] int64
    num_image_tokens: int
    kept: tuple[int, int]  # [start, stop) of the hidden states that become the embedding

    @property
    def run_length(self) -> int:
        """Tokens the model must see: later ones cannot change earlier hidden states (causal attention),
        but the image tokens must all be present."""
        vision_end = int((self.input_ids[0] == VISION_END_ID).nonzero()[0])
        return max(self.kept[1], vision_end + 1)


def build_inputs(
    tokenizer,
    image_processor,
    image: Image.Image,
    prompt: str,
    *,
    max_length: int = MAX_LENGTH,
) -> EncoderInputs:
    if not isinstance(prompt, str):
        raise ValueError(f"the instruction must be a string, got {type(prompt).__name__}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    fetched = fetch_image(image)
    pixel_values, grid = pixel_inputs(image_processor, fetched)
    merge = image_processor.merge_size
    num_image_tokens = int(grid.prod()) // (merge * merge)
    ids = prompt_ids(tokenizer, prompt, num_image_tokens)
    if len(ids) <= DROP_TOKENS + 1 or ids[DROP_TOKENS + 1] != VISION_START_ID:
        raise ValueError(
            "the tokenizer does not reproduce the official prompt layout (<|vision_start|> is not token "
            f"{DROP_TOKENS + 1}); use the Qwen2.5-VL tokenizer files."
        )
    input_ids = torch.tensor([ids], dtype=torch.long)
    attention_mask = (input_ids > 0).long()
    positions = mrope_positions(input_ids[0], attention_mask[0], grid, merge).unsqueeze(1)
    stop = min(len(ids), DROP_TOKENS + max_length)
    return EncoderInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        num_image_tokens=num_image_tokens,
        kept=(DROP_TOKENS, stop),
    )

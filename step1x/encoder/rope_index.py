"""Multimodal RoPE positions exactly as the official encoder got them from transformers 4.49/4.51.

Text tokens count up by one on all three axes. The image's tokens take (0, row, col) offsets from the
position after the text before them, and the text after the image restarts one past the largest image
position. Masked tokens (attention mask 0) are left out of the count and get position 1 on every axis;
newer transformers give them 0, so positions are computed here and passed to the model explicitly.
"""

from __future__ import annotations

import torch

from .tokens import IMAGE_PAD_ID, VISION_START_ID


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Positions [3, L] for one sequence ``input_ids`` [L] holding the images of ``image_grid_thw`` [n, 3]."""
    ids = input_ids.tolist()
    keep = attention_mask.bool()
    live = [tok for tok, on in zip(ids, keep.tolist(), strict=True) if on]
    image_starts = [i for i in range(len(live) - 1) if live[i] == VISION_START_ID and live[i + 1] == IMAGE_PAD_ID]
    if len(image_starts) > len(image_grid_thw):
        raise ValueError(
            f"the prompt holds {len(image_starts)} images but {len(image_grid_thw)} image grids were given"
        )
    chunks: list[torch.Tensor] = []
    next_pos = 0
    cursor = 0
    for grid in image_grid_thw[: len(image_starts)].tolist():
        first_pad = live.index(IMAGE_PAD_ID, cursor)
        text_len = first_pad - cursor
        chunks.append(torch.arange(text_len).expand(3, -1) + next_pos)
        t, h, w = grid[0], grid[1] // spatial_merge_size, grid[2] // spatial_merge_size
        rows = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
        cols = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
        frames = torch.zeros_like(rows)
        chunks.append(torch.stack([frames, rows, cols]) + next_pos + text_len)
        next_pos = int(chunks[-1].max()) + 1
        cursor = first_pad + t * h * w
    if cursor < len(live):
        chunks.append(torch.arange(len(live) - cursor).expand(3, -1) + next_pos)
    positions = torch.ones(3, len(ids), dtype=torch.long)
    if chunks:
        positions[:, keep] = torch.cat(chunks, dim=1)
    return positions

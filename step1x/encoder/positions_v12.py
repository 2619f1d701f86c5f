"""v1.2 text positions for the DiT: the kept M-RoPE ids shifted negative, image tokens placed on the latent grid.

1. The M-RoPE ids of the kept tokens, as rows (t, h, w), minus ``max(t over the kept tokens) + 1`` on all
   three channels, so the last kept text token sits at t = -1.
2. Text tokens keep only t: (t, 0, 0).
3. Image-pad tokens keep t and get (y, x) = the centre of their merged 28-pixel vision cell mapped into
   packed-latent coordinates (16 pixels per token): ``VAE_AFFINE @ inv(source_to_vision)`` applied to
   (col, row). ``source_to_vision`` takes reference-image pixels to vision cells, through the processor's
   resize. Only the first k cells (row-major) are used when truncation kept k image tokens.

Everything is float32, computed with the same tensor operations as the reference so the fractional
positions agree bit for bit.
"""

from __future__ import annotations

import torch

VISION_AFFINE = ((1 / 28, 0.0, -13.5 / 28), (0.0, 1 / 28, -13.5 / 28), (0.0, 0.0, 1.0))
"""Pixels of the processor-sized image -> merged vision cells (28 pixels, centre at 13.5)."""
VAE_AFFINE = ((1 / 16, 0.0, -11 / 16), (0.0, 1 / 16, -11 / 16), (0.0, 0.0, 1.0))
"""Pixels of the reference image -> packed latent tokens (16 pixels each)."""
VISION_CELL = 28


def vision_token_grid(image_grid_thw: torch.Tensor, merge_size: int = 2) -> tuple[int, int]:
    """(rows, cols) of merged vision tokens."""
    _, h, w = (int(v) for v in image_grid_thw.reshape(-1, 3)[0])
    return h // merge_size, w // merge_size


def source_to_vision(image_grid_thw: torch.Tensor, image_size: tuple[int, int], merge_size: int = 2) -> torch.Tensor:
    """The 3x3 float32 affine from reference-image pixels (x, y, 1) to vision-cell coordinates."""
    rows, cols = vision_token_grid(image_grid_thw, merge_size)
    source_w, source_h = image_size
    if source_w < 2 or source_h < 2:
        raise ValueError(f"the reference image is {source_w}x{source_h} pixels; v1.2 needs at least 2x2")
    resize = torch.eye(3)
    ratio = torch.tensor([cols * VISION_CELL - 1, rows * VISION_CELL - 1], dtype=torch.float32)
    ratio = ratio / torch.tensor([source_w - 1, source_h - 1], dtype=torch.float32)
    resize[0, 0], resize[1, 1] = ratio[0], ratio[1]
    return torch.tensor(VISION_AFFINE, dtype=torch.float32) @ resize


def shifted_positions(position_ids: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """[length, 3] float32: the M-RoPE ids ``position_ids`` [3, L] of the kept tokens, shifted (step 1)."""
    kept = position_ids[:, start : start + length].transpose(0, 1).to(torch.float32)
    return kept - (kept[:, 0].max() + 1)


def vision_cell_positions(rows: int, cols: int, affine: torch.Tensor) -> torch.Tensor:
    """[rows*cols, 2] float32 (y, x) latent-grid positions of the vision cells, row-major (step 3)."""
    cell = torch.zeros(rows, cols, 2)
    cell[..., 0] = cell[..., 0] + torch.arange(rows, dtype=torch.float32)[:, None]
    cell[..., 1] = cell[..., 1] + torch.arange(cols, dtype=torch.float32)[None, :]
    to_latent = torch.tensor(VAE_AFFINE, dtype=torch.float32) @ torch.linalg.inv(affine.to(torch.float32))
    xy = cell[..., [1, 0]].reshape(-1, 2)
    xy = xy @ to_latent[:2, :2].T + to_latent[:2, -1][None]
    return xy[:, [1, 0]]


def text_ids(
    shifted: torch.Tensor, vision_mask: torch.Tensor, rows: int, cols: int, affine: torch.Tensor
) -> torch.Tensor:
    """[length, 3] float32 ``txt_ids`` from the shifted positions and the kept image-pad mask (steps 2-3)."""
    ids = shifted.clone()
    ids[:, 1:] = 0
    mask = vision_mask.bool()
    count = int(mask.sum())
    if count > rows * cols:
        raise ValueError(f"{count} image tokens for a {rows}x{cols} vision grid")
    ids[mask, 1:] = vision_cell_positions(rows, cols, affine)[:count]
    return ids

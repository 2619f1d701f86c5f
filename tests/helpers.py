"""Plain helpers shared by several test modules (no fixtures, no tests: the fixtures are in ``conftest.py``)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def seeded_image(width: int, height: int, seed: int | None = None) -> Image.Image:
    """Uniform random RGB pixels from ``numpy.random.default_rng(seed)``; without a seed, ``W*7+H``, the seed
    the official token fixtures used."""
    rng = np.random.default_rng(width * 7 + height if seed is None else seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


def flux_dev_state(step1x_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.1-dev style DiT made from a Step1X-Edit state dict: no connector, and a guidance embedder."""
    flux = {k: v for k, v in step1x_state.items() if not k.startswith("connector.")}
    flux["guidance_in.in_layer.weight"] = torch.zeros(64, 256)
    return flux


def sd_vae_state() -> dict[str, torch.Tensor]:
    """The tensors by which a 4-channel (SD/SDXL) VAE is told from the 16-channel FLUX VAE."""
    return {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3), "encoder.conv_out.weight": torch.zeros(8, 32, 3, 3),
            "decoder.conv_in.weight": torch.zeros(32, 4, 3, 3)}


def constructed_edit(rows: int = 12, cols: int = 16, rect=(3, 8, 4, 11), seed: int = 0, batch: int = 1,
                     gain: float = 4.0):
    """(noise, reference) latents on a ``rows x cols`` token grid with a known edit region, as the RegionE
    fixtures build it: outside ``rect`` = (row0, row1, col0, col1) the noise is ``gain`` x the reference, so the
    one-step estimate points at the reference there; inside it the noise is independent. (The v1.2 reference set
    scales the DiT's output by 4, and its fixture takes gain 20.)"""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(batch, 16, rows * 2, cols * 2, generator=g)
    noise = gain * reference.clone()
    r0, r1, c0, c1 = rect
    noise[:, :, 2 * r0:2 * r1, 2 * c0:2 * c1] = torch.randn(batch, 16, 2 * (r1 - r0), 2 * (c1 - c0), generator=g)
    return noise, reference


REGIONE_KINDS = {"full": "full", "full_fill_kv": "partition", "region": "region", "cached": "cached",
                 "refresh_fill_kv": "refresh"}
"""The RegionE reference records' step kinds -> :class:`step1x.sampling.regione.StepRecord` kinds."""
REGIONE_BRANCHES = {"forced": "forced compute", "ratio>=1": "ratio>=1", "error>threshold": "error>cache_threshold",
                    "reuse": "error<=cache_threshold"}
"""Velocity-cache branches -> the start of the reference records' branch text."""
REGIONE_BLOCKS = {"double_blocks.0": "transformer_blocks.0", "single_blocks.0": "single_transformer_blocks.0"}
"""Our block names -> the reference's (diffusers) names in the K/V snapshots."""

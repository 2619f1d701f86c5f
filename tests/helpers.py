"""Plain helpers shared by several test modules (no fixtures, no tests: the fixtures are in ``conftest.py``)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def seeded_image(width: int, height: int, seed: int | None = None) -> Image.Image:
    """Uniform random RGB pixels from ``numpy.random.default_rng(seed)``; without a seed, ``W*7+H``, the seed
    the official token fixtures used."""
    rng = np.random.default_rng(width * 7 + height if seed is None else seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")

"""TeaCache for the Step1X-Edit DiT, as in the later official code: skip the transformer blocks on steps
whose input changed little, reusing the residual the blocks added at the last computed step.

The change is measured on ``double_blocks[0].img_norm1(img_in(img))`` (relative L1 to the last step),
rescaled by the official polynomial and accumulated; while the sum stays under ``threshold`` the blocks are
skipped. The first and last steps are always computed. Opt-in: results differ from a full run (threshold
0.2 roughly halves the block evaluations at 28 steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

STEP1X_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
"""The official rescale polynomial (highest power first) fitted for Step1X-Edit."""


def _polyval(coefficients: tuple[float, ...], x: float) -> float:
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


@dataclass
class TeaCache:
    """State of one sampling run (one per CFG half when the halves run separately)."""

    threshold: float
    total_steps: int
    coefficients: tuple[float, ...] = STEP1X_COEFFICIENTS
    step: int = 0
    accumulated: float = 0.0
    previous_input: Tensor | None = None
    residual: Tensor | None = None
    skipped: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"TeaCache threshold must be a number >= 0, got {self.threshold}")

    def should_compute(self, modulated_input: Tensor) -> bool:
        """Decide for the current step and advance the step counter."""
        step, self.step = self.step, self.step + 1
        compute = True
        if step == 0 or step == self.total_steps - 1 or self.residual is None or self.previous_input is None \
                or self.previous_input.shape != modulated_input.shape:
            self.accumulated = 0.0
        else:
            prev = self.previous_input
            change = ((modulated_input - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += _polyval(self.coefficients, change)
            if self.accumulated < self.threshold:
                compute = False
                self.skipped.append(step)
            else:
                self.accumulated = 0.0
        self.previous_input = modulated_input
        return compute

    def remember(self, block_input: Tensor, block_output: Tensor) -> None:
        self.residual = block_output - block_input

    def reuse(self, block_input: Tensor) -> Tensor:
        return block_input + self.residual


def run_blocks_cached(model, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, cache: TeaCache | None) -> Tensor:
    """The double and single blocks of ``model`` on embedded ``img``/``txt``; returns the image tokens."""
    if cache is not None:
        probe = model.double_blocks[0].img_norm1(img) if len(model.double_blocks) else img
        if not cache.should_compute(probe):
            return cache.reuse(img)
    start = img
    for block in model.double_blocks:
        img, txt = block(img, txt, vec, pe)
    txt_len = txt.shape[1]
    img = torch.cat((txt, img), 1)
    del txt
    for block in model.single_blocks:
        img = block(img, vec, pe)
    img = img[:, txt_len:]
    if cache is not None:
        cache.remember(start, img)
    return img

"""The small rules in which the v1.2 reference sampler differs from the official Step1X-Edit loop.

Both samplers are rectified-flow Euler steps with true CFG and the renorm of the guidance difference;
:func:`~step1x.sampling.denoise.denoise` runs either, switched by a :class:`SamplerRules`:

* **official** (v1.0/v1.1, ``inference.py``): schedule ``linspace(1, 0, N+1)`` shifted in torch float32;
  the DiT time is ``t`` in the compute dtype; renorm while ``t > threshold`` (``t`` in [0, 1]); the Euler
  step in the compute dtype with a Python-float ``dt``; cond and uncond as one padded batch of 2, under
  autocast; reference tokens at ``(1, row + 1, col + 1)`` (v1.1) or ``(0, row, col)`` (v1.0).
* **v1.2** (the diffusers pipeline of Step1X-Edit v1.2 and its ``FlowMatchEulerDiscreteScheduler``):
  sigmas ``linspace(1, 1/N, N)`` shifted in numpy float32, then 0 appended (within 1 ulp of the official
  ones); the DiT time is ``(sigma * 1000 in float32, cast to the latent dtype) / 1000``; renorm while the
  0-1000 timestep ``sigma * 1000`` exceeds the threshold, so the default 0.93 renorms at every step; the
  Euler step adds ``dt * v`` (in the velocity's dtype) to the latent upcast to float32 and casts back;
  cond and uncond as separate batch-1 calls, each with its own text length and positions; no autocast;
  reference tokens at ``(1, row, col)``.

:data:`DIFFUSERS_V11` is the fork's diffusers v1.1 pipeline (the v1.2 rules with the official CFG batch and
v1.1 reference positions), on which the RegionE reference ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..models.configs import SHIFT_BASE, SHIFT_MAX

NUM_TRAIN_TIMESTEPS = 1000
"""The scheduler's timestep scale (diffusers ``num_train_timesteps``)."""


@dataclass(frozen=True)
class SamplerRules:
    name: str
    diffusers_schedule: bool = False
    """Sigmas as the v1.2 scheduler computes them (numpy float32) instead of the official torch ones."""
    diffusers_timestep: bool = False
    """DiT time ``(sigma * 1000) / 1000`` in the latent dtype (v1.2) instead of ``sigma`` in it."""
    renorm_time_scale: float = 1.0
    """The renorm compares ``sigma * renorm_time_scale`` with the threshold: 1 is the official rule,
    1000 the v1.2 pipeline's (its timesteps run 0-1000, so a threshold below 1 renorms every step)."""
    fp32_euler: bool = False
    """Euler step on the latent upcast to float32 (v1.2 scheduler) instead of in the compute dtype."""
    separate_cfg: bool = False
    """Every DiT call is one image row and one CFG side, each with its own text (v1.2)."""
    autocast: bool = True
    """Run under autocast to the compute dtype (official) or without (v1.2, whose weights and latents share
    one dtype)."""
    reference_rows_from_zero: bool = False
    """Reference tokens at ``(1, row, col)`` (v1.2) instead of the official ``reference_id_base`` rule."""

    def with_official_renorm(self) -> "SamplerRules":
        """The same rules with the official renorm condition (``sigma > threshold``): with threshold 0.93
        only the first steps are renormed, as in Step1X-Edit v1.1."""
        return replace(self, renorm_time_scale=1.0)

    # ---------------------------------------------------------------------------------------- schedule

    def schedule(self, num_steps: int, image_seq_len: int) -> list[float]:
        """``num_steps + 1`` sigmas from 1 to 0 for ``image_seq_len`` noisy tokens (float32 values)."""
        if self.diffusers_schedule:
            return diffusers_schedule(num_steps, image_seq_len)
        return official_schedule(num_steps, image_seq_len)

    # ------------------------------------------------------------------------------------------- steps

    def dit_time(self, sigma: float, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The time the DiT (and its connector) gets, one per row."""
        if self.diffusers_timestep:
            timestep = torch.full((rows,), sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS
            return (timestep.to(dtype) / NUM_TRAIN_TIMESTEPS).to(device)
        return torch.full((rows,), sigma, dtype=dtype, device=device)

    def renorm_active(self, sigma: float, threshold: float) -> bool:
        if self.renorm_time_scale == 1.0:
            return sigma > threshold
        return float(torch.tensor(sigma, dtype=torch.float32) * self.renorm_time_scale) > threshold

    def euler(self, latent: Tensor, velocity: Tensor, sigma: float, sigma_next: float) -> Tensor:
        """One Euler step from ``sigma`` to ``sigma_next``."""
        if self.fp32_euler:
            dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
            return (latent.float() + dt.to(velocity.device) * velocity).to(velocity.dtype)
        return latent + (sigma_next - sigma) * velocity


OFFICIAL = SamplerRules("official")
"""Step1X-Edit v1.0/v1.1 as the official ``inference.py`` samples."""

V12 = SamplerRules("v1.2", diffusers_schedule=True, diffusers_timestep=True, renorm_time_scale=NUM_TRAIN_TIMESTEPS,
                   fp32_euler=True, separate_cfg=True, autocast=False, reference_rows_from_zero=True)
"""Step1X-Edit v1.2 as its reference pipeline samples (renorm at every step with threshold 0.93)."""


DIFFUSERS_V11 = replace(V12, name="v1.1 diffusers", separate_cfg=False, reference_rows_from_zero=False)
"""Step1X-Edit v1.1 as the diffusers ``Step1XEditPipeline`` of the v1.2 fork samples (the pipeline RegionE's
reference code runs on): the v1.2 schedule, DiT time, renorm condition and Euler step, with cond and uncond as
one [cond; uncond] batch (text zero-positioned, padded alike) and the official v1.1 reference positions
``(1, row + 1, col + 1)``."""


def rules_for(version: str) -> SamplerRules:
    """The sampler a Step1X-Edit ``version`` was published with."""
    return V12 if version == "v1.2" else OFFICIAL


# ---------------------------------------------------------------------------------------------- schedules


def shift_mu(image_seq_len: int) -> float:
    """``mu`` of the time shift, linear in the token count between (256, 0.5) and (4096, 1.15)."""
    (x1, y1), (x2, y2) = SHIFT_BASE, SHIFT_MAX
    slope = (y2 - y1) / (x2 - x1)
    return image_seq_len * slope + (y1 - slope * x1)


def official_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """``num_steps + 1`` times from 1 to 0: the official ``get_schedule``, a float32 torch ``linspace``
    shifted towards 1 for larger images."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = shift_mu(image_seq_len)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return t.tolist()


def diffusers_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """The v1.2 pipeline's sigmas: ``linspace(1, 1/N, N)`` as numpy float32, the same time shift computed in
    numpy float32, then a final 0. Differs from :func:`official_schedule` by at most 1 ulp."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    mu = shift_mu(image_seq_len)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return [float(s) for s in np.asarray(sigmas, dtype=np.float32)] + [0.0]


def timesteps_1000(sigmas: list[float]) -> Tensor:
    """The v1.2 scheduler's ``timesteps``: ``sigma * 1000`` in float32, without the final 0."""
    return torch.tensor(sigmas[:-1], dtype=torch.float32) * NUM_TRAIN_TIMESTEPS

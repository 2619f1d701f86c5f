"""RegionE's rules, apart from the DiT: settings, the step plan, the velocity-cache decision and the partition.

RegionE (arXiv 2510.03065) runs a few full warm-up steps, then splits the image tokens into an *edited* set
(the one-step estimate of the result differs from the reference) and an *unedited* set. Unedited tokens jump
to a later time in one step and wait there; only edited tokens go through the DiT until a refresh step or the
post steps bring everything back together. Between computed steps a velocity may be reused, decayed by a
ratio predicted from a fitted table (``gamma``) and the time step alone.

Everything here is a function of the schedule and the settings (no weights, no images), except
:func:`partition`, which reads the one-step estimate and the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_STEPS = 28
"""The step count the decay tables were fitted for (and the only one the reference code accepts)."""

DECAY_V11 = (0.9746, 0.9593, 1.0036, 1.0084, 1.0106, 1.0114, 1.0138, 1.0163, 1.0152, 1.0163, 1.0197, 1.0186,
             1.0219, 1.0218, 1.0223, 1.0266, 1.0272, 1.0305, 1.0311, 1.0362, 1.0385, 1.0423, 1.0500, 1.0536,
             1.0671, 1.0866, 1.1015)
"""RegionE's fitted velocity decay per step for Step1X-Edit v1.0/v1.1 at 28 steps (used in float16)."""

DECAY_V12 = (0.7936, 0.9807, 1.0063, 1.0205, 0.9946, 1.0125, 1.0116, 1.0125, 1.0172, 1.0171, 1.0183, 1.0170,
             1.0170, 1.0236, 1.0263, 1.0264, 1.0277, 1.0321, 1.0338, 1.0361, 1.0396, 1.0454, 1.0492, 1.0566,
             1.0696, 1.0879, 1.1179)
"""The table refitted for Step1X-Edit v1.2."""

REGION_SOURCES = ("similarity", "mask")


def decay_table(version: str) -> Tensor:
    """The float16 decay table for a model version ("v1.0", "v1.1" or "v1.2")."""
    values = DECAY_V12 if version == "v1.2" else DECAY_V11
    return torch.tensor(values, dtype=torch.float16)


@dataclass(frozen=True)
class RegionEConfig:
    """RegionE settings. ``None`` step settings take the reference defaults (warm-up 6, post 2, refresh 16 at
    28 steps) scaled to the run's step count; explicit values are used as given (see :func:`plan_steps`).

    * ``threshold``: a token is *edited* when the cosine similarity between the one-step estimate and the
      reference is at most this (0.88).
    * ``cache_threshold``: the largest predicted drift ``1 - prod(ratio)`` for reusing a velocity (0.02).
    * ``erosion_dilation``: clean the edited mask with a 3x3-cross erosion, then a 5x5-square dilation.
    * ``region``: "similarity" (RegionE's own partition) or "mask": with a keep mask, the edited region is the
      mask's tokens and the similarity test is skipped. With a mask and "similarity", tokens wholly outside the
      mask are never edited (they keep the reference anyway).
    """

    threshold: float = 0.88
    cache_threshold: float = 0.02
    warmup_steps: int | None = None
    post_steps: int | None = None
    refresh_steps: tuple[int, ...] | None = None
    erosion_dilation: bool = True
    region: str = "similarity"

    def __post_init__(self):
        if not math.isfinite(self.threshold) or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"RegionE threshold is a cosine similarity within [-1, 1], got {self.threshold} "
                             "(0.88 is the reference setting)")
        if not math.isfinite(self.cache_threshold) or self.cache_threshold < 0:
            raise ValueError(f"RegionE cache_threshold must be >= 0, got {self.cache_threshold} (0.02 is the "
                             "reference setting; 0 never reuses a velocity)")
        if self.region not in REGION_SOURCES:
            raise ValueError(f"RegionE region must be one of {REGION_SOURCES}, got {self.region!r}")
        if self.refresh_steps is not None:
            object.__setattr__(self, "refresh_steps", tuple(int(r) for r in self.refresh_steps))


def parse_refresh(text: str) -> tuple[int, ...]:
    """``"16"`` or ``"12,20"`` (the reference's comma list) -> a tuple; ``""`` -> no refresh."""
    try:
        return tuple(int(item) for item in text.replace(" ", "").split(",") if item)
    except ValueError:
        raise ValueError(f"refresh steps {text!r} must be a comma list of step numbers, e.g. 16 or 12,20") from None


@dataclass(frozen=True)
class StepPlan:
    """Where the phases fall in a run of ``steps`` steps (0-based step indices).

    * ``partition``: the step that fills the K/V cache and splits the tokens (``warmup - 1``).
    * ``refresh``: full steps that re-fill the cache (each reference refresh value ``r`` is step ``r - 1``).
    * ``post``: the first post step (``steps - post_steps``); from there on every step is full.
    ``active`` is False when no step is left between the partition and the post steps."""

    steps: int
    warmup: int
    post_steps: int
    refresh: tuple[int, ...]

    @property
    def partition(self) -> int:
        return self.warmup - 1

    @property
    def post(self) -> int:
        return self.steps - self.post_steps

    @property
    def active(self) -> bool:
        return self.warmup < self.post

    def forced(self, i: int) -> bool:
        """Steps that always compute: warm-up (including the first region step), refresh and post steps."""
        return i <= self.warmup or i >= self.post or i in self.refresh

    def jump_target(self, i: int) -> int:
        """The step whose input level unedited tokens jump to from the partition or refresh step ``i``."""
        later = [r for r in self.refresh if r > i]
        return later[0] if later else self.post

    def full(self, i: int) -> bool:
        """Whether step ``i`` runs on all tokens with the reference tokens."""
        return i <= self.partition or i >= self.post or i in self.refresh


def _scaled(value: int, steps: int) -> int:
    return math.floor(value * steps / REFERENCE_STEPS + 0.5)


def plan_steps(config: RegionEConfig, steps: int) -> StepPlan:
    """The step plan for ``steps`` steps.

    Defaults scale with the step count: ``round(6n/28)`` warm-up steps (at least 1), ``round(2n/28)`` post
    steps, refresh at ``round(16n/28)``; a scaled refresh step that does not fit the reference's limits is
    dropped. Explicit values must satisfy the reference's limits (an error says which and why): warm-up >= 1,
    each refresh ``r`` within ``warmup + 1 < r <= steps - post - 1`` and no two adjacent."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, _scaled(6, steps))
    post = config.post_steps if config.post_steps is not None else _scaled(2, steps)
    if warmup < 1:
        raise ValueError(f"RegionE warm-up steps must be at least 1, got {warmup}")
    if post < 0:
        raise ValueError(f"RegionE post steps must be 0 or more, got {post}")
    lo, hi = warmup + 1, steps - post - 1
    if config.refresh_steps is None:
        values = [r for r in [_scaled(16, steps)] if lo < r <= hi]
    else:
        values = sorted(set(config.refresh_steps))
        bad = [r for r in values if not lo < r <= hi]
        if bad:
            raise ValueError(
                f"RegionE refresh step(s) {bad} do not fit {steps} steps with warm-up {warmup} and post {post}: each "
                f"must be above {lo} and at most {hi}")
        if any(b - a == 1 for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"RegionE refresh steps {values} must not be adjacent")
    return StepPlan(steps, warmup, post, tuple(r - 1 for r in values))


# ------------------------------------------------------------------------------------- velocity cache


def timesteps_1000(sigmas: Tensor) -> Tensor:
    """The timesteps a diffusers flow-match scheduler holds: ``sigma * 1000`` in float32."""
    return sigmas[:-1].to(torch.float32) * 1000


class DecayRatios:
    """``ratio_i``: the predicted change of the velocity from step ``i - 1`` to step ``i``.

    On the reference's own 28-step schedule this is the reference formula
    ``gamma[i - 1] * (1 + (t_i - t_{i-1}) / 1000)`` in float32. On any other schedule the table is read as a
    rate per unit of time: ``ln ratio`` of each reference step divided by its time span gives a piecewise
    constant rate over the reference schedule (``reference_sigmas``, the 28-step schedule at the same image
    size), and a step of the run takes that rate integrated over its own span (the last reference rate
    continues down to 0). So the reuse decisions follow time, not step numbers."""

    def __init__(self, table: Tensor, sigmas: Tensor, reference_sigmas: Tensor | None = None):
        self.table = table.to(torch.float16)
        self.t = timesteps_1000(sigmas)
        self.exact = reference_sigmas is None
        if not self.exact:
            ref = reference_sigmas.double()
            span = ref[:-2] - ref[1:-1]
            ratio = self.table.double() * (1 + (ref[1:-1] - ref[:-2]))
            self.rates = torch.log(ratio) / span
            self.edges = ref[:-1]
            self.sigmas = sigmas.double()

    def __call__(self, i: int) -> tuple[Tensor, dict]:
        if self.exact:
            inputs = {"gamma_index": i - 1, "gamma_fp16": float(self.table[i - 1]), "t": float(self.t[i]),
                      "t_prev": float(self.t[i - 1])}
            return self.table[i - 1] * (1 + (self.t[i] - self.t[i - 1]) / 1000), inputs
        hi, lo = float(self.sigmas[i - 1]), float(self.sigmas[i])
        log_ratio = 0.0
        for j, rate in enumerate(self.rates.tolist()):
            top = float(self.edges[j])
            bottom = float(self.edges[j + 1]) if j + 1 < len(self.rates) else 0.0
            overlap = min(hi, top) - max(lo, bottom)
            if overlap > 0:
                log_ratio += rate * overlap
        return torch.tensor(math.exp(log_ratio), dtype=torch.float32), {"sigma": lo, "sigma_prev": hi}


@dataclass
class CacheDecision:
    """What the velocity cache decided at one step, with the numbers it compared."""

    step: int
    compute: bool
    branch: str
    """"forced", "ratio>=1", "error>threshold" or "reuse"."""
    ratio: float | None = None
    accumulate: float | None = None
    error: float | None = None
    inputs: dict = field(default_factory=dict)


class VelocityCache:
    """RegionE's reuse rule. Steps the plan forces always compute; otherwise ``ratio >= 1`` computes, else the
    running product ``acc *= ratio`` gives ``err = 1 - acc``; ``err > cache_threshold`` computes, and
    otherwise the last computed velocity is reused times the current ratio. Every compute resets ``acc``."""

    def __init__(self, plan: StepPlan, ratios: DecayRatios, threshold: float):
        self.plan, self.ratios = plan, ratios
        self.threshold = torch.tensor(threshold, dtype=torch.float32)
        self.accumulate: Tensor | float = 1
        self.ratio: Tensor | None = None

    def decide(self, i: int) -> CacheDecision:
        if self.plan.forced(i):
            self.accumulate = 1
            return CacheDecision(i, True, "forced")
        ratio, inputs = self.ratios(i)
        self.ratio = ratio
        if ratio >= 1:
            self.accumulate = 1
            return CacheDecision(i, True, "ratio>=1", float(ratio), inputs=inputs)
        acc = self.accumulate * ratio
        error = 1 - acc
        decision = CacheDecision(i, bool(error > self.threshold), "", float(ratio), float(acc), float(error), inputs)
        if decision.compute:
            decision.branch = "error>threshold"
            self.accumulate = 1
        else:
            decision.branch = "reuse"
            self.accumulate = acc
        return decision


# ------------------------------------------------------------------------------------------ partition


def cosine_similarity(estimate: Tensor, reference: Tensor) -> Tensor:
    """Per-token cosine similarity (B, N) of two packed latents (B, N, C)."""
    return (F.normalize(estimate, dim=-1) * F.normalize(reference, dim=-1)).sum(-1)


def erode_dilate(mask: Tensor) -> Tensor:
    """Binary (h, w) mask -> erosion with a 3x3 cross, then dilation with a 5x5 square, both zero-padded:
    isolated tokens vanish, small holes fill and the region grows by two tokens."""
    cross = torch.zeros(1, 1, 3, 3, device=mask.device)
    cross[0, 0, 1, :] = 1
    cross[0, 0, :, 1] = 1
    grid = mask.float()[None, None]
    eroded = (F.conv2d(grid, cross, padding=1) == cross.sum()).float()
    dilated = F.conv2d(eroded, torch.ones(1, 1, 5, 5, device=mask.device), padding=2) > 0
    return dilated[0, 0]


@dataclass
class Partition:
    """One row's split of the image tokens (ascending raster order)."""

    edited: Tensor
    unedited: Tensor
    similarity: Tensor | None = None
    raw: Tensor | None = None
    mask: Tensor | None = None


def partition(estimate: Tensor, reference: Tensor, grid: tuple[int, int], config: RegionEConfig,
              allowed: Tensor | None = None) -> Partition:
    """Split the tokens of one row. ``estimate`` and ``reference`` are (1, N, C) packed latents on a token
    ``grid`` (rows, cols). ``allowed`` (N,) bool, from a keep mask: tokens outside it are never edited; with
    ``config.region == "mask"`` it is the edited region itself."""
    n = estimate.shape[1]
    if config.region == "mask":
        if allowed is None:
            raise ValueError('RegionE region "mask" needs a mask: connect one, or use region "similarity"')
        mask = allowed.clone()
        sim = raw = None
    else:
        sim = cosine_similarity(estimate, reference)[0]
        raw = sim <= config.threshold
        mask = erode_dilate(raw.reshape(grid)).flatten() if config.erosion_dilation else raw.clone()
        if allowed is not None:
            mask &= allowed
    ids = torch.arange(n, device=estimate.device)
    return Partition(ids[mask], ids[~mask], sim, raw, mask)

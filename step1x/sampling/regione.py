"""RegionE sampling: the plain sampler's schedule, CFG and Euler steps, computing only the edited region after
the warm-up (arXiv 2510.03065; the rules are in :mod:`.regione_rules`, the block pass in :mod:`.regione_blocks`).

Per run of ``n`` steps (reference: 28, warm-up 6, refresh 16, post 2):

* steps before the partition step are full steps, exactly as the plain sampler;
* the partition step (warm-up - 1) is a full step that fills the K/V caches, estimates the result in one step,
  and splits the tokens; edited tokens take their Euler step, unedited tokens jump with the same velocity to
  the input level of the next refresh (or post) step and wait there;
* region steps feed only the text and the edited tokens (with the cached keys and values of the rest), or
  reuse the last velocity times a predicted decay when the decay table says the drift is small;
* a refresh step puts the tokens back together, runs a full step that re-fills the caches, and splits again
  (the partition is kept); the post steps are full steps to the end.

A batch runs row by row, each row with its own partition: every row gives what it gives when run alone.
Schedule, DiT time, CFG layout, renorm condition, Euler precision and reference positions follow the sampler
rules (:mod:`.rules`) as in the plain sampler: under the v1.2 rules cond and uncond are separate passes, each
with its own text (length and positions) and its own K/V cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .calls import Conditioning, DiTCall, TextConditioning, batch_rows, conditioning_row, plan_calls
from .denoise import (
    LATENT_CHANNELS,
    Connector,
    StepInfo,
    autocast_for,
    guidance,
    pack,
    position_ids,
    reference_ids,
    start_index,
    unpack,
)
from .regione_blocks import KVCache, RegionPass, RegionRope
from .regione_rules import (
    REFERENCE_STEPS,
    CacheDecision,
    DecayRatios,
    Partition,
    RegionEConfig,
    StepPlan,
    VelocityCache,
    decay_table,
    partition,
    plan_steps,
)
from .rules import SamplerRules, rules_for

__all__ = ["RegionEConfig", "RegionETrace", "regione_denoise"]


# ---------------------------------------------------------------------------------------------- records


@dataclass
class StepRecord:
    """One step of one row. ``kind``: "full", "partition" (full + K/V fill + split), "region", "cached" or
    "refresh" (full + K/V fill). ``velocity`` and ``latent_after`` (the Euler/jump output before tokens are
    gathered or scattered) are (1, tokens, 64): all tokens on full steps, the edited ones otherwise."""

    step: int
    kind: str
    decision: CacheDecision
    token_evals: int = 0
    kv: list[dict] | None = None
    """K/V cache use per DiT pass (cond first; one pass for a [cond; uncond] batch): ``mode`` ("full_no_cache",
    "fill", "partial_update"), ``cache_rows`` and ``rows_recomputed`` as (double blocks, single blocks)."""
    cache_source: int | None = None
    cache_gathered: bool = False
    velocity: Tensor | None = None
    latent_after: Tensor | None = None
    img_ids: Tensor | None = None


@dataclass
class RowTrace:
    """What happened in one row: the plan, the partition, the steps, the frozen unedited tokens after each
    jump (with ``tensors``), and K/V snapshots (row 0 of the first double and single block's key cache) at the
    steps asked."""

    plan: StepPlan
    estimate: Tensor | None = None
    partition: Partition | None = None
    steps: list[StepRecord] = field(default_factory=list)
    frozen: dict[int, Tensor] = field(default_factory=dict)
    kv: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    plain_token_evals: int = 0

    @property
    def token_evals(self) -> int:
        return sum(s.token_evals for s in self.steps)

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]


@dataclass
class RegionETrace:
    """Pass one to :func:`regione_denoise` to see what it did (one :class:`RowTrace` per batch row).
    ``tensors`` keeps every step's velocity and latent; ``kv_steps`` the steps whose K/V caches are copied."""

    tensors: bool = False
    kv_steps: tuple[int, ...] = ()
    rows: list[RowTrace] = field(default_factory=list)

    @property
    def token_evals(self) -> int:
        """DiT work: rows x (text + image tokens fed), summed over the forwards."""
        return sum(r.token_evals for r in self.rows)

    @property
    def plain_token_evals(self) -> int:
        return sum(r.plain_token_evals for r in self.rows)

    @property
    def work_ratio(self) -> float:
        return self.token_evals / self.plain_token_evals


# ----------------------------------------------------------------------------------------------- passes


@dataclass
class _Pass:
    """One DiT evaluation per computed step (a planned call of the plain sampler: one CFG side, or both sides as
    one batch) with its own K/V cache."""

    call: DiTCall
    cache: KVCache = field(default_factory=KVCache)

    @property
    def rows(self) -> int:
        return len(self.call.sides)

    @property
    def txt_len(self) -> int:
        return self.call.txt_len


class _Row:
    """The DiT side of one batch row: its passes (the plain sampler's calls for this row), the reference tokens
    and the position ids of [noise; reference]."""

    def __init__(self, model, connector: Connector, rules: SamplerRules, cond: Conditioning,
                 uncond: Conditioning | None, reference: Tensor, grid: tuple[int, int], sequential: bool,
                 dtype: torch.dtype, device: torch.device):
        self.model, self.connector, self.rules = model, connector, rules
        self.n_sides = 1 if uncond is None else 2
        self.reference = reference
        rows, cols = grid
        ids = torch.cat([position_ids(1, rows, cols), reference_ids(1, rows, cols, model.params.version, rules)], 1)
        self.passes = [_Pass(call) for call in
                       plan_calls(model, rules, cond, uncond, 1, ids, device, dtype, sequential=sequential)]

    def forward(self, tokens: Tensor, t: float, *, fill: bool = False, edited: Tensor | None = None
                ) -> tuple[Tensor, int, list[dict]]:
        """Predictions (sides, fed noise tokens, 64), the token evaluations spent and the K/V use per pass.
        ``edited`` None: all tokens with the reference tokens (``fill`` fills the caches); else a region step
        on ``edited``."""
        n_img = tokens.shape[1]
        if edited is not None and n_img == 0:
            return tokens.new_zeros(self.n_sides, 0, tokens.shape[-1]), 0, [{"mode": "none"}] * len(self.passes)
        outs: list[Tensor | None] = [None] * self.n_sides
        work, kv = 0, []
        for p in self.passes:
            call = p.call
            if edited is None:
                img = torch.cat([tokens, self.reference], dim=1)
                ids, pe = call.img_ids, call.pe
                blocks = RegionPass(p.cache) if fill else None
            else:
                img = tokens
                ids = call.img_ids[:, edited]
                fed = torch.cat([torch.arange(p.txt_len, device=edited.device), edited + p.txt_len])
                pe = RegionRope(call.pe[:, :, fed], call.pe)
                blocks = RegionPass(p.cache, edited)
            img = img.expand(p.rows, -1, -1)
            t_vec = self.rules.dit_time(t, p.rows, img.dtype, img.device)
            txt, y = call.text(self.model, self.connector, t_vec)
            out = self.model.transformer(img, ids, call.txt_ids, t_vec, txt, y, pe, blocks=blocks)
            for side, part in zip(call.sides, out.chunk(p.rows, dim=0), strict=True):
                outs[side] = part[:, :n_img]
            work += p.rows * (p.txt_len + img.shape[1])
            kv.append(_kv_use(p, fill, edited))
        return torch.cat(outs), work, kv

    def plain_work(self, n_tokens: int) -> int:
        return sum(p.rows * (p.txt_len + 2 * n_tokens) for p in self.passes)


def _kv_use(p: _Pass, fill: bool, edited: Tensor | None) -> dict:
    if edited is None and not fill:
        return {"mode": "full_no_cache"}
    cache = p.cache
    rows = (cache.double[0].k.shape[1] if cache.double else 0, cache.single[0].k.shape[1] if cache.single else 0)
    if edited is None:
        return {"mode": "fill", "cache_rows": rows}
    return {"mode": "partial_update", "cache_rows": rows,
            "rows_recomputed": (edited.numel(), p.txt_len + edited.numel())}


# ---------------------------------------------------------------------------------------------- sampler


def regione_denoise(
    model,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    config: RegionEConfig | None = None,
    reference: Tensor | None = None,
    steps: int = 28,
    cfg_scale: float = 6.0,
    renorm_threshold: float = 0.93,
    renorm_power: float = 0.4,
    strength: float = 1.0,
    init_latent: Tensor | None = None,
    keep_mask: Tensor | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    connector: Connector | None = None,
    sequential_cfg: bool = False,
    timesteps: list[float] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    rules: SamplerRules | None = None,
    trace: RegionETrace | None = None,
) -> Tensor:
    """:func:`~step1x.sampling.denoise.denoise` with RegionE; the same arguments (``rules`` as there: by default
    the sampler the model's version was published with), plus ``config`` (defaults: the reference settings) and
    ``trace``. Needs a reference image (RegionE compares the result with it).

    ``keep_mask`` keeps the reference outside the mask as the plain sampler does; tokens wholly outside it
    are never edited, and ``config.region == "mask"`` makes the mask's tokens the edited region."""
    config = config or RegionEConfig()
    if reference is None:
        raise ValueError("RegionE edits a reference image (it finds the region that changes by comparing with it); "
                         "for text-to-image turn RegionE off")
    if config.region == "mask" and keep_mask is None:
        raise ValueError('RegionE region "mask" takes the edited region from a mask: give a mask, or use region '
                         '"similarity"')
    device = device or noise.device
    batch, channels, h, w = noise.shape
    if channels != LATENT_CHANNELS:
        raise ValueError(f"latent must have {LATENT_CHANNELS} channels, got {channels}")
    reference = batch_rows(reference, batch, "reference latent").to(device)
    if reference.shape[-2:] != noise.shape[-2:]:
        raise ValueError(
            f"reference latent is {tuple(reference.shape[-2:])} but the noise is {(h, w)}; they must match")
    connector = connector or model.connector
    version = model.params.version
    rules = rules or rules_for(version)
    n_tokens = (h // 2) * (w // 2)
    if timesteps is None:
        timesteps = rules.schedule(steps, n_tokens)
    timesteps = timesteps[start_index(len(timesteps) - 1, strength):]

    x = noise.to(device=device, dtype=compute_dtype)
    if strength < 1.0 or init_latent is not None:
        start = batch_rows(init_latent if init_latent is not None else reference, batch, "init latent").to(device)
        if len(timesteps) == 1:  # strength 0: no step to take, as in the plain sampler
            return start.float().clone()
        x = timesteps[0] * x + (1.0 - timesteps[0]) * start.to(x.dtype)
    keep = None if keep_mask is None else batch_rows(keep_mask, batch, "mask").to(device=device, dtype=torch.float32)

    sigmas = torch.tensor(timesteps, dtype=torch.float32)
    n = len(timesteps) - 1
    plan = plan_steps(config, n)
    exact = n == REFERENCE_STEPS and timesteps[0] == 1.0  # the table indexes the steps of a 28-step run from noise
    reference_sigmas = None if exact else torch.tensor(rules.schedule(REFERENCE_STEPS, n_tokens), dtype=torch.float32)
    ratios = DecayRatios(decay_table(version), sigmas, reference_sigmas)
    cfg = _CFG(rules, cfg_scale, renorm_threshold, renorm_power)

    out = []
    with autocast_for(device, compute_dtype) if rules.autocast else contextlib.nullcontext():
        for b in range(batch):
            row_cond, row_uncond = (_row_conditioning(rules, side, b, batch) for side in (cond, uncond))
            row = _Row(model, connector, rules, row_cond, row_uncond, pack(reference[b:b + 1]).to(compute_dtype),
                       (h // 2, w // 2), sequential_cfg, compute_dtype, device)
            record = RowTrace(plan)
            if trace is not None:
                trace.rows.append(record)
            keep_row = None if keep is None else _Keep(keep[b:b + 1], noise[b:b + 1], reference[b:b + 1])
            progress = None if callback is None else _Progress(callback, b, batch, n, h, w)
            tokens = _sample_row(row, pack(x[b:b + 1]), sigmas, plan, ratios, config, cfg, keep_row,
                                 (h // 2, w // 2), record, trace, progress)
            out.append(unpack(tokens.float(), h, w))
    return torch.cat(out)


def _row_conditioning(rules: SamplerRules, side: Conditioning | None, b: int, batch: int) -> Conditioning | None:
    """Row ``b`` of one CFG side, as the plain sampler's calls take it: under separate-call rules trimmed to its
    valid tokens (:meth:`TextConditioning.row`); otherwise the padded row (a list, or a v1.2 conditioning, goes
    on to be refused there with its reason)."""
    if side is None:
        return None
    if rules.separate_cfg:
        return conditioning_row(side, b, batch)
    if isinstance(side, (list, tuple)):
        return side
    side = side.expand(batch)
    pick = (lambda t: None if t is None else t[b:b + 1])  # noqa: E731
    return TextConditioning(pick(side.llm_embedding), pick(side.mask), pick(side._ids()), pick(side.text_embeds),
                            pick(side.text_mask))


@dataclass(frozen=True)
class _CFG:
    """True CFG as the plain sampler combines the sides under ``rules``."""

    rules: SamplerRules
    scale: float
    renorm_threshold: float
    renorm_power: float

    def __call__(self, pred: Tensor, t: float) -> Tensor:
        if pred.shape[0] == 1:
            return pred
        renorm = self.rules.renorm_active(t, self.renorm_threshold)
        return guidance(pred[:1], pred[1:], self.scale, renorm, self.renorm_power)


class _Keep:
    """A keep mask in token space: outside it, tokens are reset to the reference noised to their time."""

    def __init__(self, mask: Tensor, noise: Tensor, reference: Tensor):
        self.mask = pack(mask.expand(-1, LATENT_CHANNELS, -1, -1).float())
        self.noise = pack(noise.to(mask.device).float())
        self.reference = pack(reference.float())

    def allowed(self) -> Tensor:
        """Tokens the mask touches (any of their latent pixels above 0)."""
        return self.mask[0].amax(-1) > 0

    def __call__(self, tokens: Tensor, ids: Tensor | None, sigma: float) -> Tensor:
        sel = (lambda t: t) if ids is None else (lambda t: t[:, ids])
        m = sel(self.mask)
        target = sigma * sel(self.noise) + (1.0 - sigma) * sel(self.reference)
        return (m * tokens.float() + (1.0 - m) * target).to(tokens.dtype)


class _Progress:
    """Calls the sampler callback with the full latent and its one-step estimate, steps counted over rows."""

    def __init__(self, callback, row: int, rows: int, steps: int, h: int, w: int):
        self.callback, self.offset, self.total, self.h, self.w = callback, row * steps, rows * steps, h, w
        self.denoised = None

    def __call__(self, i: int, t: float, t_next: float, latent: Tensor, estimate: Tensor, ids: Tensor | None):
        if self.denoised is None or ids is None:
            self.denoised = estimate.float().clone()
        else:
            self.denoised[:, ids] = estimate.float()
        self.callback(StepInfo(self.offset + i, self.total, t, t_next, unpack(latent.float(), self.h, self.w),
                               unpack(self.denoised, self.h, self.w)))


def _sample_row(row: _Row, x: Tensor, sigmas: Tensor, plan: StepPlan, ratios: DecayRatios, config: RegionEConfig,
                cfg: _CFG, keep: _Keep | None, grid: tuple[int, int], record: RowTrace, trace: RegionETrace | None,
                progress: _Progress | None) -> Tensor:
    """Sample one row; ``x`` (1, N, 64) packed tokens. Returns the final tokens."""
    cache = VelocityCache(plan, ratios, config.cache_threshold)
    euler = row.rules.euler
    keep_all = trace is not None and trace.tensors
    n_tokens = x.shape[1]
    n = len(sigmas) - 1
    part: Partition | None = None
    frozen = edited_x = None
    velocity_cache, cache_step = None, None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        t_curr, t_next = float(s), float(s_next)
        record.plain_token_evals += row.plain_work(n_tokens)
        if not plan.active:
            kind, decision = "full", CacheDecision(i, True, "forced")
        else:
            decision = cache.decide(i)
            kind = ("partition" if i == plan.partition else "refresh" if i in plan.refresh else "full"
                    if plan.full(i) else "region" if decision.compute else "cached")
        step = StepRecord(i, kind, decision)
        region = kind in ("region", "cached")
        current = edited_x if region else x
        if decision.compute:
            pred, step.token_evals, step.kv = row.forward(current, t_curr, fill=kind in ("partition", "refresh"),
                                                 edited=part.edited if region else None)
            v = cfg(pred, t_curr)
            velocity_cache, cache_step = v, i
        else:
            if velocity_cache.shape[1] != current.shape[1]:
                velocity_cache = velocity_cache[:, part.edited]
                step.cache_gathered = True
            v = velocity_cache * cache.ratio
        step.cache_source = cache_step

        estimate = None
        if kind == "partition" or progress is not None:
            estimate = current.float() + (sigmas[-1] - s) * v.float()
        if kind == "partition":
            record.estimate = estimate
            part = partition(estimate, row.reference.float(), grid, config, None if keep is None else keep.allowed())
            record.partition = part
        if kind in ("partition", "refresh"):
            target = plan.jump_target(i)
            after = torch.empty_like(x)
            after[:, part.edited] = euler(x[:, part.edited], v[:, part.edited], t_curr, t_next)
            after[:, part.unedited] = euler(x[:, part.unedited], v[:, part.unedited], t_curr, float(sigmas[target]))
            if keep is not None:
                after[:, part.edited] = keep(after[:, part.edited], part.edited, t_next)
                after[:, part.unedited] = keep(after[:, part.unedited], part.unedited, float(sigmas[target]))
        else:
            after = euler(current, v, t_curr, t_next)
            if keep is not None:
                after = keep(after, part.edited if region else None, t_next)

        if keep_all:
            step.velocity, step.latent_after = v.float().clone(), after.float().clone()
            if kind == "region":
                step.img_ids = row.passes[0].call.img_ids[0, part.edited].clone()
        for name, kv in _snapshots(row, i, trace, kind):
            record.kv[(i, name)] = kv
        record.steps.append(step)

        if kind in ("partition", "refresh"):
            edited_x, frozen, x = after[:, part.edited], after[:, part.unedited], None
            if keep_all:
                record.frozen[i] = frozen.float().clone()
            region_after = True
        elif region:
            edited_x = after
            region_after = True
        else:
            x = after
            region_after = False
        if region_after and (i + 1 == plan.post or i + 1 in plan.refresh):
            x, edited_x = _scatter(edited_x, frozen, part, n_tokens), None
        if progress is not None:
            full = x if x is not None else _scatter(edited_x, frozen, part, n_tokens)
            progress(i, t_curr, t_next, full, estimate, part.edited if region else None)
    return x


def _scatter(edited: Tensor, frozen: Tensor, part: Partition, n_tokens: int) -> Tensor:
    full = torch.empty(1, n_tokens, edited.shape[-1], dtype=edited.dtype, device=edited.device)
    full[:, part.edited], full[:, part.unedited] = edited, frozen
    return full


def _snapshots(row: _Row, i: int, trace: RegionETrace | None, kind: str):
    if trace is None or i not in trace.kv_steps or kind not in ("partition", "refresh", "region"):
        return []
    cache = row.passes[0].cache
    out = []
    if cache.double:
        out.append(("double_blocks.0", cache.double[0].k[0].flatten(-2).float().clone()))
    if cache.single:
        out.append(("single_blocks.0", cache.single[0].k[0].flatten(-2).float().clone()))
    return out

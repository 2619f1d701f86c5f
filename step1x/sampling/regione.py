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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .denoise import (
    LATENT_CHANNELS,
    Connector,
    StepInfo,
    TextConditioning,
    _batch,
    autocast_for,
    get_schedule,
    pack,
    position_ids,
    reference_id_base,
    renorm_divisor,
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
    kv: dict | None = None
    """K/V cache use of the first pass: ``mode`` ("full_no_cache", "fill", "partial_update"), ``cache_rows``
    and ``rows_recomputed`` as (double blocks, single blocks)."""
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
    """One DiT evaluation per computed step: a CFG side, or both sides as one batch, with its own cache."""

    llm: Tensor
    mask: Tensor
    txt_ids: Tensor
    pe: Tensor
    cache: KVCache = field(default_factory=KVCache)

    @property
    def rows(self) -> int:
        return self.llm.shape[0]

    @property
    def txt_len(self) -> int:
        return self.llm.shape[1]


class _Row:
    """The DiT side of one batch row: its passes, the reference tokens and the position ids. (v1.2 will run
    each CFG side as its own pass, with its own text length and text positions.)"""

    def __init__(self, model, connector: Connector, sides: list[TextConditioning], reference: Tensor,
                 grid: tuple[int, int], sequential: bool, dtype: torch.dtype, device: torch.device):
        self.model, self.connector, self.dtype = model, connector, dtype
        self.n_sides = len(sides)
        self.reference = reference
        rows, cols = grid
        self.ids = torch.cat(
            [position_ids(1, rows, cols), position_ids(1, rows, cols, reference_id_base(model.params.version))], 1
        ).to(device)
        groups = [[s] for s in sides] if sequential else [sides]
        self.passes = []
        for group in groups:
            llm = torch.cat([s.llm_embedding for s in group]).to(device=device, dtype=dtype)
            mask = torch.cat([s.mask for s in group]).to(device)
            txt_ids = torch.zeros(1, llm.shape[1], 3, device=device)
            pe = model.rope(torch.cat([txt_ids, self.ids], dim=1))
            self.passes.append(_Pass(llm, mask, txt_ids, pe))

    def forward(self, tokens: Tensor, t: float, *, fill: bool = False, edited: Tensor | None = None
                ) -> tuple[Tensor, int, dict]:
        """Predictions (sides, fed noise tokens, 64), the token evaluations spent and the K/V use. ``edited``
        None: all tokens with the reference tokens (``fill`` fills the caches); else a region step on ``edited``."""
        n_img = tokens.shape[1]
        if edited is not None and n_img == 0:
            return tokens.new_zeros(self.n_sides, 0, tokens.shape[-1]), 0, {"mode": "none"}
        outs, work = [], 0
        for p in self.passes:
            if edited is None:
                img = torch.cat([tokens, self.reference], dim=1)
                ids, pe = self.ids, p.pe
                blocks = RegionPass(p.cache) if fill else None
            else:
                img = tokens
                ids = self.ids[:, edited]
                fed = torch.cat([torch.arange(p.txt_len, device=edited.device), edited + p.txt_len])
                pe = RegionRope(p.pe[:, :, fed], p.pe)
                blocks = RegionPass(p.cache, edited)
            img = img.expand(p.rows, -1, -1)
            t_vec = torch.full((p.rows,), t, dtype=img.dtype, device=img.device)
            txt, y = self.connector(p.llm, t_vec, p.mask)
            out = self.model.transformer(img, ids.expand(p.rows, -1, -1), p.txt_ids.expand(p.rows, -1, -1), t_vec,
                                         txt, y, pe, blocks=blocks)
            outs.append(out[:, :n_img])
            work += p.rows * (p.txt_len + img.shape[1])
        return torch.cat(outs), work, self._kv_use(fill, edited)

    def _kv_use(self, fill: bool, edited: Tensor | None) -> dict:
        if edited is None and not fill:
            return {"mode": "full_no_cache"}
        p = self.passes[0]
        rows = (p.cache.double[0].k.shape[1] if p.cache.double else 0,
                p.cache.single[0].k.shape[1] if p.cache.single else 0)
        if edited is None:
            return {"mode": "fill", "cache_rows": rows}
        return {"mode": "partial_update", "cache_rows": rows,
                "rows_recomputed": (edited.numel(), p.txt_len + edited.numel())}

    def plain_work(self, n_tokens: int) -> int:
        return sum(p.rows * (p.txt_len + 2 * n_tokens) for p in self.passes)


# ---------------------------------------------------------------------------------------------- sampler


def regione_denoise(
    model,
    noise: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    *,
    config: RegionEConfig | None = None,
    reference: Tensor | None = None,
    steps: int = 28,
    cfg_scale: float = 6.0,
    renorm_threshold: float = 0.93,
    strength: float = 1.0,
    init_latent: Tensor | None = None,
    keep_mask: Tensor | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    connector: Connector | None = None,
    sequential_cfg: bool = False,
    timesteps: list[float] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    trace: RegionETrace | None = None,
) -> Tensor:
    """:func:`~step1x.sampling.denoise.denoise` with RegionE; the same arguments, plus ``config`` (defaults:
    the reference settings) and ``trace``. Needs a reference image (RegionE compares the result with it).

    ``keep_mask`` keeps the reference outside the mask as the plain sampler does; tokens wholly outside it
    are never edited, and ``config.region == "mask"`` makes the mask's tokens the edited region."""
    config = config or RegionEConfig()
    if reference is None:
        raise ValueError("RegionE edits a reference image (it finds the region that changes by comparing with it); "
                         "for text-to-image turn RegionE off")
    if _decay_version(model) == "v1.2" or isinstance(cond, (list, tuple)) or cond.txt_ids is not None:
        raise ValueError("RegionE supports Step1X-Edit v1.0 and v1.1 for now; sample v1.2 without RegionE")
    if config.region == "mask" and keep_mask is None:
        raise ValueError('RegionE region "mask" takes the edited region from a mask: give a mask, or use region '
                         '"similarity"')
    device = device or noise.device
    batch, channels, h, w = noise.shape
    if channels != LATENT_CHANNELS:
        raise ValueError(f"latent must have {LATENT_CHANNELS} channels, got {channels}")
    reference = _batch(reference, batch, "reference latent").to(device)
    if reference.shape[-2:] != noise.shape[-2:]:
        raise ValueError(
            f"reference latent is {tuple(reference.shape[-2:])} but the noise is {(h, w)}; they must match")
    connector = connector or model.connector
    n_tokens = (h // 2) * (w // 2)
    if timesteps is None:
        timesteps = get_schedule(steps, n_tokens, shift=True)
    full_steps = len(timesteps) - 1
    timesteps = timesteps[start_index(full_steps, strength):]

    x = noise.to(device=device, dtype=compute_dtype)
    if strength < 1.0 or init_latent is not None:
        start = _batch(init_latent if init_latent is not None else reference, batch, "init latent").to(device)
        x = timesteps[0] * x + (1.0 - timesteps[0]) * start.to(x.dtype)
    keep = None if keep_mask is None else _batch(keep_mask, batch, "mask").to(device=device, dtype=torch.float32)

    sigmas = torch.tensor(timesteps, dtype=torch.float32)
    n = len(timesteps) - 1
    plan = plan_steps(config, n)
    exact = n == REFERENCE_STEPS and timesteps[0] == 1.0  # the table indexes the steps of a 28-step run from noise
    reference_sigmas = None if exact else torch.tensor(get_schedule(REFERENCE_STEPS, n_tokens), dtype=torch.float32)
    ratios = DecayRatios(decay_table(_decay_version(model)), sigmas, reference_sigmas)
    sides = [cond.expand(batch)] + ([uncond.expand(batch)] if uncond is not None else [])

    out = []
    with autocast_for(device, compute_dtype):
        for b in range(batch):
            row = _Row(model, connector, [_row_of(s, b) for s in sides], pack(reference[b:b + 1]).to(compute_dtype),
                       (h // 2, w // 2), sequential_cfg, compute_dtype, device)
            record = RowTrace(plan)
            if trace is not None:
                trace.rows.append(record)
            keep_row = None if keep is None else _Keep(keep[b:b + 1], noise[b:b + 1], reference[b:b + 1])
            progress = None if callback is None else _Progress(callback, b, batch, n, h, w)
            tokens = _sample_row(row, pack(x[b:b + 1]), sigmas, plan, ratios, config, cfg_scale, renorm_threshold,
                                 keep_row, (h // 2, w // 2), record, trace, progress)
            out.append(unpack(tokens.float(), h, w))
    return torch.cat(out)


def _decay_version(model) -> str:
    return getattr(model.params, "version", "v1.1")


def _row_of(side: TextConditioning, b: int) -> TextConditioning:
    return TextConditioning(side.llm_embedding[b:b + 1], side.mask[b:b + 1])


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
                cfg_scale: float, renorm_threshold: float, keep: _Keep | None, grid: tuple[int, int],
                record: RowTrace, trace: RegionETrace | None, progress: _Progress | None) -> Tensor:
    """Sample one row; ``x`` (1, N, 64) packed tokens. Returns the final tokens."""
    cache = VelocityCache(plan, ratios, config.cache_threshold)
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
            v = pred[:1] if row.n_sides == 1 else _guidance(pred[:1], pred[1:], cfg_scale, t_curr > renorm_threshold)
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
            after[:, part.edited] = _euler(x[:, part.edited], v[:, part.edited], s, s_next)
            after[:, part.unedited] = _euler(x[:, part.unedited], v[:, part.unedited], s, sigmas[target])
            if keep is not None:
                after[:, part.edited] = keep(after[:, part.edited], part.edited, t_next)
                after[:, part.unedited] = keep(after[:, part.unedited], part.unedited, float(sigmas[target]))
        else:
            after = _euler(current, v, s, s_next)
            if keep is not None:
                after = keep(after, part.edited if region else None, t_next)

        if keep_all:
            step.velocity, step.latent_after = v.float().clone(), after.float().clone()
            if kind == "region":
                step.img_ids = row.ids[0, part.edited].clone()
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


def _guidance(cond: Tensor, uncond: Tensor, scale: float, renorm: bool) -> Tensor:
    """True CFG of the plain sampler, per token: the difference divided by ``max(||diff||, 1) ** 0.4`` while
    ``renorm`` (the official rule: ``t > renorm_threshold``)."""
    diff = cond - uncond
    if renorm:
        return uncond + scale * diff / renorm_divisor(torch.norm(diff, dim=2, keepdim=True), k=0.4)
    return uncond + scale * diff


def _euler(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    return (x.float() + (s_next - s) * v.float()).to(x.dtype)


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

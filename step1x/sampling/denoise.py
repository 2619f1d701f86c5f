"""Rectified-flow sampling as the Step1X-Edit references do it: shifted schedule, Euler steps, reference
tokens appended after the noisy tokens and held fixed, true CFG with the renorm of the guidance difference.

One loop serves every version; :mod:`.rules` holds where the v1.2 reference pipeline differs from the
official v1.0/v1.1 code (schedule rounding, DiT time, renorm condition, Euler precision, separate CFG calls,
reference positions). Latents here are in model space (``scale * (raw - shift)``), shape (B, 16, H/8, W/8).
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .calls import Conditioning, TextConditioning, batch_rows, plan_calls, predict  # noqa: F401 (TextConditioning: re-exported)
from .rules import SamplerRules, official_schedule, rules_for

LATENT_CHANNELS = 16


# ---------------------------------------------------------------------------------------------- schedule


def get_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """``num_steps + 1`` times from 1 to 0 in float32, shifted towards 1 for larger images: ``mu`` is
    linear in the token count between (256, 0.5) and (4096, 1.15). (The official schedule; the v1.2 one is
    :func:`~step1x.sampling.rules.diffusers_schedule`.)"""
    return official_schedule(num_steps, image_seq_len, shift)


def start_index(num_steps: int, strength: float) -> int:
    """First schedule index for img2img at ``strength`` (1 = full denoise), the official
    ``int((1 - strength) * num_steps)``, which truncates."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"denoise strength must be within [0, 1], got {strength}")
    return int((1 - strength) * num_steps)


# ----------------------------------------------------------------------------------------------- packing


def pack(latent: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): ``"b c (h ph) (w pw) -> b (h w) (c ph pw)"``."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack into 2x2 patches, got {h}x{w}")
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack` for a latent of ``height x width`` (latent pixels)."""
    b, n, d = tokens.shape
    h, w = math.ceil(height / 2), math.ceil(width / 2)
    if n != h * w:
        raise ValueError(f"{n} tokens do not tile a {height}x{width} latent ({h}x{w} patches)")
    x = tokens.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h * 2, w * 2)


def position_ids(batch: int, h_tokens: int, w_tokens: int, base: float = 0.0) -> Tensor:
    """Position ids (B, h*w, 3) float32: ``(base, base + row, base + col)``."""
    ids = torch.full((h_tokens, w_tokens, 3), float(base))
    ids[..., 1] = ids[..., 1] + torch.arange(h_tokens)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w_tokens)[None, :]
    return ids.reshape(1, h_tokens * w_tokens, 3).expand(batch, -1, -1).clone()


def reference_id_base(version: str) -> float:
    """Base of the reference tokens' ids. v1.0 reuses the noisy tokens' positions (base 0). v1.1 starts
    from a tensor of ones, so its reference ids are ``(1, row + 1, col + 1)``: every axis is offset."""
    return 0.0 if version == "v1.0" else 1.0


def reference_ids(batch: int, h_tokens: int, w_tokens: int, version: str, rules: SamplerRules) -> Tensor:
    """Position ids of the reference tokens: official v1.0 ``(0, row, col)``, v1.1 ``(1, row + 1, col + 1)``;
    the v1.2 pipeline ``(1, row, col)``."""
    if rules.reference_rows_from_zero:
        ids = position_ids(batch, h_tokens, w_tokens)
        ids[..., 0] = 1.0
        return ids
    return position_ids(batch, h_tokens, w_tokens, reference_id_base(version))


# ----------------------------------------------------------------------------------------------- noise


MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
"""Seeds are 0 to 2**64 - 1, the range of torch's generator (and of ComfyUI's seed widgets)."""


def check_seed(seed) -> int:
    """``seed`` as an int, refusing what is not a whole number in 0 ... 2**64 - 1 (instead of wrapping it)."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}") from None
    if not 0 <= value <= MAX_SEED or isinstance(seed, bool):
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED} (2**64 - 1), got {seed!r}")
    return value


def make_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard normal noise from a CPU generator seeded with ``seed`` (float32): the same numbers on every
    device, and the same as ComfyUI's own noise for that seed."""
    generator = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


# ------------------------------------------------------------------------------------------------- CFG


def renorm_divisor(diff_norm: Tensor, k: float = 0.4) -> Tensor:
    """``max(norm, 1) ** k`` written as the official ``process_diff_norm``. The power is taken one batch row at a
    time: CPU kernels round ``pow`` differently depending on the tensor's length, and a row of a batch must give
    what it gives when sampled alone."""
    if diff_norm.ndim:
        powered = torch.cat([torch.pow(row, k) for row in diff_norm.split(1)])
    else:
        powered = torch.pow(diff_norm, k)
    return torch.where(
        diff_norm > 1.0,
        powered,
        torch.where(diff_norm < 1.0, torch.ones_like(diff_norm), diff_norm),
    )


def guidance(cond: Tensor, uncond: Tensor, scale: float, renorm: bool, power: float = 0.4) -> Tensor:
    """True CFG; with ``renorm`` the difference is divided by ``max(||cond - uncond||, 1) ** power`` per token
    (norm over channels)."""
    diff = cond - uncond
    if renorm:
        return uncond + scale * diff / renorm_divisor(torch.norm(diff, dim=2, keepdim=True), k=power)
    return uncond + scale * diff


# ------------------------------------------------------------------------------------------------ denoise


@dataclass
class StepInfo:
    """What a callback sees after each step. ``latent`` is the current model-space latent and
    ``denoised`` the model's estimate of the clean latent, both (B, 16, h, w)."""

    step: int
    total: int
    t_curr: float
    t_prev: float
    latent: Tensor
    denoised: Tensor


Connector = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` as the official sampler does for half precision; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, dtype=dtype)
    except RuntimeError:
        return contextlib.nullcontext()


def denoise(
    model,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
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
    teacache: float = 0.0,
    callback: Callable[[StepInfo], None] | None = None,
    rules: SamplerRules | None = None,
    regione=None,
) -> Tensor:
    """Sample latents (B, 16, h, w) in model space, returned as float32.

    * ``noise`` (B, 16, h, w): the starting noise (see :func:`make_noise`).
    * ``reference`` (B|1, 16, h, w): the encoded reference image; its tokens follow the noisy tokens and
      stay fixed. ``None`` is text-to-image.
    * ``cond`` / ``uncond``: the two sides of true CFG, run as one [cond, uncond] batch (or one after the
      other with ``sequential_cfg``, which halves activation memory). ``uncond=None`` disables CFG. For
      v1.2, a list of per-row conditionings may be given (prompts of different lengths).
    * ``rules``: the sampler (see :mod:`.rules`); by default the one the model's version was published with.
      Under the v1.2 rules every DiT call is one image row and one side (``sequential_cfg`` is implied):
      rows of a batch are sampled exactly as if each were run alone (the v1.2 reference accepts batch 1
      only), and cond and uncond may have different lengths.
    * ``renorm_threshold`` / ``renorm_power``: the renorm of the CFG difference (``max(norm, 1) ** power``)
      applies while the time exceeds the threshold, on the scale ``rules`` give (see
      :attr:`.rules.SamplerRules.renorm_time_scale`).
    * ``strength`` < 1 starts from ``init_latent`` (or the reference when none is given) at the official
      start index; ``strength`` 0 returns that start point unchanged. ``keep_mask`` (B|1, 1, h, w), 1 where
      editing is allowed: outside it each step is reset to the reference noised to the current time, so the
      result keeps the reference there.
    * ``connector``: the function from (llm_embedding, t_vec, mask) to (txt, y); defaults to the model's.
    * ``teacache`` > 0 skips the transformer blocks on steps whose input barely changed (the official
      TeaCache; 0.2 is the official default threshold; results differ from a full run).
    * ``callback`` runs after every step; raising from it stops sampling (cancel).
    * ``regione`` (a :class:`~step1x.sampling.regione_rules.RegionEConfig`): sample with RegionE, which computes
      only the edited region after a few full steps (see :mod:`step1x.sampling.regione`), under the same
      ``rules``; not with TeaCache.
    """
    if regione is not None:
        if teacache:
            raise ValueError("RegionE and TeaCache both skip DiT work per step and cannot be combined; "
                             "turn one of them off")
        from .regione import regione_denoise

        return regione_denoise(
            model, noise, cond, uncond, config=regione, reference=reference, steps=steps, cfg_scale=cfg_scale,
            renorm_threshold=renorm_threshold, renorm_power=renorm_power, strength=strength, init_latent=init_latent,
            keep_mask=keep_mask, compute_dtype=compute_dtype, device=device, connector=connector,
            sequential_cfg=sequential_cfg, timesteps=timesteps, callback=callback, rules=rules,
        )
    device = device or noise.device
    batch, channels, h, w = noise.shape
    if channels != LATENT_CHANNELS:
        raise ValueError(f"latent must have {LATENT_CHANNELS} channels, got {channels}")
    if reference is not None:
        reference = batch_rows(reference, batch, "reference latent").to(device)
        if reference.shape[-2:] != noise.shape[-2:]:
            raise ValueError(
                f"reference latent is {tuple(reference.shape[-2:])} but the noise is {(h, w)}; they must match"
            )
    connector = connector or model.connector
    version = model.params.version
    rules = rules or rules_for(version)
    n_tokens = (h // 2) * (w // 2)
    if timesteps is None:
        timesteps = rules.schedule(steps, n_tokens)
    timesteps = timesteps[start_index(len(timesteps) - 1, strength):]

    x = noise.to(device=device, dtype=compute_dtype)
    if strength < 1.0 or init_latent is not None:
        start = init_latent if init_latent is not None else reference
        if start is None:
            raise ValueError("denoise strength below 1 needs an init latent or a reference image to start from")
        start = batch_rows(start, batch, "init latent").to(device)
        if len(timesteps) == 1:  # strength 0: no step to take; the start point is the result, untouched
            return start.float().clone()
        t0 = timesteps[0]
        x = t0 * x + (1.0 - t0) * start.to(x.dtype)
    mask = None
    if keep_mask is not None:
        if reference is None:
            raise ValueError("a mask needs a reference image: outside the mask the result keeps the reference")
        mask = batch_rows(keep_mask, batch, "mask").to(device=device, dtype=torch.float32)
        noise_f = noise.to(device=device, dtype=torch.float32)
        ref_f = reference.float()

    img_ids = position_ids(batch, h // 2, w // 2)
    if reference is not None:
        img_ids = torch.cat([img_ids, reference_ids(batch, h // 2, w // 2, version, rules)], dim=1)
    total = len(timesteps) - 1
    calls = plan_calls(model, rules, cond, uncond, batch, img_ids, device, compute_dtype, sequential=sequential_cfg,
                       teacache=teacache, total=total)  # the RoPE tables and text of the run, built once
    use_cfg = uncond is not None

    with autocast_for(device, compute_dtype) if rules.autocast else contextlib.nullcontext():
        img = pack(x)
        ref_tokens = None
        if reference is not None:
            ref_tokens = pack(reference).to(device=device, dtype=compute_dtype)
            img = torch.cat([img, ref_tokens], dim=1)
        for i in range(total):
            t_curr, t_prev = timesteps[i], timesteps[i + 1]
            sides = predict(model, connector, rules, img, t_curr, calls, 2 if use_cfg else 1)
            pred = [side[:, :n_tokens] for side in sides]
            if use_cfg:
                renorm = rules.renorm_active(t_curr, renorm_threshold)
                pred = guidance(pred[0], pred[1], cfg_scale, renorm, renorm_power)
            else:
                pred = pred[0]
            latent = rules.euler(img[:, :n_tokens], pred, t_curr, t_prev)
            if mask is not None:
                latent = _keep_outside_mask(latent, mask, noise_f, ref_f, t_prev, h, w)
            img = latent if ref_tokens is None else torch.cat([latent, ref_tokens], dim=1)
            if callback is not None:
                current = latent.float()
                denoised = unpack(current - t_prev * pred.float(), h, w)
                callback(StepInfo(i, total, t_curr, t_prev, unpack(current, h, w), denoised))
    return unpack(img[:, :n_tokens].float(), h, w)


def _keep_outside_mask(latent_tokens, mask, noise, reference, t: float, h: int, w: int):
    """Outside the mask, replace the latent by the reference noised to time ``t``."""
    latent = unpack(latent_tokens.float(), h, w)
    target = t * noise + (1.0 - t) * reference
    blended = mask * latent + (1.0 - mask) * target
    return pack(blended).to(latent_tokens.dtype)

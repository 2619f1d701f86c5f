"""Rectified-flow sampling as the official editor does it: shifted schedule, Euler steps, reference tokens
appended after the noisy tokens and held fixed, true CFG over a [cond, uncond] batch with the official
renorm of the guidance difference.

Latents here are in model space (``scale * (raw - shift)``), shape (B, 16, H/8, W/8).
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..models.configs import SHIFT_BASE, SHIFT_MAX
from .teacache import TeaCache

LATENT_CHANNELS = 16


# ---------------------------------------------------------------------------------------------- schedule


def get_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """``num_steps + 1`` times from 1 to 0 in float32, shifted towards 1 for larger images: ``mu`` is
    linear in the token count between (256, 0.5) and (4096, 1.15)."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        (x1, y1), (x2, y2) = SHIFT_BASE, SHIFT_MAX
        slope = (y2 - y1) / (x2 - x1)
        mu = slope * image_seq_len + (y1 - slope * x1)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return t.tolist()


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
    """``max(norm, 1) ** k`` written as the official ``process_diff_norm``."""
    return torch.where(
        diff_norm > 1.0,
        torch.pow(diff_norm, k),
        torch.where(diff_norm < 1.0, torch.ones_like(diff_norm), diff_norm),
    )


def guidance(cond: Tensor, uncond: Tensor, scale: float, t_curr: float, renorm_threshold: float) -> Tensor:
    """True CFG; while ``t_curr > renorm_threshold`` the difference is divided by
    ``max(||cond - uncond||, 1) ** 0.4`` per token (norm over channels)."""
    diff = cond - uncond
    if t_curr > renorm_threshold:
        return uncond + scale * diff / renorm_divisor(torch.norm(diff, dim=2, keepdim=True), k=0.4)
    return uncond + scale * diff


# ------------------------------------------------------------------------------------------------ denoise


@dataclass
class TextConditioning:
    """MLLM output for one side of CFG: ``llm_embedding`` (B|1, L, C) and its 0/1 ``mask`` (B|1, L).

    v1.2 adds three fields (``None`` for v1.0/v1.1, whose text positions are all zero):

    * ``txt_ids`` (B|1, L, 3) float32: the text tokens' RoPE positions (M-RoPE ids shifted negative, image
      tokens placed on the latent grid; fractional values are allowed).
    * ``text_embeds`` (B|1, L, C): the MLLM *input* embeddings of the same tokens, for the DiT's
      ``text_token_mapping``.
    * ``text_mask`` (B|1, L): 1 on the tokens of quoted characters, where the mapping is added.
    """

    llm_embedding: Tensor
    mask: Tensor
    txt_ids: Tensor | None = None
    text_embeds: Tensor | None = None
    text_mask: Tensor | None = None

    def expand(self, batch: int) -> "TextConditioning":
        n = self.llm_embedding.shape[0]
        if n == batch:
            return self
        if n != 1:
            raise ValueError(f"conditioning holds {n} prompts but the batch has {batch} images; give 1 or {batch}")
        return TextConditioning(
            self.llm_embedding.expand(batch, -1, -1), self.mask.expand(batch, -1),
            None if self.txt_ids is None else self.txt_ids.expand(batch, -1, -1),
            None if self.text_embeds is None else self.text_embeds.expand(batch, -1, -1),
            None if self.text_mask is None else self.text_mask.expand(batch, -1),
        )


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
    cond: TextConditioning,
    uncond: TextConditioning | None,
    *,
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
    teacache: float = 0.0,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Sample latents (B, 16, h, w) in model space, returned as float32.

    * ``noise`` (B, 16, h, w): the starting noise (see :func:`make_noise`).
    * ``reference`` (B|1, 16, h, w): the encoded reference image; its tokens follow the noisy tokens and
      stay fixed. ``None`` is text-to-image (v1.1).
    * ``cond`` / ``uncond``: the two sides of true CFG, run as one [cond, uncond] batch (or one after the
      other with ``sequential_cfg``, which halves activation memory). ``uncond=None`` disables CFG.
    * ``strength`` < 1 starts from ``init_latent`` (or the reference when none is given) at the official
      start index; ``strength`` 0 returns that start point unchanged. ``keep_mask`` (B|1, 1, h, w), 1 where
      editing is allowed: outside it each step is reset to the reference noised to the current time, so the
      result keeps the reference there.
    * ``connector``: the function from (llm_embedding, t_vec, mask) to (txt, y); defaults to the model's.
    * ``teacache`` > 0 skips the transformer blocks on steps whose input barely changed (the official
      TeaCache; 0.2 is the official default threshold; results differ from a full run).
    * ``callback`` runs after every step; raising from it stops sampling (cancel).
    """
    device = device or noise.device
    batch, channels, h, w = noise.shape
    if channels != LATENT_CHANNELS:
        raise ValueError(f"latent must have {LATENT_CHANNELS} channels, got {channels}")
    if reference is not None:
        reference = _batch(reference, batch, "reference latent").to(device)
        if reference.shape[-2:] != noise.shape[-2:]:
            raise ValueError(
                f"reference latent is {tuple(reference.shape[-2:])} but the noise is {(h, w)}; they must match"
            )
    connector = connector or model.connector
    version = model.params.version
    if timesteps is None:
        timesteps = get_schedule(steps, (h // 2) * (w // 2), shift=True)
    timesteps = timesteps[start_index(len(timesteps) - 1, strength):]

    x = noise.to(device=device, dtype=compute_dtype)
    if strength < 1.0 or init_latent is not None:
        start = init_latent if init_latent is not None else reference
        if start is None:
            raise ValueError("denoise strength below 1 needs an init latent or a reference image to start from")
        start = _batch(start, batch, "init latent").to(device)
        if len(timesteps) == 1:  # strength 0: no step to take; the start point is the result, untouched
            return start.float().clone()
        t0 = timesteps[0]
        x = t0 * x + (1.0 - t0) * start.to(x.dtype)
    mask = None
    if keep_mask is not None:
        if reference is None:
            raise ValueError("a mask needs a reference image: outside the mask the result keeps the reference")
        mask = _batch(keep_mask, batch, "mask").to(device=device, dtype=torch.float32)
        noise_f = noise.to(device=device, dtype=torch.float32)
        ref_f = reference.float()

    n_tokens = (h // 2) * (w // 2)
    img_ids = position_ids(batch, h // 2, w // 2)
    if reference is not None:
        img_ids = torch.cat([img_ids, position_ids(batch, h // 2, w // 2, reference_id_base(version))], dim=1)
    use_cfg = uncond is not None
    sides = [cond.expand(batch)] + ([uncond.expand(batch)] if use_cfg else [])
    llm = torch.cat([s.llm_embedding for s in sides]).to(device=device, dtype=compute_dtype)
    txt_mask = torch.cat([s.mask for s in sides]).to(device)
    img_ids = img_ids.repeat(len(sides), 1, 1)
    txt_ids = torch.zeros(llm.shape[0], llm.shape[1], 3)
    pe = model.rope(torch.cat([txt_ids, img_ids], dim=1).to(device))
    txt_ids, img_ids = txt_ids.to(device), img_ids.to(device)

    with autocast_for(device, compute_dtype):
        img = pack(x)
        ref_tokens = None
        if reference is not None:
            ref_tokens = pack(reference).to(device=device, dtype=compute_dtype)
            img = torch.cat([img, ref_tokens], dim=1)
        total = len(timesteps) - 1
        caches = _caches(teacache, total, sequential_cfg and use_cfg)
        for i in range(total):
            t_curr, t_prev = timesteps[i], timesteps[i + 1]
            if use_cfg and img.shape[0] == batch:
                img = torch.cat([img, img], dim=0)
            t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=device)
            pred = _predict(model, connector, img, img_ids, txt_ids, t_vec, llm, txt_mask, pe, sequential_cfg, batch,
                            caches)
            pred = pred[:, :n_tokens]
            if use_cfg:
                pred = guidance(pred[:batch], pred[batch:], cfg_scale, t_curr, renorm_threshold)
            latent = img[:batch, :n_tokens] + (t_prev - t_curr) * pred
            if mask is not None:
                latent = _keep_outside_mask(latent, mask, noise_f, ref_f, t_prev, h, w)
            img = latent if ref_tokens is None else torch.cat([latent, ref_tokens], dim=1)
            if callback is not None:
                current = latent.float()
                denoised = unpack(current - t_prev * pred.float(), h, w)
                callback(StepInfo(i, total, t_curr, t_prev, unpack(current, h, w), denoised))
    return unpack(img[:batch, :n_tokens].float(), h, w)


def _predict(model, connector, img, img_ids, txt_ids, t_vec, llm, txt_mask, pe, sequential: bool, batch: int,
             caches: list[TeaCache | None]):
    """One DiT evaluation over the whole [cond; uncond] batch, or one half at a time. The tensor arguments
    hold one row per row of ``img``."""
    rows = img.shape[0]
    if not sequential or rows == batch:
        txt, y = connector(llm, t_vec, txt_mask)
        return model.transformer(img, img_ids, txt_ids, t_vec, txt, y, pe, cache=caches[0])
    outs = []
    for half, lo in enumerate(range(0, rows, batch)):
        sl = slice(lo, lo + batch)
        txt, y = connector(llm[sl], t_vec[sl], txt_mask[sl])
        outs.append(model.transformer(img[sl], img_ids[sl], txt_ids[sl], t_vec[sl], txt, y, pe[sl], cache=caches[half]))
    return torch.cat(outs, dim=0)


def _caches(threshold: float, total: int, per_half: bool) -> list[TeaCache | None]:
    if not threshold:
        return [None, None]
    return [TeaCache(threshold, total) for _ in range(2 if per_half else 1)] + ([] if per_half else [None])


def _keep_outside_mask(latent_tokens, mask, noise, reference, t: float, h: int, w: int):
    """Outside the mask, replace the latent by the reference noised to time ``t``."""
    latent = unpack(latent_tokens.float(), h, w)
    target = t * noise + (1.0 - t) * reference
    blended = mask * latent + (1.0 - mask) * target
    return pack(blended).to(latent_tokens.dtype)


def _batch(t: Tensor, batch: int, what: str) -> Tensor:
    if t.ndim != 4:
        raise ValueError(f"{what} must be (batch, channels, height, width), got shape {tuple(t.shape)}")
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, -1, -1, -1)
    raise ValueError(f"{what} has batch {t.shape[0]} but {batch} images are sampled; give 1 or {batch}")

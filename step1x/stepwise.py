"""The official sampler taken apart for samplers that call the model once per evaluation and do their own
stepping (ComfyUI's KSampler and SamplerCustomAdvanced): the denoised estimate of one model evaluation, the
official guidance applied to two such estimates, and the official schedule of a latent.

An evaluation here prepares the DiT's inputs as one step of :func:`~step1x.sampling.denoise.denoise` does
(the same packing, position ids, RoPE table, connector and transformer) and returns the clean-latent estimate
``x - t * v``, which is that step taken to time 0; the guidance is ``denoise``'s own ``guidance`` function.
So an Euler sampler driven by these pieces computes what ``denoise`` computes. The estimate is formed in
float32 from the model's velocity: a sampler that recovers ``v`` from it (``(x - denoised) / t``) keeps the
velocity's precision even when the DiT runs in bfloat16. (A test holds the estimate bit-identical to a
``denoise`` step in float32; a change to the step's inputs, such as v1.2's, belongs in both.)

Conventions (those of ComfyUI's flow models): ``sigma`` is the official time ``t`` in [0, 1]; latents are in
model space (``scale * (raw - shift)``), shape (B, 16, h, w); ``eps = x - denoised = sigma * v``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models.configs import SHIFT_BASE, SHIFT_MAX
from .sampling.denoise import (
    TextConditioning,
    autocast_for,
    get_schedule,
    guidance,
    pack,
    position_ids,
    reference_id_base,
    start_index,
    unpack,
)

DEFAULT_IMAGE_TOKENS = 1024
"""Image tokens of a 512x512 latent (size_level 512, the official default), for a model whose latent size
is not known yet."""


def image_tokens(height: int, width: int) -> int:
    """Tokens of a (height, width) latent: one per 2x2 patch."""
    return (height // 2) * (width // 2)


def schedule_mu(tokens: int) -> float:
    """The official resolution shift ``mu`` for ``tokens`` image tokens: linear between (256, 0.5) and
    (4096, 1.15), computed as :func:`step1x.sampling.denoise.get_schedule` computes it."""
    (x1, y1), (x2, y2) = SHIFT_BASE, SHIFT_MAX
    slope = (y2 - y1) / (x2 - x1)
    return slope * tokens + (y1 - slope * x1)


def official_sigmas(steps: int, height: int, width: int, denoise_strength: float = 1.0) -> Tensor:
    """The official schedule for a (height, width) latent as float32 sigmas, starting at the official
    img2img start index for ``denoise_strength`` (1.0: all ``steps + 1`` times)."""
    times = get_schedule(steps, image_tokens(height, width), shift=True)
    return torch.tensor(times[start_index(steps, denoise_strength):], dtype=torch.float32)


# ------------------------------------------------------------------------------------------- evaluation


def denoised(model, x: Tensor, sigma: Tensor, text: TextConditioning, reference: Tensor | None = None, *,
             compute_dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """The clean-latent estimate ``x - sigma * v`` of every row of ``x`` (B, 16, h, w), as float32.

    ``sigma`` (B,) holds each row's time; ``text`` and ``reference`` (model space) have one row per row of
    ``x`` (or one for all). Rows that share a time are evaluated together, each with its own text, exactly
    as one step of :func:`~step1x.sampling.denoise.denoise` without guidance."""
    sigma = sigma.reshape(-1).float().cpu()
    if sigma.numel() == 1 and x.shape[0] > 1:
        sigma = sigma.expand(x.shape[0])
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"{sigma.numel()} times for a batch of {x.shape[0]} latents")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for value in torch.unique(sigma).tolist():
        rows = torch.nonzero(sigma == value).flatten()
        every = rows.numel() == x.shape[0]
        xs = x if every else x[rows.to(x.device)]
        v = velocity(model, xs, value, text if every else select_rows(text, rows, x.shape[0]),
                     reference if every or reference is None else _rows(reference, rows, x.shape[0]),
                     compute_dtype=compute_dtype, device=device or x.device)
        out[rows] = xs.float() - value * v.to(x.device)
    return out


def velocity(model, x: Tensor, t: float, text: TextConditioning, reference: Tensor | None = None, *,
             compute_dtype: torch.dtype, device: torch.device) -> Tensor:
    """The DiT's velocity (B, 16, h, w) as float32 for the latent ``x`` at time ``t``: connector and transformer
    on the inputs one step of ``denoise`` builds (reference tokens after the noisy ones, text positions 0, or
    the conditioning's own ``txt_ids`` when it has them)."""
    batch, _, h, w = x.shape
    text = text.expand(batch)
    img = pack(x.to(device=device, dtype=compute_dtype))
    img_ids = position_ids(batch, h // 2, w // 2)
    if reference is not None:
        reference = reference.expand(batch, -1, -1, -1) if reference.shape[0] == 1 else reference
        if reference.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"reference latent is {tuple(reference.shape[-2:])} but the noise is {(h, w)}; they must match")
        img = torch.cat([img, pack(reference.to(device=device, dtype=compute_dtype))], dim=1)
        base = reference_id_base(model.params.version)
        img_ids = torch.cat([img_ids, position_ids(batch, h // 2, w // 2, base)], dim=1)
    llm = text.llm_embedding.to(device=device, dtype=compute_dtype)
    mask = text.mask.to(device)
    txt_ids = torch.zeros(batch, llm.shape[1], 3) if text.txt_ids is None else text.txt_ids.float().cpu()
    pe = model.rope(torch.cat([txt_ids, img_ids], dim=1).to(device))
    txt_ids, img_ids = txt_ids.to(device), img_ids.to(device)
    with autocast_for(device, compute_dtype):
        t_vec = torch.full((batch,), t, dtype=img.dtype, device=device)
        txt, y = model.connector(llm, t_vec, mask)
        pred = model.transformer(img, img_ids, txt_ids, t_vec, txt, y, pe)
    return unpack(pred[:, : (h // 2) * (w // 2)].float(), h, w)


def select_rows(text: TextConditioning, rows: Tensor, batch: int) -> TextConditioning:
    """The rows ``rows`` of a conditioning that has 1 or ``batch`` rows."""
    pick = lambda t: None if t is None else _rows(t, rows, batch)  # noqa: E731
    return TextConditioning(pick(text.llm_embedding), pick(text.mask), pick(text.txt_ids), pick(text.text_embeds),
                            pick(text.text_mask))


def _rows(t: Tensor, rows: Tensor, batch: int) -> Tensor:
    return t if t.shape[0] == 1 and batch > 1 else t[rows.to(t.device)]


# --------------------------------------------------------------------------------------------- guidance


def guided_eps(cond_eps: Tensor, uncond_eps: Tensor, scale: float, sigma: Tensor, renorm_threshold: float) -> Tensor:
    """The official true CFG with renorm, for ``eps = sigma * v`` (B, 16, h, w) of both sides: the velocities
    are recovered, guided by :func:`~step1x.sampling.denoise.guidance` (the per-token renorm while
    ``t > renorm_threshold``) and scaled back. At ``sigma = 0`` both sides are 0 and plain CFG is used."""
    sigma = sigma.reshape(-1).float()
    if sigma.numel() == 1 and cond_eps.shape[0] > 1:
        sigma = sigma.expand(cond_eps.shape[0])
    h, w = cond_eps.shape[-2:]
    out = torch.empty_like(cond_eps)
    for value in torch.unique(sigma).tolist():
        rows = torch.nonzero(sigma == value).flatten().to(cond_eps.device)
        c, u = cond_eps[rows], uncond_eps[rows]
        if value == 0.0:
            out[rows] = u + scale * (c - u)
            continue
        v = guidance(pack(c / value), pack(u / value), scale, value > renorm_threshold)
        out[rows] = unpack(v, h, w) * value
    return out

"""The official sampler taken apart for samplers that call the model once per evaluation and do their own
stepping (ComfyUI's KSampler and SamplerCustomAdvanced): the denoised estimate of one model evaluation, the
official guidance applied to two such estimates, and the official schedule of a latent.

Each piece defers to :mod:`step1x.sampling.denoise`: an evaluation here *is* one ``denoise`` step from time
``t`` to 0 (``x + (0 - t) * v``, the model's clean-latent estimate), and the guidance is its ``guidance``
function, so an Euler sampler driven by these pieces computes what ``denoise`` computes.

Conventions (those of ComfyUI's flow models): ``sigma`` is the official time ``t`` in [0, 1]; latents are in
model space (``scale * (raw - shift)``), shape (B, 16, h, w); ``eps = x - denoised = sigma * v``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models.configs import SHIFT_BASE, SHIFT_MAX
from .sampling.denoise import TextConditioning, denoise, get_schedule, guidance, pack, start_index, unpack

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
        out[rows] = denoise(
            model, x if every else x[rows.to(x.device)], text if every else select_rows(text, rows, x.shape[0]), None,
            reference=reference if every or reference is None else _rows(reference, rows, x.shape[0]),
            timesteps=[value, 0.0], compute_dtype=compute_dtype, device=device or x.device,
        ).to(x.device)
    return out


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
        v = guidance(pack(c / value), pack(u / value), scale, value, renorm_threshold)
        out[rows] = unpack(v, h, w) * value
    return out

"""The plain sampler taken apart for samplers that call the model once per evaluation and do their own
stepping (ComfyUI's KSampler and SamplerCustomAdvanced): the denoised estimate of one model evaluation, the
guidance applied to two such estimates, and the schedule of a latent, each under the sampler rules of the
model's version (:mod:`step1x.sampling.rules`: official v1.0/v1.1, or v1.2's).

An evaluation plans its DiT calls with :func:`~step1x.sampling.calls.plan_calls` and runs them with
:func:`~step1x.sampling.calls.predict`, the code one step of :func:`~step1x.sampling.denoise.denoise` runs
(the same packing, position ids, RoPE table, connector, DiT time and transformer; under the v1.2 rules one call
per row, each row with its own text length), and returns the clean-latent estimate ``x - t * v``, which is that
step taken to time 0; the guidance is ``denoise``'s own ``guidance`` function with the rules' renorm condition.
So an Euler sampler driven by these pieces computes what ``denoise`` computes. The estimate is formed in
float32 from the model's velocity: a sampler that recovers ``v`` from it (``(x - denoised) / t``) keeps the
velocity's precision even when the DiT runs in bfloat16. (A test holds the estimate bit-identical to a
``denoise`` step in float32.)

Conventions (those of ComfyUI's flow models): ``sigma`` is the time ``t`` in [0, 1]; latents are in model
space (``scale * (raw - shift)``), shape (B, 16, h, w); ``eps = x - denoised = sigma * v``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .sampling.calls import TextConditioning, plan_calls, predict
from .sampling.denoise import autocast_for, guidance, pack, position_ids, reference_ids, start_index, unpack
from .sampling.rules import OFFICIAL, SamplerRules, rules_for, shift_mu

DEFAULT_IMAGE_TOKENS = 1024
"""Image tokens of a 512x512 latent (size_level 512, the official default), for a model whose latent size
is not known yet."""


def image_tokens(height: int, width: int) -> int:
    """Tokens of a (height, width) latent: one per 2x2 patch."""
    return (height // 2) * (width // 2)


def schedule_mu(tokens: int) -> float:
    """The resolution shift ``mu`` for ``tokens`` image tokens: linear between (256, 0.5) and (4096, 1.15), as
    every schedule of :mod:`step1x.sampling.rules` computes it."""
    return shift_mu(tokens)


def sigmas(steps: int, height: int, width: int, denoise_strength: float = 1.0, rules: SamplerRules = OFFICIAL
           ) -> Tensor:
    """The schedule of ``rules`` for a (height, width) latent as float32 sigmas, starting at the official
    img2img start index for ``denoise_strength`` (1.0: all ``steps + 1`` times)."""
    times = rules.schedule(steps, image_tokens(height, width))
    return torch.tensor(times[start_index(steps, denoise_strength):], dtype=torch.float32)


def official_sigmas(steps: int, height: int, width: int, denoise_strength: float = 1.0) -> Tensor:
    """:func:`sigmas` of the official v1.0/v1.1 schedule."""
    return sigmas(steps, height, width, denoise_strength, OFFICIAL)


# ------------------------------------------------------------------------------------------- evaluation


def denoised(model, x: Tensor, sigma: Tensor, text: TextConditioning, reference: Tensor | None = None, *,
             compute_dtype: torch.dtype, device: torch.device | None = None, rules: SamplerRules | None = None
             ) -> Tensor:
    """The clean-latent estimate ``x - sigma * v`` of every row of ``x`` (B, 16, h, w), as float32.

    ``sigma`` (B,) holds each row's time; ``text`` and ``reference`` (model space) have one row per row of
    ``x`` (or one for all). Rows that share a time are evaluated together, each with its own text, exactly
    as one step of :func:`~step1x.sampling.denoise.denoise` without guidance (under ``rules``; by default those of
    the model's version)."""
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
                     compute_dtype=compute_dtype, device=device or x.device, rules=rules)
        out[rows] = xs.float() - value * v.to(x.device)
    return out


def velocity(model, x: Tensor, t: float, text: TextConditioning, reference: Tensor | None = None, *,
             compute_dtype: torch.dtype, device: torch.device, rules: SamplerRules | None = None) -> Tensor:
    """The DiT's velocity (B, 16, h, w) as float32 for the latent ``x`` at time ``t``: the DiT calls one step of
    ``denoise`` makes for one CFG side (reference tokens after the noisy ones at the rules' positions; text
    positions 0, or the conditioning's own ``txt_ids``; v1.2: each row alone, trimmed to its text mask)."""
    batch, _, h, w = x.shape
    rules = rules or rules_for(model.params.version)
    img = pack(x.to(device=device, dtype=compute_dtype))
    img_ids = position_ids(batch, h // 2, w // 2)
    if reference is not None:
        reference = reference.expand(batch, -1, -1, -1) if reference.shape[0] == 1 else reference
        if reference.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"reference latent is {tuple(reference.shape[-2:])} but the noise is {(h, w)}; they must match")
        img = torch.cat([img, pack(reference.to(device=device, dtype=compute_dtype))], dim=1)
        img_ids = torch.cat([img_ids, reference_ids(batch, h // 2, w // 2, model.params.version, rules)], dim=1)
    calls = plan_calls(model, rules, text, None, batch, img_ids, device, compute_dtype)
    with autocast_for(device, compute_dtype) if rules.autocast else contextlib.nullcontext():
        pred = predict(model, model.connector, rules, img, t, calls, 1)[0]
    return unpack(pred[:, : (h // 2) * (w // 2)].float(), h, w)


def select_rows(text: TextConditioning, rows: Tensor, batch: int) -> TextConditioning:
    """The rows ``rows`` of a conditioning that has 1 or ``batch`` rows."""
    pick = lambda t: None if t is None else _rows(t, rows, batch)  # noqa: E731
    return TextConditioning(pick(text.llm_embedding), pick(text.mask), pick(text.txt_ids), pick(text.text_embeds),
                            pick(text.text_mask))


def _rows(t: Tensor, rows: Tensor, batch: int) -> Tensor:
    return t if t.shape[0] == 1 and batch > 1 else t[rows.to(t.device)]


# --------------------------------------------------------------------------------------------- guidance


def guided_eps(cond_eps: Tensor, uncond_eps: Tensor, scale: float, sigma: Tensor, renorm_threshold: float,
               rules: SamplerRules = OFFICIAL) -> Tensor:
    """True CFG with renorm, for ``eps = sigma * v`` (B, 16, h, w) of both sides: the velocities are recovered,
    guided by :func:`~step1x.sampling.denoise.guidance` (the per-token renorm while the rules' renorm condition
    holds: official ``t > renorm_threshold``, v1.2 ``1000 t > renorm_threshold``, every step at 0.93) and scaled
    back. At ``sigma = 0`` both sides are 0 and plain CFG is used."""
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
        v = guidance(pack(c / value), pack(u / value), scale, rules.renorm_active(value, renorm_threshold))
        out[rows] = unpack(v, h, w) * value
    return out

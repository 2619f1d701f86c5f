"""The DiT calls of a sampling run, planned once and evaluated at every step.

Every sampler of the pack (the plain loop of :mod:`.denoise`, RegionE, and the per-evaluation pieces of
:mod:`step1x.stepwise` that ComfyUI's samplers drive) feeds the DiT through the same :class:`DiTCall` objects:

* :func:`plan_calls` decides the calls of one step from the sampler rules (official: one [cond; uncond] batch
  with zero text positions, or one call per CFG side; v1.2: one call per image row and side, each with its own
  text length and positions) and builds, once, what no step changes: the text on the device, the position ids
  and the RoPE table;
* the first evaluation of a call runs the connector's per-run part (:meth:`Qwen2Connector.prepare
  <step1x.models.connector.Qwen2Connector.prepare>`: masks, pooled vector, input and context embeddings) and keeps
  it; every step then runs only the timestep-dependent part (:meth:`DiTCall.text`);
* :func:`predict` evaluates the calls of one step and returns the model's output per CFG side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .rules import SamplerRules
from .teacache import TeaCache

# ---------------------------------------------------------------------------------------------- conditioning


@dataclass
class TextConditioning:
    """MLLM output for one side of CFG: ``llm_embedding`` (B|1, L, C) and its 0/1 ``mask`` (B|1, L).

    v1.2 adds three fields (``None`` for v1.0/v1.1, whose text positions are all zero):

    * ``txt_ids`` (B|1, L, 3) or (L, 3) float32: the text tokens' RoPE positions (M-RoPE ids shifted
      negative, image tokens placed on the latent grid; fractional values are allowed).
    * ``text_embeds`` (B|1, L, C): the MLLM *input* embeddings of the same tokens, for the DiT's
      ``text_token_mapping``.
    * ``text_mask`` (B|1, L): 1 on the tokens of quoted characters, where the mapping is added.

    v1.2 sends no padding into the DiT: each prompt is trimmed to its valid length. Prompts of different
    lengths are given as separate conditionings (a list per CFG side, see
    :func:`~step1x.sampling.denoise.denoise`); a padded batch is trimmed row by row to its mask.
    """

    llm_embedding: Tensor
    mask: Tensor
    txt_ids: Tensor | None = None
    text_embeds: Tensor | None = None
    text_mask: Tensor | None = None

    @property
    def is_v12(self) -> bool:
        return self.txt_ids is not None or self.text_embeds is not None

    def expand(self, batch: int) -> "TextConditioning":
        n = self.llm_embedding.shape[0]
        if n == batch:
            return self
        if n != 1:
            raise ValueError(f"conditioning holds {n} prompts but the batch has {batch} images; give 1 or {batch}")
        return TextConditioning(
            self.llm_embedding.expand(batch, -1, -1), self.mask.expand(batch, -1),
            None if self.txt_ids is None else self._ids().expand(batch, -1, -1),
            None if self.text_embeds is None else self.text_embeds.expand(batch, -1, -1),
            None if self.text_mask is None else self.text_mask.expand(batch, -1),
        )

    def row(self, i: int) -> "TextConditioning":
        """Prompt ``i`` alone (batch 1), cut to its valid tokens (the mask must be ones, then zeros)."""
        pick = (lambda t: t[i:i + 1]) if self.llm_embedding.shape[0] > 1 else (lambda t: t[:1])
        mask = pick(self.mask)
        n = int(mask.sum())
        if not bool((mask[0, :n] != 0).all()):
            raise ValueError("a v1.2 text mask must be ones on the valid tokens, then zeros (padding)")
        ids = self._ids()
        return TextConditioning(
            pick(self.llm_embedding)[:, :n], mask[:, :n],
            None if ids is None else (ids if ids.shape[0] == 1 else ids[i:i + 1])[:, :n],
            None if self.text_embeds is None else pick(self.text_embeds)[:, :n],
            None if self.text_mask is None else pick(self.text_mask)[:, :n],
        )

    def _ids(self) -> Tensor | None:
        if self.txt_ids is None or self.txt_ids.ndim == 3:
            return self.txt_ids
        return self.txt_ids.unsqueeze(0)


Conditioning = TextConditioning | list[TextConditioning] | tuple[TextConditioning, ...]


def batch_rows(t: Tensor, batch: int, what: str) -> Tensor:
    """A (B|1, C, H, W) tensor with ``batch`` rows (one row is shared), refusing another count with ``what``."""
    if t.ndim != 4:
        raise ValueError(f"{what} must be (batch, channels, height, width), got shape {tuple(t.shape)}")
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, -1, -1, -1)
    raise ValueError(f"{what} has batch {t.shape[0]} but {batch} images are sampled; give 1 or {batch}")


def conditioning_row(side: Conditioning, r: int, batch: int) -> TextConditioning:
    """Row ``r`` of one CFG side (a conditioning with 1 or ``batch`` rows, or a list of them), trimmed to its valid
    tokens as the v1.2 rules feed it."""
    if isinstance(side, (list, tuple)):
        if len(side) not in (1, batch):
            raise ValueError(f"{len(side)} conditionings given for {batch} images; give 1 or {batch}")
        side = side[r if len(side) > 1 else 0]
    if side.llm_embedding.shape[0] not in (1, batch):
        raise ValueError(
            f"conditioning holds {side.llm_embedding.shape[0]} prompts but the batch has {batch} images; give 1 or "
            f"{batch}")
    return side.row(r)


# ----------------------------------------------------------------------------------------------------- calls


@dataclass
class DiTCall:
    """One DiT evaluation per step: the image rows it takes, the CFG sides stacked in its batch (cond is 0,
    uncond 1), its text (one row per row of its batch) and what no step changes: position ids, the RoPE table
    ``pe`` and, after the first evaluation, the connector's per-run part."""

    rows: slice
    sides: tuple[int, ...]
    llm: Tensor
    mask: Tensor
    txt_ids: Tensor
    img_ids: Tensor
    pe: Tensor
    text_embeds: Tensor | None = None
    text_mask: Tensor | None = None
    cache: TeaCache | None = None
    prepared: object | None = None
    """The connector's :meth:`prepare` output for this call's text, made at the first step."""

    @property
    def txt_len(self) -> int:
        return self.llm.shape[1]

    def text(self, model, connector, t_vec: Tensor) -> tuple[Tensor, Tensor]:
        """The DiT's text tokens (with v1.2's token mapping) and pooled vector at time ``t_vec``. A connector with
        ``prepare``/``refine`` (the model's) does its per-run part once per call; another callable
        ``(embedding, t_vec, mask) -> (txt, y)`` is evaluated whole."""
        if hasattr(connector, "prepare") and hasattr(connector, "refine"):
            if self.prepared is None:
                self.prepared = connector.prepare(self.llm, self.mask)
            txt, y = connector.refine(self.prepared, t_vec)
        else:
            txt, y = connector(self.llm, t_vec, self.mask)
        return model.map_text_tokens(txt, self.text_embeds, self.text_mask), y


def plan_calls(model, rules: SamplerRules, cond: Conditioning, uncond: Conditioning | None, batch: int,
               img_ids: Tensor, device, dtype, *, sequential: bool = False, teacache: float = 0.0,
               total: int = 0) -> list[DiTCall]:
    """The DiT calls of one step for ``batch`` image rows with position ids ``img_ids`` (B, tokens, 3). Official:
    one [cond; uncond] batch (text zero-positioned and padded alike), or one call per side with ``sequential``;
    v1.2 (``rules.separate_cfg``): one call per image row and side, each with its own text length. ``teacache``
    > 0 gives every call its own TeaCache over ``total`` steps."""
    sides = [cond] + ([uncond] if uncond is not None else [])
    if rules.separate_cfg:
        return [_call(model, slice(r, r + 1), (s,), [conditioning_row(sides[s], r, batch)], img_ids[r:r + 1],
                      device, dtype, teacache, total) for r in range(batch) for s in range(len(sides))]
    for side in sides:
        if isinstance(side, (list, tuple)) or side.is_v12:
            if model.params.version == "v1.2":
                raise ValueError(
                    f"the {rules.name} sampler rules run cond and uncond as one padded batch without text positions; "
                    "a v1.2 conditioning needs rules with separate calls (step1x.sampling.rules.V12)"
                )
            raise ValueError(
                "this conditioning carries v1.2 text positions/embeddings (or one entry per row), but the DiT is "
                f"Step1X-Edit {model.params.version}; encode the instruction with the encoder of that version"
            )
    expanded = [side.expand(batch) for side in sides]
    if sequential and len(sides) > 1:
        return [_call(model, slice(0, batch), (s,), [expanded[s]], img_ids, device, dtype, teacache, total)
                for s in range(len(sides))]
    return [_call(model, slice(0, batch), tuple(range(len(sides))), expanded, img_ids.repeat(len(sides), 1, 1),
                  device, dtype, teacache, total)]


def _call(model, rows: slice, sides: tuple[int, ...], texts: list[TextConditioning], img_ids: Tensor, device, dtype,
          teacache: float, total: int) -> DiTCall:
    llm = torch.cat([t.llm_embedding for t in texts]).to(device=device, dtype=dtype)
    ids = [t._ids() for t in texts]
    if any(i is None for i in ids):
        txt_ids = torch.zeros(llm.shape[0], llm.shape[1], 3)
    else:
        txt_ids = torch.cat([i.to(torch.float32).cpu() for i in ids])
    embeds = [t.text_embeds for t in texts]
    text_embeds = None if embeds[0] is None else torch.cat(embeds).to(device=device, dtype=dtype)
    text_mask = None if texts[0].text_mask is None else torch.cat([t.text_mask for t in texts]).to(device)
    img_ids = img_ids.cpu()
    pe = model.rope(torch.cat([txt_ids.expand(img_ids.shape[0], -1, -1), img_ids], dim=1).to(device))
    return DiTCall(rows, sides, llm, torch.cat([t.mask for t in texts]).to(device), txt_ids.to(device),
                   img_ids.to(device), pe, text_embeds, text_mask, TeaCache(teacache, total) if teacache else None)


def predict(model, connector, rules: SamplerRules, img: Tensor, t_curr: float, calls: list[DiTCall],
            n_sides: int) -> list[Tensor]:
    """The model's output at time ``t_curr`` for every image row of ``img`` (B, tokens, C), per CFG side:
    ``n_sides`` tensors (cond, then uncond), each (B, tokens, C)."""
    per_side: list[list[tuple[int, Tensor]]] = [[] for _ in range(n_sides)]
    for call in calls:
        x = img[call.rows]
        if len(call.sides) > 1:
            x = torch.cat([x] * len(call.sides), dim=0)
        t_vec = rules.dit_time(t_curr, x.shape[0], img.dtype, img.device)
        txt, y = call.text(model, connector, t_vec)
        out = model.transformer(x, call.img_ids, call.txt_ids, t_vec, txt, y, call.pe, cache=call.cache)
        for side, part in zip(call.sides, out.chunk(len(call.sides), dim=0), strict=True):
            per_side[side].append((call.rows.start, part))
    return [torch.cat([part for _, part in sorted(parts, key=lambda p: p[0])], dim=0) for parts in per_side]

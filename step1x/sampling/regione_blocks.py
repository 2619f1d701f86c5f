"""RegionE's pass over the DiT blocks: every attention layer keeps the keys and values of the whole sequence.

A full step *fills* the cache with the raw projections (before the per-head RMSNorm and RoPE) of every token:
the image stream's noise and reference tokens in double blocks, [text; noise; reference] in single blocks.
A region step feeds only the text and the edited noise tokens; each layer writes their fresh projections
into their rows of the cache, in place, and its queries attend over the whole cache, so unedited and
reference tokens take part with the values of the last fill. Norm and RoPE are applied to the whole cache
each time, keys with the RoPE table of every cached position.

The functions drive the blocks' own sub-modules in the blocks' order of operations, so a fill pass gives
exactly the numbers of the model's plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.attention import attention
from ..models.embeddings import apply_rope, rotate
from ..models.layers import DoubleStreamBlock, SingleStreamBlock, split_qkv


@dataclass
class LayerKV:
    """Raw keys and values of one attention layer, (B, S, H, D)."""

    k: Tensor
    v: Tensor


@dataclass
class KVCache:
    """The caches of one DiT pass (one CFG side, or both sides as one batch)."""

    double: list[LayerKV] = field(default_factory=list)
    single: list[LayerKV] = field(default_factory=list)

    @property
    def filled(self) -> bool:
        return bool(self.double or self.single)


@dataclass
class RegionRope:
    """RoPE tables of a region step: ``q`` for the fed tokens [text; edited], ``k`` for every cached
    position [text; noise; reference]."""

    q: Tensor
    k: Tensor


def _store(cache: list[LayerKV], index: int, k: Tensor, v: Tensor, rows: Tensor | None) -> LayerKV:
    if rows is None:
        kv = LayerKV(k.contiguous(), v.contiguous())
        if index < len(cache):
            cache[index] = kv
        else:
            cache.append(kv)
        return kv
    kv = cache[index]
    kv.k.index_copy_(1, rows, k)
    kv.v.index_copy_(1, rows, v)
    return kv


def _rope(q: Tensor, k: Tensor, pe_q: Tensor, pe_k: Tensor) -> tuple[Tensor, Tensor]:
    if pe_q is pe_k:
        return apply_rope(q, k, pe_q)
    return rotate(q, pe_q), rotate(k, pe_k)


def double_block(block: DoubleStreamBlock, img: Tensor, txt: Tensor, vec: Tensor, pe_q: Tensor, pe_k: Tensor,
                 cache: list[LayerKV], index: int, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """One double block. ``rows`` None: ``img`` is every image token and the cache is filled; otherwise
    ``img`` holds the tokens at ``rows`` of the cached image stream, whose cache rows are recomputed."""
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    img_q, img_k, img_v = split_qkv(block.img_attn.qkv((1 + img_mod1.scale) * block.img_norm1(img) + img_mod1.shift),
                                    block.num_heads)
    kv = _store(cache, index, img_k, img_v, rows)
    img_q, img_k = block.img_attn.norm(img_q, kv.k, kv.v)
    txt_q, txt_k, txt_v = block.txt_attn.qkv_heads((1 + txt_mod1.scale) * block.txt_norm1(txt) + txt_mod1.shift)

    q, k = _rope(torch.cat((txt_q, img_q), dim=1), torch.cat((txt_k, img_k), dim=1), pe_q, pe_k)
    v = torch.cat((txt_v, kv.v), dim=1)
    del img_q, img_k, img_v, txt_q, txt_k, txt_v
    attn = attention(q, k, v, backend=block.attention_backend)
    del q, k, v
    txt_len = txt.shape[1]
    txt_attn, img_attn = attn[:, :txt_len], attn[:, txt_len:]

    img = img + img_mod1.gate * block.img_attn.proj(img_attn)
    img = block.img_mlp((1 + img_mod2.scale) * block.img_norm2(img) + img_mod2.shift) * img_mod2.gate + img

    txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
    txt = block.txt_mlp((1 + txt_mod2.scale) * block.txt_norm2(txt) + txt_mod2.shift) * txt_mod2.gate + txt
    return img, txt


def single_block(block: SingleStreamBlock, x: Tensor, vec: Tensor, pe_q: Tensor, pe_k: Tensor,
                 cache: list[LayerKV], index: int, rows: Tensor | None) -> Tensor:
    """One single block on [text; image] tokens; ``rows`` as for :func:`double_block`, in [text; image]
    positions of the cache."""
    mod, _ = block.modulation(vec)
    x_mod = (1 + mod.scale) * block.pre_norm(x) + mod.shift
    qkv, mlp = torch.split(block.linear1(x_mod), [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    del x_mod
    q, k, v = split_qkv(qkv, block.num_heads)
    kv = _store(cache, index, k, v, rows)
    q, k = block.norm(q, kv.k, kv.v)
    q, k = _rope(q, k, pe_q, pe_k)
    attn = attention(q, k, kv.v, backend=block.attention_backend)
    del q, k, v, qkv
    return block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2)) * mod.gate + x


class RegionPass:
    """The ``blocks`` argument of :meth:`Step1XEdit.transformer` for RegionE.

    ``rows`` None: a full forward (all image tokens, ``pe`` the plain table) that fills ``cache``. Otherwise
    ``rows`` (1-D, ascending) are the positions of the fed image tokens among the cached image tokens, and
    ``pe`` is a :class:`RegionRope`."""

    def __init__(self, cache: KVCache, rows: Tensor | None = None):
        if rows is not None and not cache.filled:
            raise RuntimeError("a RegionE region step needs a filled K/V cache; a full step fills it first")
        self.cache, self.rows = cache, rows

    def __call__(self, model, img: Tensor, txt: Tensor, vec: Tensor, pe) -> Tensor:
        rows = self.rows
        pe_q, pe_k = (pe, pe) if rows is None else (pe.q, pe.k)
        for i, block in enumerate(model.double_blocks):
            img, txt = double_block(block, img, txt, vec, pe_q, pe_k, self.cache.double, i, rows)
        txt_len = txt.shape[1]
        x = torch.cat((txt, img), 1)
        del txt, img
        if rows is not None:
            rows = torch.cat((torch.arange(txt_len, device=rows.device), rows + txt_len))
        for i, block in enumerate(model.single_blocks):
            x = single_block(block, x, vec, pe_q, pe_k, self.cache.single, i, rows)
        return x[:, txt_len:]

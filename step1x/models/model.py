"""The Step1X-Edit DiT: connector + FLUX-style double/single stream transformer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..sampling.teacache import TeaCache, run_blocks_cached
from .attention import select_backend
from .configs import DiTParams
from .connector import Qwen2Connector
from .embeddings import rope_table, timestep_embedding
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock
from .ops import CastOps


class Step1XEdit(nn.Module):
    """``forward`` predicts the flow velocity for every image token (noisy and reference).

    The connector runs inside ``forward`` because its output depends on the timestep."""

    def __init__(self, params: DiTParams, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.params = params
        kw = dict(dtype=dtype, device=device, operations=operations)
        hidden = params.hidden_size
        self.img_in = operations.Linear(params.in_channels, hidden, bias=True, dtype=dtype, device=device)
        self.time_in = MLPEmbedder(256, hidden, **kw)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden, **kw)
        self.txt_in = operations.Linear(params.context_in_dim, hidden, dtype=dtype, device=device)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias, **kw)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio, **kw)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, params.out_channels, **kw)
        self.connector = Qwen2Connector(params.connector, **kw)

    @property
    def version(self) -> str:
        return self.params.version

    def set_attention_backend(self, name: str) -> None:
        """Choose the attention backend of the transformer blocks ("auto", "sdpa", "xformers", "flash").
        Raises :class:`~step1x.attention.AttentionBackendError` with an install hint if unavailable."""
        name = select_backend(name)
        for block in (*self.double_blocks, *self.single_blocks):
            block.attention_backend = name

    @property
    def attention_backend(self) -> str:
        blocks = (*self.double_blocks, *self.single_blocks)
        return blocks[0].attention_backend if blocks else "sdpa"

    def rope(self, ids: Tensor) -> Tensor:
        """RoPE table for position ids [txt_ids; img_ids] (B, L, 3); reusable across steps."""
        return rope_table(ids, self.params.axes_dim, self.params.theta)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        llm_embedding: Tensor,
        t_vec: Tensor,
        mask: Tensor,
        pe: Tensor | None = None,
    ) -> Tensor:
        """The official forward: connector on (llm_embedding, t_vec, mask), then the transformer."""
        if llm_embedding.ndim != 3:
            raise ValueError(f"llm_embedding must be (batch, tokens, channels); got {tuple(llm_embedding.shape)}")
        txt, y = self.connector(llm_embedding, t_vec, mask)
        return self.transformer(img, img_ids, txt_ids, timesteps, txt, y, pe)

    def transformer(
        self, img: Tensor, img_ids: Tensor, txt_ids: Tensor, timesteps: Tensor, txt: Tensor, y: Tensor,
        pe: Tensor | None = None, cache: TeaCache | None = None, blocks=None,
    ) -> Tensor:
        """Everything after the connector: ``txt`` are its tokens, ``y`` its pooled vector. ``cache``
        (TeaCache) may skip the blocks on steps whose input barely changed. ``blocks`` replaces the pass over
        the blocks (an accelerator's own, e.g. RegionE's), called as ``blocks(model, img, txt, vec, pe)``."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"img and txt must be (batch, tokens, channels); got {tuple(img.shape)}, {tuple(txt.shape)}")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256, time_factor=1000.0).to(timesteps))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        if pe is None:
            pe = self.rope(torch.cat((txt_ids, img_ids), dim=1))
        if blocks is not None:
            img = blocks(self, img, txt, vec, pe)
        else:
            img = run_blocks_cached(self, img, txt, vec, pe, cache)
        return self.final_layer(img, vec)

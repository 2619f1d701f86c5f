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

    The connector runs inside ``forward`` because its output depends on the timestep. v1.2
    (``params.text_token_mapping``) then adds ``text_token_mapping(text_embeds)`` on the quoted-character
    tokens to the connector's text tokens, before ``txt_in``."""

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
        if params.text_token_mapping:
            width = params.connector
            self.text_token_mapping = operations.Linear(width.in_channels, width.hidden_size, bias=True, dtype=dtype,
                                                        device=device)

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
        text_embeds: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """The official forward: connector on (llm_embedding, t_vec, mask), then the transformer. v1.2 also
        takes ``text_embeds`` (the MLLM input embeddings of the same tokens) and ``text_mask`` (1 on quoted
        characters); its ``txt_ids`` are the encoder's text positions."""
        if llm_embedding.ndim != 3:
            raise ValueError(f"llm_embedding must be (batch, tokens, channels); got {tuple(llm_embedding.shape)}")
        txt, y = self.connector(llm_embedding, t_vec, mask)
        txt = self.map_text_tokens(txt, text_embeds, text_mask)
        return self.transformer(img, img_ids, txt_ids, timesteps, txt, y, pe)

    def map_text_tokens(self, txt: Tensor, text_embeds: Tensor | None, text_mask: Tensor | None) -> Tensor:
        """v1.2: ``txt + text_token_mapping(text_embeds) * text_mask`` (the bias is masked too), on the
        connector's output. v1.0/v1.1 have no mapping and return ``txt`` unchanged."""
        if not self.params.text_token_mapping:
            return txt
        if text_embeds is None or text_mask is None:
            raise ValueError(
                "Step1X-Edit v1.2 needs text_embeds and text_mask with its text tokens (the v1.2 instruction "
                "encoder gives them); this conditioning has none. Encode the instruction with the v1.2 encoder."
            )
        if text_embeds.shape[:2] != txt.shape[:2] or tuple(text_mask.shape) != tuple(txt.shape[:2]):
            raise ValueError(
                f"text_embeds {tuple(text_embeds.shape)} and text_mask {tuple(text_mask.shape)} must cover the same "
                f"tokens as the text {tuple(txt.shape[:2])}"
            )
        return txt + self.text_token_mapping(text_embeds) * text_mask[:, :, None]

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

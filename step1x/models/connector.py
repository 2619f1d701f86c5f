"""The connector (``connector.*``): MLLM hidden states -> DiT text tokens and a pooled vector.

A timestep-conditioned token refiner (``S``): each block is self-attention + MLP whose residuals are
gated by a vector computed from the timestep and the masked mean of the input. ``global_proj_out``
projects the masked mean to the 768-d vector the DiT adds to its timestep embedding.

Only the timestep embedding and the refiner blocks depend on the time. A sampler that evaluates the connector at
every step calls :meth:`Qwen2Connector.prepare` once per run (attention mask, masked mean, pooled vector, input
embedder, context embedding) and :meth:`Qwen2Connector.refine` per step; ``forward`` is the two in a row, so
the results are the same bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import attention
from .configs import ConnectorParams
from .embeddings import timestep_embedding
from .layers import split_qkv
from .ops import CastOps


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, L, C) over the positions where the integer ``mask`` (B, L) is 1."""
    m = mask.unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def refiner_attention_mask(mask: Tensor) -> Tensor:
    """(B, L) 0/1 mask -> boolean (B, 1, L, L): valid query x valid key, with key 0 always allowed so
    padded queries attend to the first token instead of producing NaN."""
    if mask.dtype == torch.bool or mask.is_floating_point():
        mask = mask.long()
    b, length = mask.shape
    keys = mask.view(b, 1, 1, length).expand(b, 1, length, length)
    allowed = (keys & keys.transpose(2, 3)).bool()
    allowed[:, :, :, 0] = True
    return allowed


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, *, dtype=None, device=None,
                 operations=CastOps):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            operations.Linear(frequency_embedding_size, hidden_size, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device),
        )

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class TextProjection(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.linear_1 = operations.Linear(in_channels, hidden_size, bias=True, dtype=dtype, device=device)
        self.act_1 = nn.SiLU()
        self.linear_2 = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.fc1 = operations.Linear(hidden_size, mlp_hidden, bias=True, dtype=dtype, device=device)
        self.act = nn.SiLU()
        self.fc2 = operations.Linear(mlp_hidden, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class IndividualTokenRefinerBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, dtype=None, device=None,
                 operations=CastOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.num_heads = num_heads
        self.norm1 = operations.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6, **kw)
        self.self_attn_qkv = operations.Linear(hidden_size, hidden_size * 3, bias=True, **kw)
        self.self_attn_proj = operations.Linear(hidden_size, hidden_size, bias=True, **kw)
        self.norm2 = operations.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6, **kw)
        self.mlp = RefinerMLP(hidden_size, int(hidden_size * mlp_ratio), operations=operations, **kw)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True, **kw)
        )

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor | None) -> Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        q, k, v = split_qkv(self.self_attn_qkv(self.norm1(x)), self.num_heads)
        attn = attention(q.to(v), k.to(v), v, mask=attn_mask, backend="sdpa")
        x = x + self.self_attn_proj(attn) * gate_msa.unsqueeze(1)
        return x + self.mlp(self.norm2(x)) * gate_mlp.unsqueeze(1)


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, depth: int, mlp_ratio: float, *, dtype=None,
                 device=None, operations=CastOps):
        super().__init__()
        self.blocks = nn.ModuleList(
            IndividualTokenRefinerBlock(hidden_size, num_heads, mlp_ratio, dtype=dtype, device=device,
                                        operations=operations)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        attn_mask = None if mask is None else refiner_attention_mask(mask.to(x.device))
        return self.refine(x, c, attn_mask)

    def refine(self, x: Tensor, c: Tensor, attn_mask: Tensor | None) -> Tensor:
        """The blocks on embedded tokens ``x`` with the conditioning vector ``c`` and a ready attention mask."""
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class SingleTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.input_embedder = operations.Linear(params.in_channels, params.hidden_size, bias=True,
                                                dtype=dtype, device=device)
        self.t_embedder = TimestepEmbedder(params.hidden_size, **kw)
        self.c_embedder = TextProjection(params.in_channels, params.hidden_size, **kw)
        self.individual_token_refiner = IndividualTokenRefiner(
            params.hidden_size, params.num_heads, params.depth, params.mlp_ratio, **kw
        )

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
        return self.refine(self.prepare(x, mask), t)

    def prepare(self, x: Tensor, mask: Tensor | None) -> RefinerInputs:
        """What does not depend on the time: embedded tokens, the context embedding of the (masked) mean and the
        refiner's attention mask."""
        context = x.mean(dim=1) if mask is None else masked_mean(x, mask)
        attn_mask = None if mask is None else refiner_attention_mask(mask.to(x.device))
        return RefinerInputs(self.input_embedder(x), self.c_embedder(context), attn_mask)

    def refine(self, inputs: RefinerInputs, t: Tensor) -> Tensor:
        """The refined tokens at time ``t`` (0-1000 scale)."""
        c = self.t_embedder(t) + inputs.context
        return self.individual_token_refiner.refine(inputs.tokens, c, inputs.attn_mask)


@dataclass
class RefinerInputs:
    """The token refiner's inputs that do not depend on the time (:meth:`SingleTokenRefiner.prepare`)."""

    tokens: Tensor
    """``input_embedder`` of the MLLM embedding (B, L, hidden)."""
    context: Tensor
    """``c_embedder`` of the masked mean (B, hidden), added to the timestep embedding."""
    attn_mask: Tensor | None


@dataclass
class PreparedText:
    """The connector's work for one text that is the same at every step (:meth:`Qwen2Connector.prepare`)."""

    refiner: RefinerInputs
    y: Tensor
    """The pooled vector (B, global_out): ``global_proj_out`` of the masked mean."""


class Qwen2Connector(nn.Module):
    """``connector.*`` of the DiT checkpoint. ``forward(x, t, mask)`` takes the MLLM embedding (B, L, in),
    the flow time ``t`` in [0, 1] (B,) and the integer mask (B, L); returns text tokens (B, L, hidden)
    and the pooled vector (B, global_out)."""

    def __init__(self, params: ConnectorParams, *, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.params = params
        self.S = SingleTokenRefiner(params, dtype=dtype, device=device, operations=operations)
        self.global_proj_out = operations.Linear(params.in_channels, params.global_out, dtype=dtype, device=device)
        if params.has_scale_factor:
            self.scale_factor = nn.Parameter(torch.full((1,), -0.91, dtype=dtype, device=device))

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.refine(self.prepare(x, mask), t)

    def prepare(self, x: Tensor, mask: Tensor) -> PreparedText:
        """Everything that does not depend on the time, for the embedding ``x`` (B, L, in) and its mask (B, L):
        computed once per sampling run."""
        x_mean = masked_mean(x, mask)
        if self.params.has_scale_factor:
            x_mean = x_mean * (1 + self.scale_factor.to(device=x.device, dtype=x.dtype))
        return PreparedText(self.S.prepare(x, mask), self.global_proj_out(x_mean))

    def refine(self, prepared: PreparedText, t: Tensor) -> tuple[Tensor, Tensor]:
        """Text tokens (B, L, hidden) and the pooled vector at flow time ``t`` in [0, 1] (B,)."""
        return self.S.refine(prepared.refiner, t * 1000), prepared.y

"""The official Step1X-Edit DiT (``modules/model_edit.py`` of a checkout of stepfun-ai/Step1X-Edit, which this
repository does not contain) made to run anywhere torch runs, for timing against the pack on the same weights.

The official modules import liger-kernel and the offloading helpers of their training library, compile a few small
functions with ``torch.compile`` at import, and run attention with flash-attn. For an eager, like-for-like forward:
liger-kernel's RMSNorm is replaced by the same float32 computation in torch, the training library by an empty
module, ``torch.compile`` is a no-op while the official modules import, and attention runs in the official code's
own "torch" mode (PyTorch SDPA). einops must be installed (``pip install einops``).
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from pathlib import Path

import torch


class _RMSNorm:
    """liger-kernel's ``LigerRMSNormFunction.apply`` (gemma casting: everything in float32, one cast at the end)."""

    @staticmethod
    def apply(x, weight, eps, offset=0.0, casting_mode="gemma", in_place=True):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
        return out.to(x.dtype)


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules.setdefault(name, module)


def import_official(folder: Path):
    """``modules.model_edit`` of the checkout ``folder``, with the replacements of the module docstring."""
    if not (folder / "modules" / "model_edit.py").is_file():
        raise SystemExit(f"{folder} is not a checkout of stepfun-ai/Step1X-Edit (no modules/model_edit.py)")
    _stub("liger_kernel")
    _stub("liger_kernel.ops")
    _stub("liger_kernel.ops.rms_norm", LigerRMSNormFunction=_RMSNorm)
    _stub("library")
    _stub("library.custom_offloading_utils")
    sys.modules["library"].custom_offloading_utils = sys.modules["library.custom_offloading_utils"]
    sys.path.insert(0, str(folder))
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    try:
        attention = importlib.import_module("modules.attention")
        layers = importlib.import_module("modules.layers")
        model_edit = importlib.import_module("modules.model_edit")
    finally:
        torch.compile = compile_
    torch_mode = functools.partial(_torch_attention, attention.attention)
    attention.attention = torch_mode
    layers.attention = functools.partial(_torch_attention, layers.attention)
    return model_edit


def _torch_attention(fn, q, k, v, mode="flash", **kw):
    for key in ("cu_seqlens_q", "cu_seqlens_kv", "max_seqlen_q", "max_seqlen_kv", "batch_size"):
        kw.pop(key, None)
    return fn(q, k, v, mode="torch", **kw)


def load_official(folder: Path, params, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """The official ``Step1XEdit`` of ``params`` (v1.0 layout) holding ``state``, in ``dtype`` on ``device``."""
    model_edit = import_official(Path(folder))
    width = params.connector
    model_edit.Qwen2Connector = functools.partial(model_edit.Qwen2Connector, in_channels=width.in_channels,
                                                  hidden_size=width.hidden_size, heads_num=width.num_heads,
                                                  depth=width.depth)
    official = model_edit.Step1XParams(
        in_channels=params.in_channels, out_channels=params.out_channels, vec_in_dim=params.vec_in_dim,
        context_in_dim=params.context_in_dim, hidden_size=params.hidden_size, mlp_ratio=params.mlp_ratio,
        num_heads=params.num_heads, depth=params.depth, depth_single_blocks=params.depth_single_blocks,
        axes_dim=list(params.axes_dim), theta=params.theta, qkv_bias=params.qkv_bias)
    with torch.device("meta"):
        model = model_edit.Step1XEdit(official)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

"""fp8 matmuls for the DiT block Linear layers whose weights are stored as float8_e4m3fn.

The default path (:class:`~step1x.models.ops.CastLinear`) upcasts each fp8 weight to the compute dtype on every
call and multiplies in that dtype. With fp8 matmul on, the block Linear layers instead quantise their input to
float8_e4m3fn, one scale per token (row), and multiply it with the stored fp8 weight by ``torch._scaled_mm``:

    y = (x_fp8 @ w_fp8.T) * scale_x[:, None] * scale_w[None, :] + bias

``scale_x`` is the row's absolute maximum over 448 (the largest e4m3 value); ``scale_w`` is the weight's own scale,
one per output row. Official fp8 checkpoints and the pack's own fp8 cast (``weight_dtype`` fp8_e4m3fn) store plain
e4m3 values (a scaled-fp8 file is dequantised at load), so the layers run with scale 1; :func:`fp8_linear` takes
per-row weight scales (:func:`quantize_weight_rows`) for weights quantised with them. The bias is added after
the product, in the compute dtype. No bf16 copy of the weight is made: the weight goes to ``_scaled_mm`` as
stored (transposed as a view, which is the column-major layout it wants).

The kernels want both matrix dimensions (in and out features) to be multiples of 16; layers that are not keep
the upcast path (none of the released model's are). A layer whose weight is not float8_e4m3fn when it is called
(e.g. a LoRA merged it back to bf16) also takes the upcast path. On CUDA the kernels need compute capability 8.9
(Ada, Hopper) or newer; on an older GPU the first call fails and names the setting to turn off. Row-wise scaled
kernels (one scale per token) are used on Hopper and newer and on the CPU; on Ada the input takes one scale for
the whole tensor (tensor-wise kernels, which every fp8 GPU has). The CPU build
runs ``_scaled_mm`` too (slowly: it has no fp8 units), which is what makes the numerics testable without a GPU.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor, nn

from .ops import compute_dtype

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0
ALIGNMENT = 16
SETTING = "fp8_matmul"
MIN_CAPABILITY = (8, 9)
ROWWISE_CAPABILITY = (9, 0)
BLOCK_LINEAR = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)"
                          r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))$")
"""The block Linear layers (those a checkpoint may store in fp8), by module name."""


class Fp8MatmulError(ValueError):
    """fp8 matmul was asked for a model or device that cannot run it."""


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) -> (float8_e4m3fn (M, K), float32 scale (M, 1)) with ``x ≈ q * scale``; one scale per row, its
    absolute maximum over 448 (rows of zeros get scale 1)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def quantize_weight_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A full-precision (out, in) weight as float8_e4m3fn with one float32 scale per output row (out,)."""
    q, scale = quantize_rows(weight)
    return q, scale.squeeze(1)


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, weight_scale: Tensor | None, dtype: torch.dtype,
               rowwise: bool = True) -> Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` by ``torch._scaled_mm``, returned in ``dtype``.

    ``weight``: float8_e4m3fn (out, in) on ``x``'s device; ``weight_scale``: None (scale 1) or float32 (out,).
    ``rowwise``: one activation scale per token (row-wise scaled kernels); False: one scale for the whole input
    (tensor-wise kernels, which every fp8 GPU has; the weight's row scales are then applied to the product)."""
    out_features = weight.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    if rowwise:
        q, scale_x = quantize_rows(rows)
        if weight_scale is None:
            scale_w = torch.ones(1, out_features, dtype=torch.float32, device=x.device)
        else:
            scale_w = weight_scale.to(device=x.device, dtype=torch.float32).reshape(1, out_features)
        # Row-wise scaled products on CUDA return bfloat16 only; the result is cast to the compute dtype after.
        y = torch._scaled_mm(q, weight.t(), scale_a=scale_x, scale_b=scale_w, out_dtype=torch.bfloat16).to(dtype)
    else:
        q, scale_x = quantize_rows(rows.reshape(1, -1))
        one = torch.ones((), dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(q.reshape(rows.shape), weight.t(), scale_a=scale_x.reshape(()), scale_b=one,
                             out_dtype=dtype)
        if weight_scale is not None:
            y = y * weight_scale.to(device=x.device, dtype=dtype)
    if bias is not None:
        y = y + bias.to(device=x.device, dtype=dtype)
    return y.reshape(*x.shape[:-1], out_features)


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _constant_under_compile(fn):
    mark = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_under_compile
def _cuda_rowwise(index: int | None) -> bool:
    return _capability(index) >= ROWWISE_CAPABILITY


def rowwise_on(device: torch.device) -> bool:
    """Whether ``device`` runs row-wise scaled fp8 products: the CPU and Hopper or newer; Ada (8.9) takes one
    activation scale per input (tensor-wise)."""
    return device.type != "cuda" or _cuda_rowwise(device.index)


def check_device(device: torch.device) -> None:
    """Fail, naming the setting, where ``_scaled_mm`` has no fp8 kernels (CUDA GPUs older than Ada)."""
    if device.type == "cuda" and _capability(device.index) < MIN_CAPABILITY:
        major, minor = _capability(device.index)
        raise Fp8MatmulError(
            f"{SETTING} needs a GPU with fp8 matmuls (compute capability 8.9+: Ada, Hopper or newer); this one is "
            f"{major}.{minor}. Turn {SETTING} off: fp8 weights are then upcast per layer, as by default.")


class Fp8MatmulMixin:
    """Put before a Linear class: its ``forward`` multiplies in fp8 while the weight is float8_e4m3fn."""

    fp8_matmul = True

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if weight is None or weight.dtype != E4M3 or _has_cast_patches(self):
            return super().forward(x)
        if not _compiling():
            check_device(x.device)
        dtype = compute_dtype(x)
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            dtype = torch.bfloat16
        return fp8_linear(x, weight.to(x.device, non_blocking=True), self.bias, None, dtype, rowwise_on(x.device))


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _has_cast_patches(linear: nn.Module) -> bool:
    """ComfyUI's low-VRAM LoRA patches are applied when the weight is cast; such a layer keeps the upcast path."""
    return bool(getattr(linear, "weight_function", None) or getattr(linear, "bias_function", None))


@functools.lru_cache(maxsize=None)
def _fp8_class(base: type) -> type:
    return type(f"Fp8Matmul{base.__name__}", (Fp8MatmulMixin, base), {"__module__": __name__, "upcast_class": base})


def fits(linear: nn.Module) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear layers of the transformer blocks (the ones a checkpoint may store in fp8), by state-dict name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and BLOCK_LINEAR.match(name)]


def check_model(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block Linear layers fp8 matmul will run: float8_e4m3fn weights whose dimensions are multiples of 16.
    Raises :class:`Fp8MatmulError`, with the fix, for GGUF-quantised or not-fp8 weights."""
    if E4M3 is None:
        raise Fp8MatmulError(f"{SETTING} needs torch >= 2.1 with float8 support; update torch or turn it off.")
    linears = block_linears(model)
    if any(getattr(m, "qtype", None) is not None for _, m in linears):
        raise Fp8MatmulError(
            f"{SETTING} runs on float8_e4m3fn block weights; this model's are GGUF-quantised. Load an fp8 "
            "checkpoint (or a bf16 one with weight_dtype fp8_e4m3fn), or turn fp8_matmul off.")
    dtypes = sorted({str(m.weight.dtype).replace("torch.", "") for _, m in linears})
    chosen = [(n, m) for n, m in linears if m.weight.dtype == E4M3 and fits(m)]
    if not chosen:
        raise Fp8MatmulError(
            f"{SETTING} runs on float8_e4m3fn block weights; this model keeps them in {', '.join(dtypes) or 'no'} "
            f"{'dtype' if len(dtypes) < 2 else 'dtypes'}. Set weight_dtype to fp8_e4m3fn (or load an fp8_e4m3fn "
            "checkpoint with weight_dtype default), or turn fp8_matmul off.")
    return chosen


def enable_fp8_matmul(model: nn.Module) -> int:
    """Switch the fp8 block Linear layers of ``model`` to fp8 matmuls (see the module docstring), in place.
    Returns how many layers were switched."""
    chosen = check_model(model)
    for _, linear in chosen:
        if not isinstance(linear, Fp8MatmulMixin):
            linear.__class__ = _fp8_class(type(linear))
    return len(chosen)


def disable_fp8_matmul(model: nn.Module) -> None:
    """Undo :func:`enable_fp8_matmul`: every layer back on its own class (the upcast path)."""
    for module in model.modules():
        if isinstance(module, Fp8MatmulMixin):
            module.__class__ = module.upcast_class


def uses_fp8_matmul(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8MatmulMixin) for m in model.modules())

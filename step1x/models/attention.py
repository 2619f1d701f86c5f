"""One attention entry point and a registry of backends.

Every backend takes q, k, v laid out as (batch, tokens, heads, head_dim) and returns
(batch, tokens, heads * head_dim). ``sdpa`` (torch's scaled_dot_product_attention) is always there;
``xformers`` and ``flash`` are used when their package imports and the tensors suit their kernels.
Optional packages are imported only when a backend is selected, never at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class AttentionBackendError(RuntimeError):
    """An attention backend that was asked for and cannot be used."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    package: str | None
    install_hint: str
    devices: tuple[str, ...] | None
    """Device types the kernels run on; ``None`` for any."""
    dtypes: tuple[torch.dtype, ...] | None
    """Tensor dtypes the kernels accept; ``None`` for any."""
    min_capability: dict[torch.dtype, tuple[int, int]] = field(default_factory=dict)
    """Lowest CUDA compute capability the kernels need, per dtype (flash-attn 2 and xformers' bf16 kernels
    need Ampere, 8.0); dtypes not listed run on any."""

    def is_installed(self) -> bool:
        """The package is there and imports (a build for another torch or CUDA does not)."""
        return self.package is None or _imports(self.package)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.devices is not None and device.type not in self.devices:
            return False
        if self.dtypes is not None and dtype not in self.dtypes:
            return False
        needed = self.min_capability.get(dtype)
        return needed is None or device.type != "cuda" or _cuda_capability(device) >= needed


@functools.lru_cache(maxsize=None)
def _import_error(package: str) -> str | None:
    """``None`` when ``package`` imports, ``""`` when it is not installed, else why its import fails.
    Checked once per package, so choosing a backend per attention call costs no file-system lookups."""
    try:
        if importlib.util.find_spec(package) is None:
            return ""
    except (ImportError, ValueError):
        return ""
    try:
        importlib.import_module(package)
    except Exception as exc:  # a broken binary install: undefined symbols, a CUDA mismatch
        return f"{type(exc).__name__}: {exc}"
    return None


def _constant_under_compile(fn):
    """Let ``torch.compile`` call ``fn`` once while tracing and keep its result as a constant (no graph break for
    the package and GPU look-ups behind the backend choice)."""
    mark = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_under_compile
def _imports(package: str) -> bool:
    return _import_error(package) is None


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@_constant_under_compile
def _capability_of(index: int | None) -> tuple[int, int]:
    return _capability(index)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, looked up once (a tensor's device always has its index)."""
    return _capability_of(device.index)


_BACKENDS: dict[str, Backend] = {}
AUTO_ORDER = ("flash", "xformers", "sdpa")
"""Preference of ``auto`` among the backends whose package imports and whose kernels suit the tensors."""


def register(name: str, *, package: str | None = None, install_hint: str = "", devices=None, dtypes=None,
             min_capability=None):
    def wrap(fn: AttentionFn) -> AttentionFn:
        _BACKENDS[name] = Backend(name, fn, package, install_hint, devices, dtypes, dict(min_capability or {}))
        return fn

    return wrap


def backend_names() -> list[str]:
    """Every registered backend plus ``auto``, for option lists."""
    return ["auto", *_BACKENDS]


def installed_backends() -> list[str]:
    return [name for name, b in _BACKENDS.items() if b.is_installed()]


def select_backend(name: str) -> str:
    """Validate a user's choice. Fails here, with an install hint, for a backend that cannot load."""
    if name == "auto":
        return name
    if name not in _BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    backend = _BACKENDS[name]
    error = None if backend.package is None else _import_error(backend.package)
    if error == "":
        raise AttentionBackendError(
            f"attention backend {name!r} needs the package {backend.package!r}, which is not installed. "
            f"{backend.install_hint} Or choose 'sdpa' / 'auto'."
        )
    if error is not None:
        raise AttentionBackendError(
            f"attention backend {name!r}: importing {backend.package!r} failed ({error}). "
            f"{backend.install_hint} Or choose 'sdpa' / 'auto'."
        )
    return name


_warned: set[tuple[str, str, str]] = set()


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that will run for tensors on ``device`` of ``dtype``.

    ``auto`` takes the first of :data:`AUTO_ORDER` that imports and suits the tensors. An explicit
    choice whose kernels do not suit the tensors (xformers on CPU, flash in float32 or on a GPU older
    than Ampere) falls back to ``sdpa`` with a one-time warning."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = _BACKENDS.get(candidate)
            if backend and backend.supports(device, dtype) and backend.is_installed():
                return backend
        return _BACKENDS["sdpa"]
    backend = _BACKENDS.get(name)
    if backend is None:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    if not backend.supports(device, dtype):
        key = (name, device.type, str(dtype))
        if key not in _warned and not _compiling():
            _warned.add(key)
            log.warning("attention backend %r does not run on %s tensors of %s%s; using 'sdpa' for them", name,
                        device.type, dtype, _capability_note(backend, device, dtype))
        return _BACKENDS["sdpa"]
    return backend


def _compiling() -> bool:
    """Inside ``torch.compile`` tracing (the one-time warning is left to eager calls there)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _capability_note(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    needed = backend.min_capability.get(dtype)
    if needed is None or device.type != "cuda" or (backend.dtypes is not None and dtype not in backend.dtypes):
        return ""
    have = _cuda_capability(device)
    return f" on a GPU of compute capability {have[0]}.{have[1]} (it needs {needed[0]}.{needed[1]} or newer)"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Attention over (B, L, H, D) tensors; ``mask`` is boolean, broadcastable to (B, H, Lq, Lk),
    True where a query may attend a key. Returns (B, L, H * D)."""
    dtype = q.dtype
    impl = resolve(backend, q.device, dtype)
    out = impl.fn(q, k, v, mask)
    return out.reshape(out.shape[0], out.shape[1], -1)


@register("sdpa")
def _sdpa(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@register(
    "xformers",
    package="xformers",
    install_hint="Install it with `pip install xformers` (a build matching your torch and CUDA).",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    min_capability={torch.bfloat16: (8, 0)},
)
def _xformers(q, k, v, mask):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        bias = _xformers_bias(mask, q)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def _xformers_bias(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Boolean (B|1, H|1, Lq, Lk) mask -> additive bias (B, H, Lq, Lk) in q's dtype.

    xformers wants the bias materialised per head, and its last dimension stored with a stride
    aligned to 8 elements, so the storage is padded and then sliced back."""
    b, lq, h, _ = q.shape
    lk = mask.shape[-1]
    padded = (lk + 7) // 8 * 8
    storage = torch.zeros(b, h, lq, padded, dtype=q.dtype, device=q.device)
    bias = storage[..., :lk]
    bias.masked_fill_(~mask.to(q.device).expand(b, h, lq, lk), float("-inf"))
    return bias


@register(
    "flash",
    package="flash_attn",
    install_hint="Install it with `pip install flash-attn --no-build-isolation` (needs a CUDA toolchain).",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    min_capability={torch.float16: (8, 0), torch.bfloat16: (8, 0)},
)
def _flash(q, k, v, mask):
    if mask is not None:
        return _sdpa(q, k, v, mask)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)

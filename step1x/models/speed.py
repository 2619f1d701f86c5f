"""The two opt-in speed settings of a loaded DiT, applied together: fp8 matmuls and compiled blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .compile import compile_blocks
from .fp8_matmul import enable_fp8_matmul


@dataclass(frozen=True)
class SpeedOptions:
    fp8_matmul: bool = False
    """Block Linear layers with float8_e4m3fn weights multiply in fp8 (:mod:`step1x.models.fp8_matmul`)."""
    compile: bool = False
    """Each transformer block runs through ``torch.compile`` (:mod:`step1x.models.compile`)."""


def apply_speed_options(model: nn.Module, options: SpeedOptions | None = None, *, fp8_matmul: bool = False,
                        compile: bool = False, device=None) -> nn.Module:
    """Apply ``options`` (or the two flags) to ``model`` in place and return it. fp8 matmul is checked first, so a
    model it cannot run on fails before anything is compiled. ``device``: where the model will run (None: the GPU
    when one is present, else the CPU), for the compiler check of :func:`~step1x.models.compile.check_compiler`."""
    options = options or SpeedOptions(fp8_matmul=fp8_matmul, compile=compile)
    if options.fp8_matmul:
        enable_fp8_matmul(model)
    if options.compile:
        compile_blocks(model, device=device)
    return model

"""Opt-in ``torch.compile`` of the DiT blocks.

Each double and single block is compiled on its own (``nn.Module.compile``: the module stays the same object, its
call goes through the compiled code), so everything that calls the blocks one by one, the plain block loop and
TeaCache, runs compiled; RegionE drives the blocks' layers itself and runs them eagerly. The blocks trace without
graph breaks (attention backend choice, RoPE and modulation included; a CPU test compiles them with
``fullgraph=True``), so the compiler can fuse the RMSNorm, the RoPE rotation and the modulation / residual-gate
arithmetic around the matmuls. The first step of each new image size pays the compile time (tens of seconds on a
GPU for the 57 blocks; later steps and runs of the same size reuse the code).
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

log = logging.getLogger(__name__)

SETTING = "compile"


class CompileError(RuntimeError):
    """torch.compile was asked for and cannot be used."""


def blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


def check_compiler(device: torch.device | str | None = None, backend: str = "inductor") -> None:
    """Refuse, before anything is compiled, when the inductor backend cannot build kernels for ``device`` (None: the
    GPU when one is present, else the CPU): GPU kernels need a working Triton, CPU kernels a C++ compiler. Without
    this check the failure would come at the first step, deep inside torch."""
    if backend != "inductor":
        return
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind in ("cuda", "xpu"):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileError(
                f"{SETTING} builds GPU kernels with Triton, and no working Triton is installed in this Python "
                f"environment: install it (`pip install triton`; on Windows `pip install triton-windows`, the "
                f"version that matches your torch) or turn {SETTING} off.")
    elif kind == "cpu":
        candidates = [os.environ.get("CXX"), "g++", "clang++", "c++", "cl"]
        if not any(name and shutil.which(name) for name in candidates):
            raise CompileError(
                f"{SETTING} builds CPU kernels with a C++ compiler and none was found (g++, clang++ or cl on PATH, "
                f"or CXX set): install one or turn {SETTING} off.")


def compile_blocks(model: nn.Module, *, fullgraph: bool = False, dynamic: bool | None = None, mode: str | None = None,
                   backend: str = "inductor", device: torch.device | str | None = None) -> int:
    """Compile every transformer block of ``model`` in place; returns how many. ``fullgraph`` makes any graph break
    an error (the tests use it); the default lets the compiler fall back on code it cannot trace (e.g. layer
    classes from another package). ``dynamic`` None: a second image size recompiles with dynamic token counts."""
    if not hasattr(nn.Module, "compile"):
        raise CompileError(f"{SETTING} needs torch >= 2.2 (nn.Module.compile); update torch or turn {SETTING} off.")
    check_compiler(device, backend)
    found = blocks(model)
    for block in found:
        block.compile(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
    log.info("compiling %d DiT blocks with torch.compile (%s) on their first call", len(found), backend)
    return len(found)


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in blocks(model))


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager blocks. The compiled code stays in torch's cache until ``torch._dynamo.reset()``, which also
    drops every other compiled function of the process."""
    for block in blocks(model):
        block._compiled_call_impl = None

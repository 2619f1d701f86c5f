"""Resident weight memory of the Qwen2.5-VL-7B text encoder as the pack loads it (the v1.0/v1.1 encoder and the
v1.2 text_encoder share this architecture), counted on the meta device from the released config:

    python benchmarks/bench_text_encoder.py

Rows: compute dtype bf16, or bf16 with the block Linear weights kept in float8 (``keep_fp8``/``quantize_fp8``,
the MLLM loader's fp8 choices, ``--mllm-fp8``), each without and with the language-model head (``generation``,
needed by v1.2 thinking/reflection). The layers are the ones the loader builds (``Fp8Linear`` with its float32
scale), so the figures follow the code. No weights are read and nothing is computed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from step1x.encoder import keys as K  # noqa: E402
from step1x.encoder.build import QUANTIZED, empty_model  # noqa: E402
from step1x.encoder.fp8 import FP8_DTYPE, swap_linear  # noqa: E402
from step1x.encoder.spec import QWEN25_VL_7B, make_config  # noqa: E402

COMPUTE_BYTES = 2
"""bf16: every floating tensor the loader does not keep in fp8."""


def resident(lm_head: bool, fp8: bool) -> dict[str, int]:
    """Bytes of the loaded encoder by part: the fp8-able block matrices, the LM head, everything else."""
    model = empty_model(make_config(QWEN25_VL_7B, "Qwen2.5-VL-7B-Instruct"), lm_head=lm_head)
    if fp8:
        linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        for name, p in list(model.named_parameters()):
            if name in linears and K.canonical(name).startswith(QUANTIZED):
                swap_linear(model, name, torch.empty(p.shape, dtype=FP8_DTYPE, device="meta"),
                            torch.empty((), dtype=torch.float32, device="meta"))
    parts = {"blocks": 0, "lm_head": 0, "rest": 0}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in dict(tensors).items():
        if t.dtype == FP8_DTYPE or name.endswith("scale_weight"):
            size = t.numel() * t.element_size()
        elif t.is_floating_point():
            size = t.numel() * COMPUTE_BYTES
        else:
            size = t.numel() * t.element_size()
        canonical = K.canonical(name)
        if canonical.startswith("lm_head."):
            parts["lm_head"] += size
        else:
            parts["blocks" if canonical.startswith(QUANTIZED) else "rest"] += size
    return parts


def main() -> None:
    config = QWEN25_VL_7B
    print(f"# Qwen2.5-VL-7B: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, vocab "
          f"{config['vocab_size']}, vision depth {config['vision_config']['depth']}, tied head "
          f"{config['tie_word_embeddings']}")
    print("| weights | LM head | total GiB | total bytes | block matrices GiB | LM head GiB | everything else GiB |")
    print("|---|---|---|---|---|---|---|")
    for fp8 in (False, True):
        for lm_head in (False, True):
            parts = resident(lm_head, fp8)
            total = sum(parts.values())
            print(f"| {'bf16 + fp8 blocks' if fp8 else 'bf16'} | {'kept' if lm_head else 'dropped'} | "
                  f"{total / 2**30:.2f} | {total:,} | {parts['blocks'] / 2**30:.2f} | {parts['lm_head'] / 2**30:.2f} | "
                  f"{parts['rest'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()

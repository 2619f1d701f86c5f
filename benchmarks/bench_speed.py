"""The opt-in speed settings side by side, same model shape, same inputs, same run: one DiT forward (connector and
transformer, the CFG batch of 2) for bf16, bf16 with compiled blocks, fp8 block weights upcast per call (the
default for fp8), fp8 matmuls, and fp8 matmuls with compiled blocks; with ``--official DIR`` (a checkout of
stepfun-ai/Step1X-Edit, not part of this repository, and ``pip install einops``) also the official forward on the
same weights, run eagerly with PyTorch attention (``official_dit.py``); the models are then the v1.0 layout, which
the official code builds.

    python benchmarks/bench_speed.py --threads 2                   # the CPU bench config of bench_dit.py
    python benchmarks/bench_speed.py --threads 2 --official ../Step1X-Edit
    python benchmarks/bench_speed.py --device cuda --real --size 1024   # the released architecture

The variants are timed round-robin (``--rounds`` rounds, each variant ``--repeats`` forwards per round) and the
median forward is reported, so that a machine shared with other work slows every variant alike. Compiling happens
in a warm-up forward before timing. Weights are random; speed does not depend on them. A CPU has no fp8 units:
there ``torch._scaled_mm`` is a slow reference kernel, and the fp8 matmul rows measure that, not what a GPU does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_dit import small_params  # noqa: E402

from step1x.checkpoints.loading import cast_model  # noqa: E402
from step1x.models.compile import compile_blocks  # noqa: E402
from step1x.models.configs import STEP1X_EDIT, with_version  # noqa: E402
from step1x.models.fp8_matmul import enable_fp8_matmul  # noqa: E402
from step1x.models.model import Step1XEdit  # noqa: E402
from step1x.sampling.denoise import position_ids  # noqa: E402

VARIANTS = {  # name: (weight_dtype, fp8 matmul, compile)
    "bf16": ("default", False, False),
    "bf16 + compile": ("default", False, True),
    "fp8 upcast": ("fp8_e4m3fn", False, False),
    "fp8 matmul": ("fp8_e4m3fn", True, False),
    "fp8 matmul + compile": ("fp8_e4m3fn", True, True),
}


def random_state(params, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights for every tensor of a model of ``params`` (std 0.02; norm scales 1)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Step1XEdit(params).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.ones(s) if k.endswith(".scale") else torch.randn(s, generator=g) * 0.02)
            for k, s in sorted(shapes.items())}


def build(params, state, weight_dtype: str, dtype: torch.dtype, device: torch.device) -> Step1XEdit:
    with torch.device("meta"):
        model = Step1XEdit(params)
    model.load_state_dict(state, assign=True)
    cast_model(model, dtype, weight_dtype)
    return model.to(device).eval().requires_grad_(False)


def inputs(params, size: int, text_tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The model inputs of one CFG step of a ``size`` x ``size`` edit: noisy + reference tokens, batch 2."""
    grid = size // 16
    g = torch.Generator().manual_seed(1)
    img_ids = torch.cat([position_ids(2, grid, grid), position_ids(2, grid, grid, base=1.0)], dim=1)
    mask = torch.zeros(2, text_tokens, dtype=torch.long)
    mask[0, : text_tokens * 5 // 8], mask[1, : text_tokens // 4] = 1, 1
    tensors = dict(
        img=torch.randn(2, 2 * grid * grid, params.in_channels, generator=g),
        img_ids=img_ids, txt_ids=torch.zeros(2, text_tokens, 3), timesteps=torch.full((2,), 0.7),
        llm_embedding=torch.randn(2, text_tokens, params.connector.in_channels, generator=g) * mask[..., None],
        t_vec=torch.full((2,), 0.7), mask=mask,
    )
    floats = ("img", "timesteps", "llm_embedding", "t_vec")
    return {k: v.to(device=device, dtype=dtype if k in floats else v.dtype) for k, v in tensors.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--real", action="store_true", help="the released architecture (19 double + 38 single blocks)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=512, help="connector width (4096 in the real model)")
    ap.add_argument("--text-tokens", type=int, default=640)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (reference and output)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--official", type=Path, help="a checkout of stepfun-ai/Step1X-Edit: also time its forward")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.bfloat16
    version = "v1.0" if args.official else "v1.1"
    params = (with_version(STEP1X_EDIT, version) if args.real else
              small_params(args.hidden, args.heads, args.double, args.single, args.text_hidden, version))
    state = random_state(params)
    x = inputs(params, args.size, args.text_tokens, dtype, device)
    models = {}
    for name in args.variants.split(","):
        weight_dtype, fp8, compiled = VARIANTS[name]
        model = build(params, state, weight_dtype, dtype, device)
        if fp8:
            enable_fp8_matmul(model)
        if compiled:
            compile_blocks(model)
        models[name] = model
    if args.official:
        from official_dit import load_official

        models["official"] = load_official(args.official, params, state, dtype, device)
    del state

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up: compiles the compiled variants
            t0 = time.perf_counter()
            outputs[name] = model(**x).float()
            sync()
            print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for _ in range(args.rounds):
            for name, model in models.items():
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    model(**x)
                    sync()
                    times[name].append(time.perf_counter() - t0)

    median = {name: statistics.median(t) for name, t in times.items()}
    base = outputs["bf16"] if "bf16" in outputs else next(iter(outputs.values()))
    shape = "real 3072x(19+38)" if args.real else f"hidden {args.hidden}, {args.double}+{args.single} blocks"
    tokens = (args.size // 16) ** 2
    print(f"# device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {shape}, "
          f"{args.size}px edit ({tokens} noisy + {tokens} reference + {args.text_tokens} text tokens, CFG batch 2), "
          f"Step1X-Edit {version} layout, bf16 compute; median of {args.rounds * args.repeats} forwards")
    print("| variant | forward s | vs bf16 | rel. difference to bf16 |")
    print("|---|---|---|---|")
    for name, t in median.items():
        ratio = f"{t / median['bf16']:.2f}" if "bf16" in median else "-"
        diff = ((outputs[name] - base).norm() / base.norm()).item()
        print(f"| {name} | {t:.3f} | {ratio} | {diff:.4f} |")
    pairs = [("bf16 + compile", "bf16"), ("fp8 matmul + compile", "fp8 matmul"), ("fp8 matmul", "fp8 upcast"),
             ("fp8 upcast", "bf16"), ("fp8 matmul", "bf16"), ("bf16", "official"), ("bf16 + compile", "official")]
    for a, b in pairs:
        if a in median and b in median:
            print(f"{a} / {b}: {median[a] / median[b]:.3f}")


if __name__ == "__main__":
    main()

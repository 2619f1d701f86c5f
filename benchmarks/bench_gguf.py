"""GGUF DiT: memory per type, latent error per type, and step time against bf16.

    python benchmarks/bench_gguf.py sizes     # the released architecture: file and resident bytes per type
    python benchmarks/bench_gguf.py error     # 10-step denoise of a small random model, every type vs fp32
    python benchmarks/bench_gguf.py speed     # step time of Q8_0 and Q4_K relative to bf16 (same run)

``sizes`` needs no weights: it counts the shapes of the released model (meta device) under the converter's
type policy and the loader's storage (quantised block weights as stored, the rest in bf16). ``error`` and
``speed`` write GGUF files of random models into a temporary folder and load them through ``load_dit``;
the K-quant files come from plain round-to-nearest encoders (llama.cpp's quantizer does better), so their
errors are upper bounds. Random weights have no outliers, so the errors indicate the ranking of the types,
not the visual quality on the real model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from step1x.checkpoints.gguf_convert import planned_sizes, save_gguf  # noqa: E402
from step1x.checkpoints.loading import _BLOCK_LINEAR, cast_model, load_dit, save_with_config  # noqa: E402
from step1x.models.configs import STEP1X_EDIT, ConnectorParams, DiTParams, with_version  # noqa: E402
from step1x.models.dequant import QUANT_TYPES  # noqa: E402
from step1x.models.model import Step1XEdit  # noqa: E402
from step1x.sampling.denoise import TextConditioning, denoise, make_noise  # noqa: E402

GIB = 2**30
TYPES = list(QUANT_TYPES)
GOALS = {"Q4_K": 7.5, "Q8_0": 13.0}


def small_params(hidden: int, heads: int, double: int, single: int, text_hidden: int) -> DiTParams:
    """The released block design (head dim 128, RoPE axes 16/56/56) at a CPU-friendly size."""
    return with_version(replace(
        STEP1X_EDIT, hidden_size=hidden, num_heads=heads, depth=double, depth_single_blocks=single,
        context_in_dim=text_hidden,
        connector=ConnectorParams(in_channels=text_hidden, hidden_size=text_hidden,
                                  num_heads=max(1, text_hidden // 128)),
    ), "v1.1")


# ----------------------------------------------------------------------------------------------- sizes


def sizes(_args) -> None:
    print("# the released Step1X-Edit DiT (19 double + 38 single blocks, 12.4 B weights), bf16 source, bf16 compute")
    print("# resident = block weights as stored + everything else (embedders, final layer, connector, norms, "
          "biases) in bf16")
    print("| type | bits/weight (blocks) | file GiB | resident GiB | blocks GiB | rest (bf16) GiB | goal |")
    print("|---|---|---|---|---|---|---|")
    rest = _rest_bytes()
    for name in TYPES:
        if name == "F32":
            continue
        s = planned_sizes(STEP1X_EDIT, name)
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"<= {goal} GiB: {'met' if s.resident / GIB <= goal else 'MISSED'}"
        print(f"| {name} | {QUANT_TYPES[name].bits_per_weight:.3g} | {s.file / GIB:.2f} | {s.resident / GIB:.2f} | "
              f"{(s.resident - rest) / GIB:.2f} | {rest / GIB:.2f} | {verdict} |")
    with torch.device("meta"):
        fp8 = cast_model(Step1XEdit(STEP1X_EDIT), torch.bfloat16, "fp8_e4m3fn")
    total = sum(p.numel() * p.element_size() for p in fp8.parameters())
    print(f"| (safetensors, fp8_e4m3fn weights) | 8 | - | {total / GIB:.2f} | {(total - rest) / GIB:.2f} | "
          f"{rest / GIB:.2f} | |")


def _rest_bytes() -> int:
    """Bytes of everything but the block matrices, in bf16."""
    with torch.device("meta"):
        state = Step1XEdit(STEP1X_EDIT).state_dict()
    return sum(v.numel() * 2 for k, v in state.items() if not _BLOCK_LINEAR.match(k))


# ----------------------------------------------------------------------------------------------- error


def error(args) -> None:
    torch.set_num_threads(args.threads)
    params = small_params(args.hidden, args.heads, args.double, args.single, args.text_hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = Step1XEdit(params).eval()
    state = reference.state_dict()
    lat = args.size // 8
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 64, params.connector.in_channels, generator=g)
    mask = torch.zeros(2, 64, dtype=torch.long)
    mask[0, :40], mask[1, :12] = 1, 1
    cond, uncond = TextConditioning(emb[:1] * mask[:1, :, None], mask[:1]), TextConditioning(emb[1:], mask[1:])

    def sample(model):
        with torch.no_grad():
            return denoise(model, make_noise((1, 16, lat, lat), 0), cond, uncond,
                           reference=make_noise((1, 16, lat, lat), 1), steps=args.steps, compute_dtype=torch.float32)

    t0 = time.perf_counter()
    expected = sample(reference)
    print(f"# hidden {args.hidden}, {args.double}+{args.single} blocks, {args.size}px edit, {args.steps} steps, CFG 6, "
          f"fp32 compute; random weights (PyTorch default init); fp32 run {time.perf_counter() - t0:.1f} s")
    print("| type | block weights: relative RMS error | latent: max abs error | latent: relative L2 error |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in TYPES:
            path = save_gguf(state, Path(tmp) / f"{name}.gguf", name, params=params).path
            model = load_dit(path, compute_dtype=torch.float32)
            got = sample(model)
            diff = got - expected
            print(f"| {name} | {_weight_error(model, state):.2e} | {diff.abs().max():.2e} | "
                  f"{(diff.norm() / expected.norm()):.2e} |", flush=True)
            path.unlink()


def _weight_error(model, state) -> float:
    num = den = 0.0
    for name, module in model.named_modules():
        if not name.startswith(("double_blocks", "single_blocks")) or not isinstance(module, torch.nn.Linear):
            continue
        original = state[name + ".weight"].float()
        if getattr(module, "qtype", None) is not None:
            stored = module.dequantized_weight(torch.device("cpu"), torch.float32)
        else:
            stored = module.weight.float()
        num += float(((stored - original) ** 2).sum())
        den += float((original**2).sum())
    return (num / den) ** 0.5


# ----------------------------------------------------------------------------------------------- speed


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    params = small_params(args.hidden, args.heads, args.double, args.single, args.text_hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = Step1XEdit(params).state_dict()
    lat = args.size // 8
    emb = torch.randn(1, 640, params.connector.in_channels) * 0.1
    mask = torch.zeros(1, 640, dtype=torch.long)
    mask[:, :400] = 1
    cond, uncond = TextConditioning(emb, mask), TextConditioning(emb.flip(1), mask)
    noise, ref = make_noise((1, 16, lat, lat), 0), make_noise((1, 16, lat, lat), 1)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "bf16.safetensors"
        save_with_config({k: v.to(torch.bfloat16) for k, v in state.items()}, bf16, params)
        models["bf16"] = load_dit(bf16, compute_dtype=torch.bfloat16)
        for name in args.types.split(","):
            path = save_gguf(state, Path(tmp) / f"{name}.gguf", name, params=params).path
            models[name] = load_dit(path, compute_dtype=torch.bfloat16)

    def step(model) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            denoise(model, noise, cond, uncond, reference=ref, steps=1, compute_dtype=torch.bfloat16)
        return time.perf_counter() - t0

    for model in models.values():
        step(model)  # warm-up
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():  # interleaved, so load from other processes hits every type alike
            times[name].append(step(model))
    tokens = (args.size // 16) ** 2
    print(f"# CPU, {args.threads} threads, torch {torch.__version__}, hidden {args.hidden}, "
          f"{args.double}+{args.single} blocks, {args.size}px edit ({tokens} noisy + {tokens} reference + 640 text "
          f"tokens), CFG batch 2, bf16 compute; median of {args.repeats} interleaved single steps")
    print("| weights | resident MiB | step s | relative to bf16 |")
    print("|---|---|---|---|")
    base = statistics.median(times["bf16"])
    for name, model in models.items():
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        median = statistics.median(times[name])
        print(f"| {name} | {size:.0f} | {median:.2f} | {median / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    sub.add_parser("sizes", help="file and resident bytes per type for the released architecture")
    shapes = {"error": dict(hidden=512, heads=4, double=2, single=2, text_hidden=256, size=256, steps=10),
              "speed": dict(hidden=1024, heads=8, double=2, single=4, text_hidden=512, size=256)}
    for mode, defaults in shapes.items():
        p = sub.add_parser(mode)
        for key, value in defaults.items():
            p.add_argument("--" + key.replace("_", "-"), type=int, default=value)
        p.add_argument("--threads", type=int, default=2)
        if mode == "speed":
            p.add_argument("--types", default="Q8_0,Q4_K")
            p.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    {"sizes": sizes, "error": error, "speed": speed}[args.mode](args)


if __name__ == "__main__":
    main()

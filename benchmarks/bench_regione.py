"""RegionE against the plain sampler, same model, same inputs, same run: DiT work (token evaluations) and time.

    python benchmarks/bench_regione.py                        # 512x512 edit (1024 tokens), small CPU model
    python benchmarks/bench_regione.py --text-tokens 640      # the real model's text length
    python benchmarks/bench_regione.py --count-only --size 1024 --text-tokens 640   # work only, no model
    python benchmarks/bench_regione.py --count-only --version v1.2 --size 1024 --text-tokens 426 --uncond-tokens 413

The edit is built like the RegionE fixtures: outside a rectangle the starting noise is 4 x the reference, so
the one-step estimate points back at the reference there; inside it (and at four isolated speckles, minus one
hole) the noise is independent. The rectangle is sized so that, after erosion and dilation, 39% of the tokens
are edited, as in the fixture (100 of 256). Weights are random; work does not depend on them and time only
through the shapes. Work counts rows x (text + image tokens fed) per DiT forward, as the fixture does.

``--version v1.2`` samples with the v1.2 rules (cond and uncond as separate passes, each with its own text
length: ``--text-tokens`` and ``--uncond-tokens``; the vision tokens of the reference are part of v1.2's text)
and the v1.2 decay table. (A v1.0 model's RegionE work equals v1.1's.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_dit import small_params  # noqa: E402

from step1x.checkpoints.loading import cast_model  # noqa: E402
from step1x.models.configs import VERSIONS  # noqa: E402
from step1x.models.model import Step1XEdit  # noqa: E402
from step1x.sampling.denoise import TextConditioning, denoise  # noqa: E402
from step1x.sampling.regione import RegionETrace, regione_denoise  # noqa: E402
from step1x.sampling.regione_rules import (  # noqa: E402
    DecayRatios,
    RegionEConfig,
    VelocityCache,
    decay_table,
    plan_steps,
)
from step1x.sampling.rules import rules_for  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def constructed_edit(grid: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, reference) latents (1, 16, 2*grid, 2*grid) with the fixture's layout scaled to ``grid`` tokens."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 16, grid // 4, grid // 4, generator=g),
                                             size=(2 * grid, 2 * grid), mode="bilinear")
    reference = smooth + 0.3 * torch.randn(1, 16, 2 * grid, 2 * grid, generator=g)
    noise = 4 * reference
    side, top, left = grid // 2 + 2, grid // 4, (6 * grid) // 16
    edited = torch.zeros(grid, grid, dtype=torch.bool)
    edited[top:top + side, left:left + side] = True
    edited[top + side // 2, left + side // 2] = False  # a hole the dilation fills
    for r, c in ((1, 1), (grid - 2, 2), (2, grid - 2), (grid - 3, grid - 2)):  # speckles the erosion removes
        edited[r, c] = True
    pixels = edited.repeat_interleave(2, 0).repeat_interleave(2, 1)
    fresh = torch.randn(1, 16, 2 * grid, 2 * grid, generator=g)
    return torch.where(pixels, fresh, noise), reference


def text(tokens: int, uncond_tokens: int, width: int, version: str) -> tuple[TextConditioning, TextConditioning]:
    """Cond and uncond text. v1.2: each trimmed to its own length, with text positions and a few quoted tokens."""
    g = torch.Generator().manual_seed(1)
    sides = []
    for n in (tokens, uncond_tokens):
        emb = torch.randn(1, n, width, generator=g) * 0.1
        mask = torch.ones(1, n, dtype=torch.long)
        if version == "v1.2":
            ids = torch.zeros(1, n, 3)
            ids[..., 0] = torch.arange(-n, 0)
            quoted = torch.zeros(1, n, dtype=torch.long)
            quoted[:, 10:20] = 1
            sides.append(TextConditioning(emb, mask, ids, emb, quoted))
        else:
            sides.append(TextConditioning(emb, mask))
    return sides[0], sides[1]


def count_only(args) -> None:
    """Work of RegionE over the plain sampler from the plan and the reuse decisions alone (no model)."""
    n, tokens = args.steps, (args.size // 16) ** 2
    lengths = (args.text_tokens, args.uncond_tokens)
    edited = round(args.edited_fraction * tokens)
    rules = rules_for(args.version)
    sigmas = torch.tensor(rules.schedule(n, tokens))
    plan = plan_steps(RegionEConfig(), n)
    reference = None if n == 28 else torch.tensor(rules.schedule(28, tokens))
    cache = VelocityCache(plan, DecayRatios(decay_table(args.version), sigmas, reference),
                          RegionEConfig().cache_threshold)
    kinds = {"full": 0, "region": 0, "cached": 0}
    for i in range(n):
        compute = cache.decide(i).compute
        kinds["full" if plan.full(i) else "region" if compute else "cached"] += 1
    full, region = sum(t + 2 * tokens for t in lengths), sum(t + edited for t in lengths)
    work = (kinds["full"] * full + kinds["region"] * region) / (n * full)
    text_tokens = str(lengths[0]) if lengths[0] == lengths[1] else f"{lengths[0]} / {lengths[1]}"
    print(f"| {args.version} | {args.size}px ({tokens} tokens) | {text_tokens} | {edited} "
          f"({args.edited_fraction:.0%}) | {kinds['full']}/{kinds['region']}/{kinds['cached']} | {work:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--text-hidden", type=int, default=256, help="connector width (4096 in the real model)")
    ap.add_argument("--version", choices=VERSIONS, default="v1.1", help="model version and its sampler rules")
    ap.add_argument("--text-tokens", type=int, default=96,
                    help="text length; 96 keeps the fixture's text-to-image proportion (24:256), 640 is the real one")
    ap.add_argument("--uncond-tokens", type=int, default=None,
                    help="the negative prompt's text length (default: --text-tokens; v1.2 prompts differ)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512: 1024 tokens)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--count-only", action="store_true", help="work ratio from the plan alone, no model")
    ap.add_argument("--edited-fraction", type=float, default=100 / 256, help="with --count-only (fixture: 100/256)")
    args = ap.parse_args()
    if args.uncond_tokens is None:
        args.uncond_tokens = args.text_tokens
    if args.count_only:
        print("| version | image | text tokens (cond / uncond) | edited tokens | full/region/cached steps | "
              "work RegionE / plain |")
        print("|---|---|---|---|---|---|")
        count_only(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    params = small_params(args.hidden, args.heads, args.double, args.single, args.text_hidden, args.version)
    with torch.device("meta"):
        model = Step1XEdit(params)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = cast_model(model, dtype).to(device).eval().requires_grad_(False)
    noise, reference = constructed_edit(args.size // 16)
    cond, uncond = text(args.text_tokens, args.uncond_tokens, args.text_hidden, args.version)
    kw = dict(reference=reference, steps=args.steps, compute_dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = fn()
        sync()
        return out, time.perf_counter() - t0, time.process_time() - c0

    with torch.no_grad():
        denoise(model, noise, cond, uncond, **{**kw, "steps": 1})  # warm-up
    plain, plain_s, plain_cpu = timed(lambda: denoise(model, noise, cond, uncond, **kw))
    trace = RegionETrace()
    fast, fast_s, fast_cpu = timed(lambda: regione_denoise(model, noise, cond, uncond, trace=trace, **kw))
    row = trace.rows[0]
    kinds = row.kinds
    full = sum(k in ("full", "partition", "refresh") for k in kinds)
    diff = ((fast.float() - plain.float()).norm() / plain.float().norm()).item()
    tokens = (args.size // 16) ** 2
    print(f"# {device}, {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, hidden "
          f"{args.hidden}, {args.double}+{args.single} blocks, Step1X-Edit {args.version} rules, {args.size}px edit "
          f"({tokens} noisy + {tokens} reference + {args.text_tokens}/{args.uncond_tokens} text tokens), "
          f"{args.steps} steps")
    print("| edited tokens | full/region/cached steps | work RegionE / plain | wall plain s | wall RegionE s | "
          "wall ratio | CPU-time ratio | final rel-L2 vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row.partition.edited.numel()}/{tokens} | {full}/{kinds.count('region')}/{kinds.count('cached')} | "
          f"{trace.work_ratio:.3f} | {plain_s:.1f} | {fast_s:.1f} | {fast_s / plain_s:.3f} | "
          f"{fast_cpu / plain_cpu:.3f} | {diff:.3f} |")


if __name__ == "__main__":
    main()

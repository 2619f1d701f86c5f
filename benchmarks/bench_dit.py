"""Speed and memory of the Step1X-Edit DiT: one forward and a full denoise, per attention backend and
weight dtype.

    python benchmarks/bench_dit.py                       # small CPU-friendly model, 512x512 edit
    python benchmarks/bench_dit.py --real --size 1024    # the released architecture (needs a big GPU)
    python benchmarks/bench_dit.py --weights-only --version v1.2   # resident weight memory, no compute

Each configuration runs in its own process so that peak memory is measured cleanly: CUDA max
allocated on a GPU, peak RSS (VmHWM) on the CPU. Weights are random; speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from step1x.checkpoints.loading import cast_model  # noqa: E402
from step1x.models.attention import installed_backends  # noqa: E402
from step1x.models.configs import STEP1X_EDIT, VERSIONS, ConnectorParams, DiTParams, with_version  # noqa: E402
from step1x.models.model import Step1XEdit  # noqa: E402
from step1x.sampling.denoise import TextConditioning, denoise, make_noise  # noqa: E402

DTYPES = {"fp32": (torch.float32, "fp32"), "bf16": (torch.bfloat16, "default"),
          "fp8": (torch.bfloat16, "fp8_e4m3fn")}


def small_params(hidden: int, heads: int, double: int, single: int, text_hidden: int, version: str) -> DiTParams:
    head_dim = hidden // heads
    if head_dim != 128:
        raise SystemExit("use a head dim of 128 (hidden/heads) so the RoPE axes are the real 16/56/56")
    return with_version(replace(
        STEP1X_EDIT, hidden_size=hidden, num_heads=heads, depth=double, depth_single_blocks=single,
        context_in_dim=text_hidden,
        connector=ConnectorParams(in_channels=text_hidden, hidden_size=text_hidden,
                                  num_heads=max(1, text_hidden // 128)),
    ), version)


def rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_one(cfg: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"]) if cfg["threads"] else None
    device = torch.device(cfg["device"])
    if cfg["real"]:
        params = with_version(STEP1X_EDIT, cfg["version"])
    else:
        params = small_params(cfg["hidden"], cfg["heads"], cfg["double"], cfg["single"], cfg["text_hidden"],
                              cfg["version"])
    compute, weight = DTYPES[cfg["dtype"]]
    with torch.device("meta"):
        model = Step1XEdit(params)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cast_model(model, compute, weight)
    model.to(device).eval().requires_grad_(False)
    model.set_attention_backend(cfg["attention"])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    lat = cfg["size"] // 8
    noise = make_noise((1, 16, lat, lat), 0)
    ref = make_noise((1, 16, lat, lat), 1)
    emb = torch.randn(1, 640, params.connector.in_channels) * 0.1
    mask = torch.zeros(1, 640, dtype=torch.long)
    mask[:, :400] = 1
    cond, uncond = TextConditioning(emb, mask), TextConditioning(emb.flip(1), mask)
    if params.text_token_mapping:  # v1.2: text trimmed to its valid length, with positions and quote mask
        ids = torch.zeros(1, 400, 3)
        ids[..., 0] = torch.arange(-400, 0)
        quoted = torch.zeros(1, 400, dtype=torch.long)
        quoted[:, 100:110] = 1
        cond = TextConditioning(emb[:, :400], mask[:, :400], ids, emb[:, :400], quoted)
        uncond = TextConditioning(emb[:, :380], mask[:, :380], ids[:, -380:], emb[:, :380], quoted[:, :380] * 0)

    def sample(steps):
        with torch.no_grad():
            return denoise(model, noise, cond, uncond, reference=ref, steps=steps, compute_dtype=compute, device=device,
                           sequential_cfg=cfg["sequential_cfg"])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sample(1)  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_rss_peak()
    t0 = time.perf_counter()
    sample(1)
    sync()
    step = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample(cfg["steps"])
    sync()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_peak_mb()
    return {"step_s": step, "denoise_s": total, "peak_mb": peak, "weights_mb": weight_bytes / 2**20,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def weight_table(params: DiTParams) -> None:
    """Resident weight memory of a model under each storage policy, counted on the meta device."""
    print(f"# Step1X-Edit {params.version}: hidden {params.hidden_size}, {params.depth}+{params.depth_single_blocks} "
          f"blocks, connector {params.connector.in_channels}->{params.connector.hidden_size}"
          + (", text_token_mapping" if params.text_token_mapping else ""))
    print("| weights | total GiB | transformer blocks GiB | everything else GiB |")
    print("|---|---|---|---|")
    for name, (compute, weight) in DTYPES.items():
        with torch.device("meta"):
            model = cast_model(Step1XEdit(params), compute, weight)
        blocks = rest = 0
        for key, p in model.named_parameters():
            size = p.numel() * p.element_size()
            if key.startswith(("double_blocks", "single_blocks")):
                blocks += size
            else:
                rest += size
        print(f"| {name} | {(blocks + rest) / 2**30:.2f} | {blocks / 2**30:.2f} | {rest / 2**30:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--real", action="store_true", help="the released 12B architecture (19 double + 38 single)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=512, help="connector width (4096 in the real model)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (reference and output)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtypes", default="fp32,bf16,fp8")
    ap.add_argument("--attention", default="", help="comma list; default: every installed backend")
    ap.add_argument("--sequential-cfg", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weights-only", action="store_true",
                    help="print the released model's resident weight memory per dtype (no compute, no memory)")
    ap.add_argument("--version", choices=VERSIONS, default="v1.1",
                    help="model version (v1.2 adds text_token_mapping and samples with the v1.2 rules)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.weights_only:
        weight_table(with_version(STEP1X_EDIT, args.version))
        return

    backends = args.attention.split(",") if args.attention else installed_backends()
    if args.device == "cpu":
        backends = [b for b in backends if b == "sdpa"] or ["sdpa"]
    shape = "real 3072x(19+38)" if args.real else f"hidden {args.hidden}, {args.double}+{args.single} blocks"
    tokens = (args.size // 16) ** 2
    text = ("400/380 text tokens; cond and uncond as separate calls" if args.version == "v1.2"
            else "640 text tokens; CFG batch 2")
    print(f"# Step1X-Edit {args.version}, device {args.device}, torch {torch.__version__}, {shape}, {args.size}px edit "
          f"({tokens} noisy + {tokens} reference + {text}), {args.steps} steps")
    print(f"| attention | weights | params (M) | weight MB | step s | {args.steps}-step denoise s | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for backend in backends:
        for dtype in args.dtypes.split(","):
            cfg = {**{k: getattr(args, k) for k in ("device", "real", "hidden", "heads", "double", "single", "size",
                                                    "steps", "threads", "sequential_cfg", "version")},
                   "text_hidden": args.text_hidden, "dtype": dtype, "attention": backend}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                reason = proc.stderr.strip().splitlines()[-1] if proc.stderr else "?"
                print(f"| {backend} | {dtype} | failed: {reason} |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {backend} | {dtype} | {r['params_m']:.0f} | {r['weights_mb']:.0f} | {r['step_s']:.2f} | "
                  f"{r['denoise_s']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()

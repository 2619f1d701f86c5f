"""The speed suite for a GPU: s/step, s/edit and peak memory of the released DiT shapes at 512, 768 and 1024 pixels
for bf16, fp8 storage, fp8 matmul, compiled blocks, TeaCache and RegionE, per attention backend; written as a
markdown table for the README.

    python benchmarks/gpu_suite.py --out gpu_suite.md                  # released shapes, v1.1 and v1.2 (a big GPU)
    python benchmarks/gpu_suite.py --versions v1.1 --sizes 1024 --modes bf16,fp8-matmul
    python benchmarks/gpu_suite.py --device cpu --tiny                 # every row on a tiny model, in seconds

Weights are random (std 0.02) at the released shapes: v1.1 (19 double + 38 single blocks, hidden 3072, connector
3584 -> 4096) and v1.2 (the same plus ``text_token_mapping``, sampled by the v1.2 rules: cond and uncond as separate
passes with their own text lengths). Speed does not depend on the weights; TeaCache's and RegionE's skipping does
a little, through the values. The edit is built like the RegionE fixtures (bench_regione.py): outside a rectangle the
noise points back at the reference, so RegionE finds an edited region of about 40% of the tokens.

Each row: a warm-up edit of 2 steps (it also compiles the compiled rows), then one timed edit of ``--steps``
steps. s/step is that edit's time over its steps; peak is the device's peak allocated memory during the timed
edit (CUDA), or "-" on other devices. A mode the device cannot run (fp8 matmul on a GPU older than Ada) gets its
error in the row instead of figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_regione import constructed_edit, text  # noqa: E402

from step1x.checkpoints.loading import cast_model  # noqa: E402
from step1x.models.attention import installed_backends, resolve  # noqa: E402
from step1x.models.compile import compile_blocks, uncompile_blocks  # noqa: E402
from step1x.models.configs import STEP1X_EDIT, TINY_DIT, with_version  # noqa: E402
from step1x.models.fp8_matmul import disable_fp8_matmul, enable_fp8_matmul  # noqa: E402
from step1x.models.model import Step1XEdit  # noqa: E402
from step1x.sampling.denoise import denoise  # noqa: E402
from step1x.sampling.regione import regione_denoise  # noqa: E402

MODES = ("bf16", "fp8-storage", "fp8-matmul", "compile", "teacache", "regione")
"""bf16 weights: plain, compiled blocks, TeaCache (0.2), RegionE (reference settings); then the block weights cast
to float8_e4m3fn: upcast per call (fp8-storage), fp8 matmuls."""
TEACACHE = 0.2
REAL = {"sizes": "512,768,1024", "steps": 28, "text": {"v1.1": (640, 640), "v1.2": (426, 413)}}
TINY = {"sizes": "64,96,128", "steps": 6, "text": {"v1.1": (24, 24), "v1.2": (20, 16)}}


def build(params, device: torch.device, dtype: torch.dtype) -> Step1XEdit:
    """A model of ``params`` with random weights made on ``device`` (no CPU copy of a 12B model)."""
    with torch.device("meta"):
        model = Step1XEdit(params)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.to(dtype).eval().requires_grad_(False)


class Rows:
    def __init__(self, device: torch.device):
        self.device = device
        self.lines: list[str] = []

    def add(self, *cells) -> None:
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        self.lines.append(line)
        print(line, flush=True)


def edit(model, version: str, size: int, steps: int, text_tokens: tuple[int, int], mode: str, device, dtype):
    grid = size // 16
    noise, reference = constructed_edit(grid)
    cond, uncond = text(*text_tokens, model.params.connector.in_channels, version)
    kw = dict(reference=reference, steps=steps, compute_dtype=dtype, device=device)
    with torch.no_grad():
        if mode == "regione":
            return regione_denoise(model, noise, cond, uncond, **kw)
        return denoise(model, noise, cond, uncond, teacache=TEACACHE if mode == "teacache" else 0.0, **kw)


def measure(model, version, size, args, spec, mode, device, dtype) -> tuple[float, float, str]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run = lambda steps: edit(model, version, size, steps, spec["text"][version], mode, device, dtype)  # noqa: E731
    run(2)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run(args.steps)
    sync()
    total = time.perf_counter() - t0
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "-"
    return total / args.steps, total, peak


def run_version(version: str, args, spec, rows: Rows, device, dtype) -> None:
    params = with_version(TINY_DIT if args.tiny else STEP1X_EDIT, version)
    model = build(params, device, dtype)
    modes = [m for m in MODES if m in args.modes]
    for weights in ("bf16", "fp8"):
        if weights == "fp8":
            if not {"fp8-storage", "fp8-matmul"} & set(modes):
                break
            cast_model(model, dtype, "fp8_e4m3fn")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for backend in args.attention:
            model.set_attention_backend(backend)
            ran = resolve(backend, device, dtype).name
            for mode in modes:
                if (mode in ("fp8-storage", "fp8-matmul")) != (weights == "fp8"):
                    continue
                for size in args.sizes:
                    try:
                        if mode == "fp8-matmul":
                            enable_fp8_matmul(model)
                        if mode == "compile":
                            compile_blocks(model, backend=args.compile_backend)
                        step, total, peak = measure(model, version, size, args, spec, mode, device, dtype)
                        rows.add(version, size, ran, mode, f"{step:.3f}", f"{total:.2f}", peak)
                    except Exception as exc:  # a row that cannot run on this device says why, the rest go on
                        rows.add(version, size, ran, mode, f"failed: {type(exc).__name__}: {exc}"[:200], "", "")
                    finally:
                        disable_fp8_matmul(model)
                        if mode == "compile":
                            uncompile_blocks(model)
                            torch._dynamo.reset()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and sizes: checks every row runs, in seconds")
    ap.add_argument("--versions", default="v1.1,v1.2")
    ap.add_argument("--sizes", help="comma list of image sides in pixels (default 512,768,1024; tiny 64,96,128)")
    ap.add_argument("--steps", type=int, help="steps of the timed edit (default 28; tiny 6)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    ap.add_argument("--attention", help="comma list of backends (default: sdpa and every installed one)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compile rows (eager: tracing only, for a quick check)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    spec = TINY if args.tiny else REAL
    args.sizes = [int(s) for s in (args.sizes or spec["sizes"]).split(",")]
    args.steps = args.steps or spec["steps"]
    args.modes = args.modes.split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    args.attention = args.attention.split(",") if args.attention else list(dict.fromkeys(["sdpa",
                                                                                         *installed_backends()]))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    shape = "tiny test model" if args.tiny else "released shapes (19 double + 38 single blocks, hidden 3072)"
    rows = Rows(device)
    rows.lines += [f"Device {name}, torch {torch.__version__}, {shape}, random weights, bf16 compute, "
                   f"{args.steps}-step edits (`python benchmarks/gpu_suite.py "
                   f"{' '.join(argv if argv is not None else sys.argv[1:])}`).", "",
                   "| version | size | attention | mode | s/step | s/edit | peak GiB |",
                   "|---|---|---|---|---|---|---|"]
    print("\n".join(rows.lines), flush=True)
    for version in args.versions.split(","):
        run_version(version, args, spec, rows, device, dtype)
    table = "\n".join(rows.lines) + "\n"
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    return table


if __name__ == "__main__":
    main()

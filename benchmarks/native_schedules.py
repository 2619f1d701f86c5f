"""How far ComfyUI's KSampler schedulers are from the official Step1X-Edit schedule, on the native MODEL.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python benchmarks/native_schedules.py
    ... --sizes 512x512 1024x1024 768x512 --steps 28 20 50

For every image size and step count it prints, per scheduler, the largest difference between KSampler's
sigmas and the official times (``step1x.sampling.denoise.get_schedule``), with the model sampling the native
loader sets after Step1X-Edit Model Sampling (the official shift for that size, a 720720-entry sigma table),
and, for comparison, with ComfyUI's FLUX model sampling (shift 1.15, 10000 entries). A scheduler that returns
a different number of sigmas is reported as such. Needs a ComfyUI checkout (no model weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "step1x_edit_pack"


def load_comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout and run this with its Python")
    sys.path.insert(0, path)
    sys.argv = sys.argv[:1] + ["--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


def load_pack():
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.nodes._native"), importlib.import_module(f"{PACK}.step1x.stepwise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "768x512"], help="WxH in pixels")
    parser.add_argument("--steps", nargs="+", type=int, default=[28, 20, 50])
    args = parser.parse_args()
    load_comfy()
    native, stepwise = load_pack()
    import comfy.model_sampling
    import comfy.samplers
    import torch

    class FluxSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    flux = FluxSampling()
    print("max |sigma - official t| per scheduler (euler, denoise 1.0)")
    print(f"{'size':>10} {'steps':>5} {'scheduler':>20} {'native MODEL':>14} {'FLUX sampling':>14}")
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        h, w = height // 8, width // 8
        sampling = native.Step1XModelSampling(stepwise.image_tokens(h, w))
        for steps in args.steps:
            official = stepwise.official_sigmas(steps, h, w)
            for name in comfy.samplers.SCHEDULER_NAMES:
                cells = []
                for ms in (sampling, flux):
                    sigmas = comfy.samplers.calculate_sigmas(ms, name, steps).float()
                    if sigmas.shape != official.shape:
                        cells.append(f"{len(sigmas) - 1} steps")
                    else:
                        cells.append(f"{(sigmas - official).abs().max().item():.2e}")
                print(f"{size:>10} {steps:>5} {name:>20} {cells[0]:>14} {cells[1]:>14}")
    torch.set_printoptions(precision=4)


if __name__ == "__main__":
    main()

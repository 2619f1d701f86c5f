"""``step1x edit``: check everything that can be checked without models, load once, run the jobs, report.

Exit codes: 0 all written, 1 some images failed (or the run was interrupted), 2 nothing could start
(bad arguments, prompts file, output folder or model files).
"""

from __future__ import annotations

import math
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from .batch import BatchReport, run_batch
from .checkpoints.loading import inspect_dit
from .checkpoints.lora import check_lora
from .geometry import check_dims
from .jobs import JobError, edit_jobs, prepare_output_dir, read_prompts, single_edit_job, t2i_jobs
from .models.attention import AttentionBackendError, select_backend
from .models.model import Step1XEdit
from .pipeline import EditOptions, Step1XPipeline, default_device, find_models
from .sampling.regione_rules import RegionEConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(ValueError):
    """Arguments that do not fit together."""


def parse_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} was asked for, but this PyTorch has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def options_from(args: Namespace) -> EditOptions:
    options = EditOptions(
        steps=args.steps, cfg_scale=args.cfg, renorm_threshold=args.renorm_threshold, seed=args.seed,
        size_level=args.size_level, negative_prompt=args.negative_prompt, strength=args.strength,
        resize_filter=args.resize_filter, restore_size=not args.no_restore_size, sequential_cfg=args.sequential_cfg,
        teacache=args.teacache,
    )
    if args.regione is not None:
        if args.t2i:
            raise UsageError("--regione speeds up edits of an input image; drop it for --t2i")
        options.regione = RegionEConfig(threshold=args.regione)
    options.validate()
    if options.size_level < 16:
        raise UsageError(f"--size-level {options.size_level} is too small; use at least 16 (512 or 1024 are typical)")
    return options


def plan_jobs(args: Namespace):
    """(jobs, input folder or None) for the arguments; raises JobError/UsageError."""
    if args.t2i:
        check_dims(args.width, args.height)
        if args.image or args.input_dir:
            raise UsageError("--t2i makes images from text alone; drop the input image / --input-dir")
        if args.prompts:
            return t2i_jobs(read_prompts(args.prompts), args.output_dir, args.format), None
        if args.prompt is None:
            raise UsageError("--t2i needs --prompt TEXT or --prompts FILE.json")
        return t2i_jobs({f"t2i_seed{args.seed}.png": args.prompt}, args.output_dir, args.format), None
    if args.input_dir:
        if args.image or args.prompt is not None:
            raise UsageError("give either IMAGE with --prompt, or --input-dir with --prompts, not both")
        if not args.prompts:
            raise UsageError('--input-dir needs --prompts FILE.json ({"image name": "instruction", ...})')
        return edit_jobs(args.input_dir, read_prompts(args.prompts), args.output_dir, args.format), args.input_dir
    if not args.image:
        raise UsageError("nothing to edit: give IMAGE --prompt TEXT, or --input-dir DIR --prompts FILE.json")
    if args.prompt is None:
        raise UsageError("IMAGE needs an instruction: --prompt TEXT")
    if args.prompts:
        raise UsageError("--prompts goes with --input-dir; for one image use --prompt")
    return [single_edit_job(args.image, args.prompt, args.output_dir, args.format)], None


def parse_lora(value: str) -> tuple[Path, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); a colon not followed by a number is part of the name."""
    name, colon, tail = value.rpartition(":")
    if colon and name:
        try:
            strength = float(tail)
        except ValueError:
            return Path(value), 1.0
        if not math.isfinite(strength):
            raise UsageError(f"--lora {value}: the strength must be a finite number, e.g. {name}:0.8")
        return Path(name), strength
    return Path(value), 1.0


def check_loras(values: list[str], dit: Path) -> list[tuple[Path, float]]:
    """Parse the ``--lora`` values and check each file against the DiT's layers, before any model loads."""
    loras = [parse_lora(v) for v in values]
    if loras:
        with torch.device("meta"):
            model = Step1XEdit(inspect_dit(dit).params)
        for (path, _), value in zip(loras, values, strict=True):
            try:
                check_lora(path, model)
            except ValueError as exc:
                raise UsageError(f"--lora {value}: {exc}") from None
    return loras


def pipeline_settings(args: Namespace) -> dict:
    """The keyword arguments of :meth:`Step1XPipeline.from_files` other than the files, checked (devices,
    attention backend) before any model loads."""
    return dict(
        device=parse_device(args.device), mllm_device=parse_device(args.mllm_device) if args.mllm_device else None,
        compute_dtype=DTYPES[args.dtype], mllm_dtype=DTYPES[args.mllm_dtype] if args.mllm_dtype else None,
        weight_dtype=args.weight_dtype, attention=select_backend(args.attention), offload=args.offload,
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_edit(args: Namespace) -> int:
    try:
        options = options_from(args)
        settings = pipeline_settings(args)
        jobs, input_dir = plan_jobs(args)
        paths = find_models(args.models, version=args.version, dit=args.dit, vae=args.vae, mllm=args.mllm,
                            tokenizer=args.tokenizer)
        loras = check_loras(args.lora, paths.dit)
        prepare_output_dir(args.output_dir, jobs, input_dir, overwrite=args.overwrite)
    except (UsageError, JobError, ValueError, OSError, AttentionBackendError) as exc:
        _say(f"error: {exc}")
        return 2
    missing = [j.name for j in jobs if j.source is not None and not j.source.is_file()]
    if missing and len(missing) == len(jobs):
        _say(f"error: none of the {len(jobs)} input images exists (first: {jobs[0].source})")
        return 2
    if missing:
        _say(f"warning: {len(missing)} of {len(jobs)} input images are missing and will fail: {', '.join(missing[:5])}"
             f"{' ...' if len(missing) > 5 else ''}")
    t0 = time.perf_counter()
    try:
        pipe = Step1XPipeline.from_files(paths.dit, paths.vae, paths.mllm, tokenizer_dir=paths.tokenizer, loras=loras,
                                         **settings)
    except (ValueError, OSError, RuntimeError) as exc:
        _say(f"error: {exc}")
        return 2
    report = BatchReport(load_seconds=time.perf_counter() - t0)
    _say(f"loaded Step1X-Edit {pipe.version} on {pipe.device} in {report.load_seconds:.1f} s; {len(jobs)} image(s)")
    try:
        run_batch(pipe, jobs, options, width=args.width, height=args.height, skip_existing=args.skip_existing,
                  progress=not args.quiet, report=report)
    except KeyboardInterrupt:
        report.interrupted = True
    print(report.summary(), flush=True)
    return 0 if report.ok else 1

"""``step1x edit``: check everything that can be checked without models, load once, run the jobs, report.

Exit codes: 0 all written, 1 some images failed (or the run was interrupted), 2 nothing could start
(bad arguments, prompts file, output folder, model files, or not one input image that can be edited).
"""

from __future__ import annotations

import math
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from .batch import BatchReport, JobResult, run_batch
from .checkpoints.gguf_file import is_gguf
from .checkpoints.loading import inspect_dit, vae_params
from .checkpoints.lora import check_lora
from .checkpoints.model_files import ModelPaths
from .cli import for_command_line
from .geometry import check_dims, upscale_note
from .image_io import load_image
from .jobs import Job, JobError, edit_jobs, prepare_output_dir, read_prompts, single_edit_job, t2i_jobs
from .models.attention import AttentionBackendError, select_backend
from .models.model import Step1XEdit
from .pipeline import EditOptions, Step1XPipeline, check_edit_image, check_instruction, default_device, find_models
from .pipeline_v12 import ReasoningOptions
from .sampling.regione_rules import RegionEConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


NOTES_SHOWN = 3


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
        teacache=args.teacache, init_image=load_image(args.init_image) if args.init_image else None,
    )
    if args.regione is not None:
        if args.t2i:
            raise UsageError("--regione speeds up edits of an input image; drop it for --t2i")
        options.regione = RegionEConfig(threshold=args.regione)
    options.validate()
    if options.size_level is not None and options.size_level < 16:
        raise UsageError(f"--size-level {options.size_level} is too small; use at least 16 (512 or 1024 are typical)")
    if args.init_image and options.strength >= 1.0:
        _say(f"warning: --init-image {args.init_image} has no effect at --strength 1; give --strength below 1 "
             "(for example 0.7) to start from it")
    return options


def plan_jobs(args: Namespace):
    """(jobs, input folder or None) for the arguments; raises JobError/UsageError."""
    if args.t2i:
        check_dims(args.width, args.height, "Use multiples of 16 for --width and --height, e.g. --width 1024 "
                   "--height 768.")
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


def reasoning_from(args: Namespace, dit_version: str) -> ReasoningOptions | None:
    """The ``--think``/``--reflect`` settings, checked against the DiT's version and the other arguments before any
    model loads; None for a plain edit."""
    if not (args.think or args.reflect):
        return None
    flags = " and ".join(f for f, on in (("--think", args.think), ("--reflect", args.reflect)) if on)
    if dit_version != "v1.2":
        raise UsageError(f"{flags}: thinking and reflection are Step1X-Edit v1.2 features, but the DiT is "
                         f"{dit_version}; use the v1.2 model folder (--models with Step1X-Edit-v1p2, or "
                         "--version v1.2)")
    if args.t2i:
        raise UsageError(f"{flags} edit an image; they do not apply to --t2i")
    if args.no_restore_size:
        raise UsageError(f"{flags}: every try is compared with the input at its size, so --no-restore-size cannot be "
                         "used with them")
    reasoning = ReasoningOptions(think=args.think, reflect=args.reflect, max_tries=args.max_tries)
    try:
        reasoning.validate()
    except ValueError as exc:
        raise UsageError(f"--max-tries {args.max_tries}: {exc}") from None
    return reasoning


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


def check_fp8_matmul(args: Namespace, dit) -> None:
    """``--fp8-matmul`` needs float8_e4m3fn block weights: refused before any model loads when the DiT file and
    ``--weight-dtype`` cannot give them."""
    if not args.fp8_matmul or args.weight_dtype == "fp8_e4m3fn":
        return
    stored = inspect_dit(dit).stored_dtype
    if args.weight_dtype == "default" and is_gguf(dit):
        raise UsageError(f"--fp8-matmul multiplies float8_e4m3fn block weights; {Path(dit).name} keeps its blocks "
                         "GGUF-quantised. Add --weight-dtype fp8_e4m3fn, use an fp8 file, or drop --fp8-matmul.")
    if args.weight_dtype == "default" and stored == getattr(torch, "float8_e4m3fn", None):
        return
    kept = str(stored).replace("torch.", "") if args.weight_dtype == "default" else args.weight_dtype
    raise UsageError(f"--fp8-matmul multiplies float8_e4m3fn block weights; with --weight-dtype {args.weight_dtype} "
                     f"the blocks of {Path(dit).name} are kept in {kept}. Add --weight-dtype fp8_e4m3fn, or drop "
                     "--fp8-matmul.")


def pipeline_settings(args: Namespace) -> dict:
    """The keyword arguments of :meth:`Step1XPipeline.from_files` other than the files, checked (devices,
    attention backend) before any model loads."""
    return dict(
        device=parse_device(args.device), mllm_device=parse_device(args.mllm_device) if args.mllm_device else None,
        compute_dtype=DTYPES[args.dtype], mllm_dtype=DTYPES[args.mllm_dtype] if args.mllm_dtype else None,
        weight_dtype=args.weight_dtype, attention=select_backend(args.attention), offload=args.offload,
        generation=bool(args.think or args.reflect), mllm_fp8=args.mllm_fp8, fp8_matmul=args.fp8_matmul,
        compile=args.compile,
    )


def check_model_files(paths: ModelPaths, *, generation: bool = False) -> ModelPaths:
    """The VAE, the MLLM and its tokenizer checked from their headers, configs and tokenizer files, as the DiT
    already is (each a file, or a diffusers-layout model folder or its part): a wrong file stops the run before
    anything loads or is written. With ``generation`` the MLLM must also have its language-model head. Returns
    the paths with the tokenizer folder filled in."""
    from .encoder.loader import check_text_encoder
    from .encoder.tokens import TokenizerError

    vae_params(paths.vae)
    try:
        tokenizer = check_text_encoder(paths.mllm, tokenizer_dir=paths.tokenizer, generation=generation)
    except TokenizerError:
        if paths.tokenizer is not None:
            raise
        raise UsageError(
            f"no Qwen2.5 tokenizer for {paths.mllm}: pass --tokenizer DIR, a folder with tokenizer.json or "
            "vocab.json + merges.txt (the Qwen2.5-VL-7B-Instruct folder, or ComfyUI's "
            "comfy/text_encoders/qwen25_tokenizer)"
        ) from None
    return ModelPaths(paths.dit, paths.vae, paths.mllm, tokenizer)


def check_jobs(jobs: list[Job], options: EditOptions, version: str = "v1.1") -> tuple[list[JobResult], list[str]]:
    """Every job's input checked before the models load, by the rules of the DiT's ``version``: the image is read
    whole (missing, unreadable, NaN/Inf pixels), its size checked against size_level, the instruction checked for
    reserved placeholders. Returns (a failed result per job that cannot run, notes to show)."""
    failed, notes = [], []
    size_level = options.level(version)
    for job in jobs:
        try:
            check_instruction(job.prompt, "prompt" if job.source is None else "instruction", version)
            if job.source is not None:
                image = load_image(job.source)
                check_edit_image(image.width, image.height, size_level, version)
                note = upscale_note(image.width, image.height, size_level)
                if note:
                    notes.append(f"{job.name}: {note} Press Ctrl-C to stop; images finished by then are kept.")
        except ValueError as exc:
            failed.append(JobResult(job, "failed", error=str(exc)))
            continue
        if not job.prompt.strip():
            notes.append(f"{job.name}: the instruction is empty, so the result follows no text")
    return failed, notes


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _show_notes(notes: list[str]) -> None:
    for note in notes[:NOTES_SHOWN]:
        _say(f"warning: {note}")
    if len(notes) > NOTES_SHOWN:
        _say(f"warning: ... and {len(notes) - NOTES_SHOWN} more like these")


def run_edit(args: Namespace) -> int:
    try:
        options = options_from(args)
        settings = pipeline_settings(args)
        jobs, input_dir = plan_jobs(args)
        paths = find_models(args.models, version=args.version, dit=args.dit, vae=args.vae, mllm=args.mllm,
                            tokenizer=args.tokenizer)
        version = inspect_dit(paths.dit).version
        if options.negative_prompt is not None:
            check_instruction(options.negative_prompt, "negative prompt", version)
        reasoning = reasoning_from(args, version)
        loras = check_loras(args.lora, paths.dit)
        check_fp8_matmul(args, paths.dit)
        paths = check_model_files(paths, generation=reasoning is not None and reasoning.uses_model)
        prepare_output_dir(args.output_dir, jobs, input_dir, overwrite=args.overwrite)
    except (UsageError, JobError, ValueError, OSError, AttentionBackendError) as exc:
        _say(f"error: {for_command_line(str(exc))}")
        return 2
    report = BatchReport()
    if args.skip_existing:
        report.results += [JobResult(j, "skipped") for j in jobs if j.output.exists()]
        jobs = [j for j in jobs if not j.output.exists()]
        if not jobs:
            print(report.summary() + "; nothing to do, no model loaded", flush=True)
            return 0
    failed, notes = check_jobs(jobs, options, version)
    if len(failed) == len(jobs):
        if len(jobs) == 1:
            _say(f"error: {failed[0].error}")
        else:
            _say(f"error: none of the {len(jobs)} images can be edited:")
            for result in failed:
                _say(f"  {result.job.name}: {result.error}")
        return 2
    _show_notes(notes)
    if failed:
        _say(f"warning: {len(failed)} of {len(jobs)} images cannot be edited and are left out "
             "(the reasons follow in the summary)")
        report.results += failed
        jobs = [j for j in jobs if j not in {r.job for r in failed}]
    t0 = time.perf_counter()
    try:
        pipe = Step1XPipeline.from_files(paths.dit, paths.vae, paths.mllm, tokenizer_dir=paths.tokenizer, loras=loras,
                                         **settings)
    except (ValueError, OSError, RuntimeError) as exc:
        _say(f"error: {for_command_line(str(exc))}")
        return 2
    report.load_seconds = time.perf_counter() - t0
    _say(f"loaded Step1X-Edit {pipe.version} on {pipe.device} in {report.load_seconds:.1f} s; {len(jobs)} image(s)")
    try:
        run_batch(pipe, jobs, options, width=args.width, height=args.height, progress=not args.quiet, report=report,
                  reasoning=reasoning, save_tries=args.save_tries)
    except KeyboardInterrupt:
        report.interrupted = True
    print(report.summary(), flush=True)
    return 0 if report.ok else 1

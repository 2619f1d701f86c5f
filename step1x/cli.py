"""Command line: ``python -m step1x {edit,selftest,download,quantize}`` (also installed as ``step1x-edit``, where the
command may be left out: ``step1x-edit photo.png -p TEXT -o out`` is ``step1x-edit edit photo.png ...``)."""

from __future__ import annotations

import argparse
import sys

from .checkpoints.loading import WEIGHT_DTYPES
from .models.attention import backend_names

DTYPE_CHOICES = ("bf16", "fp16", "fp32")
DOWNLOAD_MODELS = ("v1.1", "v1.0", "all", "v1.2", "v1.1-diffusers")
COMMANDS = ("edit", "selftest", "download", "quantize")
FLAG_NAMES = {"tokenizer_dir=": "--tokenizer ", "tokenizer_dir": "--tokenizer"}
"""Library argument names as the command line spells them, for messages that come from the library."""


def for_command_line(message: str) -> str:
    """A library message with its argument names replaced by the command-line flags."""
    for name, flag in FLAG_NAMES.items():
        message = message.replace(name, flag)
    return message


class _ShowDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _edit_parser(sub) -> None:
    p = sub.add_parser(
        "edit", help="edit images (one, or a folder with a prompts JSON) or generate from text (the default command)",
        description="Edit one image (IMAGE --prompt TEXT) or a folder (--input-dir DIR --prompts FILE.json, the "
                    'official format {"image name": "instruction"}), or generate from text (--t2i). Results are '
                    "written to --output-dir under the input's file name. 'edit' may be left out: "
                    "step1x-edit photo.png -p TEXT -o out.",
        formatter_class=_ShowDefaults,
    )
    p.add_argument("image", nargs="?", help="image to edit")
    p.add_argument("-p", "--prompt", help="the editing instruction (or the text-to-image prompt)")
    p.add_argument("--input-dir", help="folder of images named in --prompts")
    p.add_argument("--prompts", help='JSON file {"image name": "instruction", ...}')
    p.add_argument("-o", "--output-dir", required=True, help="folder for the results (created if needed)")
    p.add_argument("--format", choices=("png", "jpg", "webp"), help="output format (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into the input folder")
    p.add_argument("--skip-existing", action="store_true", help="skip images whose output already exists")
    p.add_argument("--t2i", action="store_true", help="text-to-image (v1.1): no input image")
    p.add_argument("--width", type=int, default=1024, help="text-to-image width, a multiple of 16")
    p.add_argument("--height", type=int, default=1024, help="text-to-image height, a multiple of 16")

    m = p.add_argument_group("models")
    m.add_argument("--models", help="folder with the model files (standalone or ComfyUI layout)")
    m.add_argument("--dit", help="Step1X-Edit DiT .safetensors or diffusers-layout model folder (overrides --models)")
    m.add_argument("--vae", help="VAE .safetensors or model folder (overrides --models)")
    m.add_argument("--mllm", help="Qwen2.5-VL-7B-Instruct folder, ComfyUI text encoder file, or model folder "
                                  "(its text_encoder/)")
    m.add_argument("--tokenizer", help="Qwen2.5 tokenizer folder, when --mllm is a single file")
    m.add_argument("--version", choices=("v1.0", "v1.1", "v1.2"), help="which DiT to pick from --models (default: "
                   "the newest present); the version of the file or folder itself is read from its weights")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA for the DiT, at strength 1.0 unless given (e.g. hands.safetensors:0.8); repeatable")

    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=28, help="denoising steps")
    s.add_argument("--cfg", type=float, default=6.0, help="guidance scale")
    s.add_argument("--seed", type=int, default=42, help="noise seed from 0 to 2**64 - 1, the same for every image")
    s.add_argument("--size-level", type=int, default=None,
                   help="edit at about this many pixels squared; a v1.2 DiT takes 1024, as its reference, unless "
                        "this is given (default: 512)")
    s.add_argument("--negative-prompt", help='default: "" for edits, the official negative prompt for --t2i')
    s.add_argument("--renorm-threshold", type=float, default=0.93,
                   help="renormalise the guidance while t is above this; 1.0 turns it off")
    s.add_argument("--strength", type=float, default=1.0,
                   help="img2img strength: below 1 starts part way from the input (or --init-image); 0 returns it")
    s.add_argument("--init-image", metavar="FILE",
                   help="img2img start point other than the input image, used with --strength below 1 (resized "
                        "to the working size)")
    s.add_argument("--resize-filter", choices=("lanczos", "bicubic", "bilinear", "nearest"), default="lanczos",
                   help="filter of the size_level resize")
    s.add_argument("--no-restore-size", action="store_true", help="keep the working size instead of the input's")
    s.add_argument("--sequential-cfg", action="store_true", help="run the two guidance passes one after the other")
    s.add_argument("--teacache", type=float, default=0.0, metavar="THRESHOLD",
                   help="skip the DiT blocks on steps that barely change (official TeaCache; 0.2 is its default, "
                        "0 is off): faster, slightly different results")
    s.add_argument("--regione", type=float, nargs="?", const=0.88, metavar="THRESHOLD",
                   help="RegionE: after the warm-up compute only the region the edit changes (about 2.5x less DiT "
                        "work, slightly different results; edits only, not with --teacache). THRESHOLD: a token is "
                        "edited when its estimate's similarity to the input is at most this (0.88)")

    r = p.add_argument_group("reasoning (Step1X-Edit v1.2)")
    r.add_argument("--think", action="store_true",
                   help="let the v1.2 text encoder rewrite the instruction first (one model reply)")
    r.add_argument("--reflect", action="store_true",
                   help="let it judge each result and retry (five replies per try) up to --max-tries edits")
    r.add_argument("--max-tries", type=int, default=3, help="edits at most with --reflect, as the reference")
    r.add_argument("--save-tries", action="store_true",
                   help="also write every try's image (NAME_tryN) and the model's reasoning (NAME_reasoning.txt)")

    h = p.add_argument_group("hardware")
    h.add_argument("--device", default="auto", help="device for the DiT and VAE: auto, cuda, cuda:1, cpu, mps")
    h.add_argument("--mllm-device", help="device for the MLLM (default: same as --device)")
    h.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="compute dtype")
    h.add_argument("--mllm-dtype", choices=DTYPE_CHOICES, help="MLLM dtype (default: --dtype)")
    h.add_argument("--mllm-fp8", action="store_true",
                   help="keep the MLLM's block weights in fp8 (about half the memory of bf16)")
    h.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="default",
                   help="storage of the DiT block weights; fp8_e4m3fn halves their memory")
    h.add_argument("--attention", choices=backend_names(), default="auto",
                   help="attention backend; an uninstalled one fails with an install hint")
    h.add_argument("--offload", action="store_true", help="keep each model on the CPU until its stage runs")
    h.add_argument("--fp8-matmul", action="store_true",
                   help="multiply the DiT's fp8 block weights in fp8 (needs fp8_e4m3fn block weights: an fp8 file or "
                        "--weight-dtype fp8_e4m3fn, and a GPU with fp8 units: Ada, Hopper)")
    h.add_argument("--compile", action="store_true",
                   help="torch.compile each DiT block: the first step of each image size waits for the compiler")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _selftest_parser(sub) -> None:
    p = sub.add_parser("selftest", help="check the install with tiny random models (offline, CPU, seconds)",
                       description="Build tiny random models and run a full edit through the real loaders and "
                                   "sampler. Needs no download and no GPU.")
    p.add_argument("--tokenizer", help="folder with the real Qwen2.5 tokenizer files (optional)")
    p.add_argument("--keep", help="build in this folder and keep the models and the image")
    p.add_argument("--output", help="also copy the result image to this file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    p.add_argument("--version", choices=("v1.1", "v1.2"), default="v1.1",
                   help="v1.1: the official single files; v1.2: a diffusers-layout model folder, plain and "
                        "reasoning (thinking + reflection) edits with scripted replies")


def _download_parser(sub) -> None:
    p = sub.add_parser("download", help="fetch the official weights from Hugging Face",
                       description="Download the Step1X-Edit DiT, its VAE and Qwen2.5-VL-7B-Instruct into ComfyUI's "
                                   "model folders (--comfyui) or one folder (--dest); or a diffusers-layout model "
                                   "(--model v1.2, v1.1-diffusers) as one model folder. Resumable: run it again "
                                   "after an interruption.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--comfyui", help="ComfyUI folder: files go to models/diffusion_models, models/vae, "
                                         "models/text_encoders")
    where.add_argument("--dest", help="one folder in the official layout (for --models)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", choices=DOWNLOAD_MODELS,
                       help="which model (v1.1): v1.1/v1.0/all as single files; v1.2 or v1.1-diffusers as a "
                            "diffusers-layout model folder with its own VAE and text encoder")
    which.add_argument("--version", choices=("v1.1", "v1.0", "all"), help="the single-file DiT (same as --model)")
    p.add_argument("--skip-mllm", action="store_true",
                   help="leave out Qwen2.5-VL-7B-Instruct (e.g. when ComfyUI already has qwen_2.5_vl_7b); with "
                        "v1.1-diffusers the folder's text_encoder/ (the same model); not with v1.2, which needs "
                        "its own")
    p.add_argument("--plan", action="store_true", help="only show where each file would go")


def _quantize_parser(sub) -> None:
    from .checkpoints.gguf_convert import CONVERT_TYPES, LOAD_ONLY_TYPES

    p = sub.add_parser("quantize", help="write the DiT as a GGUF file (Q8_0 ... Q4_0) for GPUs with less memory",
                       description="Quantise the Step1X-Edit DiT (.safetensors) into a GGUF file that the DiT loaders "
                                   "(and ComfyUI-GGUF's file conventions) read. The Linear weights of the transformer "
                                   "blocks get --type; 1-D and small tensors stay F32; the embedders, final layer and "
                                   f"connector keep the source precision. {', '.join(LOAD_ONLY_TYPES)} files load but "
                                   "are made with llama.cpp's quantizer, not here.")
    p.add_argument("input", help="the Step1X-Edit DiT .safetensors (bf16, fp16, fp32 or fp8)")
    p.add_argument("output", help="the .gguf file to write (written to a temporary file, renamed when complete)")
    p.add_argument("--type", choices=CONVERT_TYPES, default="Q8_0", dest="qtype",
                   help="storage of the block weights (resident DiT: Q8_0 12.8 GiB, Q5_1 9.4, Q4_1 8.0, Q4_0 7.3)")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="step1x", description="Step1X-Edit without the UI. Without a command, the arguments are those of "
                                   "'edit': step1x-edit photo.png -p TEXT -o out is step1x-edit edit photo.png ...")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{edit,selftest,download,quantize}")
    _edit_parser(sub)
    _selftest_parser(sub)
    _download_parser(sub)
    _quantize_parser(sub)
    return parser


def _selftest(args) -> int:
    from .selftest import run_selftest

    result = run_selftest(tokenizer=args.tokenizer, keep=args.keep, output=args.output, device=args.device,
                          version=args.version, say=lambda text: print(text, flush=True))
    print(for_command_line(result.report()))
    return 0 if result.ok else 1


def _download(args) -> int:
    from .checkpoints.model_files import COMFY_MLLM_FILES, MODEL_FOLDERS
    from .download import DownloadError, HubUnavailable, describe_plan, download, manual_instructions, plan_download

    model = args.model or args.version or "v1.1"
    folders = (model,) if model in MODEL_FOLDERS else ()
    versions = () if folders else ("v1.1", "v1.0") if model == "all" else (model,)
    try:
        plan = plan_download(comfyui=args.comfyui, dest=args.dest, versions=versions, mllm=not args.skip_mllm,
                             folders=folders)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    existing = [f.target.parent / name for f in plan.files if f.kind == "mllm" for name in COMFY_MLLM_FILES
                if (f.target.parent / name).is_file()]
    if existing:
        print(f"note: {existing[0]} is already there and works as the MLLM; add --skip-mllm to save 16.6 GB")
    if args.plan:
        print(describe_plan(plan))
        return 0
    try:
        download(plan)
    except HubUnavailable as exc:
        print(manual_instructions(plan, str(exc)), file=sys.stderr)
        return 1
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"all files in place under {plan.root}")
    return 0


def _quantize(args) -> int:
    from .checkpoints.gguf_convert import convert
    from .checkpoints.safetensors_file import CheckpointError

    try:
        written = convert(args.input, args.output, args.qtype, overwrite=args.force, progress=not args.quiet)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    print(written.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "edit")
    args = build_parser().parse_args(argv)
    if args.command == "edit":
        from .edit_command import run_edit

        return run_edit(args)
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "quantize":
        return _quantize(args)
    return _download(args)


if __name__ == "__main__":
    sys.exit(main())

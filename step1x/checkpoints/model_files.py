"""Where the model files live: the official names, the two folder layouts, and finding them in a folder.

Two layouts are understood:

* standalone (the official ``--model_path`` layout)::

      MODELS/step1x-edit-v1p1-official.safetensors   (or step1x-edit-i1258.safetensors for v1.0)
      MODELS/vae.safetensors
      MODELS/Qwen2.5-VL-7B-Instruct/

* ComfyUI (the ComfyUI folder or its ``models`` folder)::

      models/diffusion_models/step1x-edit-v1p1-official.safetensors
      models/vae/step1x-edit-vae.safetensors         (``vae.safetensors`` of stepfun-ai/Step1X-Edit, renamed)
      models/text_encoders/Qwen2.5-VL-7B-Instruct/   (or ComfyUI's qwen_2.5_vl_7b*.safetensors)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DIT_REPO = "stepfun-ai/Step1X-Edit"
MLLM_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"

DIT_FILES = {"v1.1": "step1x-edit-v1p1-official.safetensors", "v1.0": "step1x-edit-i1258.safetensors"}
"""Official DiT file per version, newest first."""
VAE_FILE = "vae.safetensors"
COMFY_VAE_FILE = "step1x-edit-vae.safetensors"
"""In ComfyUI's shared ``models/vae`` folder the generic name ``vae.safetensors`` would clash with other models."""
MLLM_FOLDER = "Qwen2.5-VL-7B-Instruct"
COMFY_MLLM_FILES = ("qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors")

COMFY_DIRS = {"dit": ("diffusion_models", "unet"), "vae": ("vae",), "mllm": ("text_encoders", "clip")}
COMFY_TOKENIZER = Path("comfy") / "text_encoders" / "qwen25_tokenizer"


class ModelFilesError(FileNotFoundError):
    """A models folder (or a file given by path) that does not hold what the editor needs."""


@dataclass(frozen=True)
class ModelPaths:
    dit: Path
    vae: Path
    mllm: Path
    tokenizer: Path | None = None
    """Only needed when ``mllm`` is a single file without tokenizer files beside it."""


def is_comfyui_root(folder: Path) -> bool:
    return (folder / "models").is_dir() and (folder / "comfy").is_dir()


def _model_dirs(folder: Path) -> dict[str, list[Path]]:
    """Folders to search per model kind, the standalone layout first."""
    models = folder / "models" if (folder / "models").is_dir() else folder
    dirs = {kind: [folder] for kind in COMFY_DIRS}
    for kind, names in COMFY_DIRS.items():
        dirs[kind] += [models / name for name in names if (models / name).is_dir()]
    return dirs


def _find_dit(dirs: list[Path], version: str | None) -> Path | None:
    versions = [version] if version else list(DIT_FILES)
    for v in versions:
        for d in dirs:
            if (d / DIT_FILES[v]).is_file():
                return d / DIT_FILES[v]
    if version:
        return None
    others = sorted({p for d in dirs for p in d.glob("*step1x*edit*.safetensors") if "vae" not in p.name.lower()})
    if len(others) > 1:
        names = ", ".join(p.name for p in others)
        raise ModelFilesError(f"several Step1X-Edit DiT files found ({names}); choose one with --dit")
    return others[0] if others else None


def _find_vae(dirs: list[Path]) -> Path | None:
    standalone, comfy = dirs[0], dirs[1:]
    candidates = [standalone / VAE_FILE] + [d / n for d in comfy for n in (COMFY_VAE_FILE, VAE_FILE)]
    return next((p for p in candidates if p.is_file()), None)


def _find_mllm(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if (d / MLLM_FOLDER).is_dir():
            return d / MLLM_FOLDER
        for name in COMFY_MLLM_FILES:
            if (d / name).is_file():
                return d / name
    return None


def comfy_tokenizer(folder: Path) -> Path | None:
    """ComfyUI's bundled Qwen2.5 tokenizer, when ``folder`` is inside a ComfyUI install."""
    for parent in [folder, *folder.parents]:
        if (parent / COMFY_TOKENIZER).is_dir():
            return parent / COMFY_TOKENIZER
    return None


def expected_layout(folder: str | os.PathLike, version: str = "v1.1") -> str:
    folder = Path(folder)
    return (
        f"  {folder / DIT_FILES[version]}\n  {folder / VAE_FILE}\n  {folder / MLLM_FOLDER}/\n"
        f"or the ComfyUI folders models/diffusion_models, models/vae ({COMFY_VAE_FILE}), "
        f"models/text_encoders ({MLLM_FOLDER}/ or {COMFY_MLLM_FILES[0]})"
    )


def resolve_models(
    folder: str | os.PathLike | None = None,
    *,
    version: str | None = None,
    dit: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    mllm: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> ModelPaths:
    """The three model paths from a models folder, each overridable by an explicit path.

    ``version`` ("v1.0"/"v1.1") picks the official DiT file when both are present; without it v1.1 is
    preferred. Raises :class:`ModelFilesError` naming every missing piece and where it was looked for."""
    if version is not None and version not in DIT_FILES:
        raise ValueError(f"unknown version {version!r}; choose one of {sorted(DIT_FILES)}")
    found: dict[str, Path | None] = {"dit": None, "vae": None, "mllm": None}
    root = None
    if folder is not None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ModelFilesError(f"models folder not found: {root}")
        dirs = _model_dirs(root)
        if dit is None:
            found["dit"] = _find_dit(dirs["dit"], version)
        if vae is None:
            found["vae"] = _find_vae(dirs["vae"])
        if mllm is None:
            found["mllm"] = _find_mllm(dirs["mllm"])
    for kind, given in (("dit", dit), ("vae", vae), ("mllm", mllm)):
        if given is not None:
            path = Path(given).expanduser()
            if not path.exists():
                raise ModelFilesError(f"--{kind} {path} does not exist")
            found[kind] = path
    missing = [kind for kind, path in found.items() if path is None]
    if missing:
        what = {"dit": f"the DiT ({' or '.join(DIT_FILES[v] for v in ([version] if version else DIT_FILES))})",
                "vae": f"the VAE ({VAE_FILE})", "mllm": f"the MLLM ({MLLM_FOLDER}/)"}
        where = f"in {root}" if root else "(no --models folder given)"
        raise ModelFilesError(
            f"missing {', '.join(what[k] for k in missing)} {where}. Expected\n"
            f"{expected_layout(root or Path('MODELS'), version or 'v1.1')}\n"
            "Download them with `python -m step1x download`, or give each file with --dit/--vae/--mllm."
        )
    token_dir = Path(tokenizer).expanduser() if tokenizer is not None else None
    if token_dir is None and found["mllm"].is_file():
        token_dir = comfy_tokenizer(found["mllm"].resolve().parent)
    return ModelPaths(found["dit"], found["vae"], found["mllm"], token_dir)

"""Where the model files live: the official names, the two folder layouts, and finding them in a folder.

Two layouts are understood:

* standalone (the official ``--model_path`` layout)::

      MODELS/step1x-edit-v1p1-official.safetensors   (or step1x-edit-i1258.safetensors for v1.0)
      MODELS/vae.safetensors
      MODELS/Qwen2.5-VL-7B-Instruct/
      MODELS/Step1X-Edit-v1p2/                       (a diffusers-layout model folder, any name)

* ComfyUI (the ComfyUI folder or its ``models`` folder)::

      models/diffusion_models/step1x-edit-v1p1-official.safetensors
      models/diffusion_models/Step1X-Edit-v1p2/      (the whole model folder)
      models/vae/step1x-edit-vae.safetensors         (``vae.safetensors`` of stepfun-ai/Step1X-Edit, renamed)
      models/text_encoders/Qwen2.5-VL-7B-Instruct/   (or ComfyUI's qwen_2.5_vl_7b*.safetensors)

A diffusers-layout model folder (Step1X-Edit-v1p2, Step1X-Edit-v1p1-diffusers) is recognised by its
``transformer/`` folder; its ``vae/`` and ``text_encoder/`` (with ``processor/`` or ``tokenizer/``) are then
used as the VAE and the MLLM. Its version is read from the weights, never from its name. v1.2 needs its own
text encoder: a v1.2 folder without ``text_encoder/`` is completed by a model folder of the same name in the
text encoder folders (``models/text_encoders/Step1X-Edit-v1p2/text_encoder/``), else it is an error; a
v1.1-diffusers folder without one uses the Qwen2.5-VL-7B-Instruct found as usual. Without ``version`` the newest
DiT found is taken (v1.2, then v1.1 with the official file before a diffusers folder, then v1.0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DIT_REPO = "stepfun-ai/Step1X-Edit"
MLLM_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
MODEL_FOLDERS = {"v1.2": ("stepfun-ai/Step1X-Edit-v1p2", "Step1X-Edit-v1p2"),
                 "v1.1-diffusers": ("stepfun-ai/Step1X-Edit-v1p1-diffusers", "Step1X-Edit-v1p1-diffusers")}
"""Diffusers-layout models: (Hugging Face repository, folder name the downloader uses)."""
TRANSFORMER_DIR, VAE_DIR, TEXT_ENCODER_DIR = "transformer", "vae", "text_encoder"
VERSIONS = ("v1.0", "v1.1", "v1.2")
"""Oldest first."""

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


def is_model_folder(path: Path) -> bool:
    """A diffusers-layout model folder: one with a ``transformer/`` folder."""
    return path.is_dir() and (path / TRANSFORMER_DIR).is_dir()


def model_folders(dirs: list[Path]) -> list[Path]:
    """The diffusers-layout model folders among ``dirs`` and their sub-folders (hidden ones skipped)."""
    found = []
    for d in dirs:
        if is_model_folder(d):
            found.append(d)
        elif d.is_dir():
            found += sorted(p for p in d.iterdir() if not p.name.startswith(".") and is_model_folder(p))
    return list(dict.fromkeys(found))


def dit_version(path: Path) -> str:
    """The Step1X-Edit version of a DiT file or model folder, from its weights (headers only)."""
    from .loading import inspect_dit

    return inspect_dit(path).version


def _find_dit(dirs: list[Path], version: str | None) -> Path | None:
    names = [version] if version in DIT_FILES else [] if version else list(DIT_FILES)
    official = [d / DIT_FILES[v] for v in names for d in dirs if (d / DIT_FILES[v]).is_file()]
    if official and version:
        return official[0]
    folders = model_folders(dirs)
    if folders:
        versions = {p: dit_version(p) for p in official + folders}
        wanted = version or max(versions.values(), key=VERSIONS.index)
        pool = [p for p in official + folders if versions[p] == wanted]
        chosen = [p for p in pool if p in folders]
        if pool and pool[0] in official:
            return pool[0]
        if len(chosen) > 1:
            raise ModelFilesError(f"several Step1X-Edit {wanted} model folders found "
                                  f"({', '.join(map(str, chosen))}); choose one with --dit")
        return chosen[0] if chosen else None
    if version:
        return None
    if official:
        return official[0]
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
    if version == "v1.2":
        return (f"  {folder / MODEL_FOLDERS['v1.2'][1]}/ (transformer/, vae/, text_encoder/, processor/)\n"
                f"or in ComfyUI models/diffusion_models/{MODEL_FOLDERS['v1.2'][1]}/")
    return (
        f"  {folder / DIT_FILES[version]}\n  {folder / VAE_FILE}\n  {folder / MLLM_FOLDER}/\n"
        f"or the ComfyUI folders models/diffusion_models, models/vae ({COMFY_VAE_FILE}), "
        f"models/text_encoders ({MLLM_FOLDER}/ or {COMFY_MLLM_FILES[0]}); "
        "or a diffusers-layout model folder (transformer/, vae/, text_encoder/)"
    )


def dit_version_beside(path: str | os.PathLike) -> str | None:
    """The version of the transformer in the model folder a text encoder comes from (``path``: the model folder
    or its ``text_encoder/``), read from the transformer's weights; None when there is no such transformer."""
    path = Path(path)
    root = path.parent if path.name == TEXT_ENCODER_DIR else path
    if not is_model_folder(root):
        return None
    return dit_version(root)


def model_root(path: Path) -> Path | None:
    """The diffusers-layout model folder ``path`` is, or whose ``transformer/`` (or a file in it) it is."""
    for candidate in (path, path.parent, path.parent.parent):
        if is_model_folder(candidate) and (candidate == path or path.is_relative_to(candidate / TRANSFORMER_DIR)):
            return candidate
    return None


def _folder_text_encoder(root: Path, mllm_dirs: list[Path]) -> Path | None:
    """The text encoder that goes with the model folder ``root``: its own ``text_encoder/``, or that of a model
    folder of the same name among the text encoder folders; for v1.2 nothing else will do."""
    if (root / TEXT_ENCODER_DIR).is_dir():
        return root
    for d in mllm_dirs:
        if (d / root.name / TEXT_ENCODER_DIR).is_dir():
            return d / root.name
    if dit_version(root) == "v1.2":
        raise ModelFilesError(
            f"{root} is a Step1X-Edit v1.2 model folder without {TEXT_ENCODER_DIR}/. v1.2 uses its own fine-tuned "
            f"Qwen2.5-VL, which the model folder ships in {TEXT_ENCODER_DIR}/ (with processor/); the stock "
            "Qwen2.5-VL-7B-Instruct is not a substitute. Download the complete folder (`python -m step1x download "
            f"--model v1.2`) or give that text encoder with --mllm."
        )
    return None


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

    ``version`` ("v1.0"/"v1.1"/"v1.2") picks the DiT when several are present (the official file before a
    diffusers folder); without it the newest is taken. When the DiT is a diffusers-layout model folder, its
    ``vae/`` and ``text_encoder/`` are the VAE and the MLLM unless given (see the module docstring). Raises
    :class:`ModelFilesError` naming every missing piece and where it was looked for."""
    if version is not None and version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {list(VERSIONS)}")
    found: dict[str, Path | None] = {"dit": None, "vae": None, "mllm": None}
    root = dirs = None
    if folder is not None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ModelFilesError(f"models folder not found: {root}")
        dirs = _model_dirs(root)
        if dit is None:
            found["dit"] = _find_dit(dirs["dit"], version)
    for kind, given in (("dit", dit), ("vae", vae), ("mllm", mllm)):
        if given is not None:
            path = Path(given).expanduser()
            if not path.exists():
                raise ModelFilesError(f"--{kind} {path} does not exist")
            found[kind] = path
    folder_model = model_root(found["dit"]) if found["dit"] is not None else None
    if folder_model is not None:
        if vae is None and (folder_model / VAE_DIR).is_dir():
            found["vae"] = folder_model
        if mllm is None:
            found["mllm"] = _folder_text_encoder(folder_model, dirs["mllm"] if dirs else [])
    if dirs is not None:
        if found["vae"] is None:
            found["vae"] = _find_vae(dirs["vae"])
        if found["mllm"] is None:
            found["mllm"] = _find_mllm(dirs["mllm"])
    missing = [kind for kind, path in found.items() if path is None]
    if missing:
        names = [DIT_FILES[v] for v in ([version] if version else DIT_FILES) if v in DIT_FILES]
        names += [f"a model folder such as {MODEL_FOLDERS['v1.2'][1]}/"] if version in (None, "v1.2") else []
        what = {"dit": f"the DiT ({' or '.join(names)})", "vae": f"the VAE ({VAE_FILE})",
                "mllm": f"the MLLM ({MLLM_FOLDER}/)"}
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

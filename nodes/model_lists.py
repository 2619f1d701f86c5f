"""What the loaders list, besides single files: diffusers-layout model folders and their parts.

A model folder (Step1X-Edit-v1p2, Step1X-Edit-v1p1-diffusers) holds ``transformer/``, ``vae/`` and
``text_encoder/`` (with the tokenizer in ``processor/`` or ``tokenizer/``). Downloaded whole into
``models/diffusion_models/`` it serves all three loaders:

* DiT loader: the model folder (``Step1X-Edit-v1p2``), or a lone transformer folder (beside single files,
  GGUF included);
* VAE loader: ``Step1X-Edit-v1p2/vae``, and diffusers VAE folders in ``models/vae``;
* MLLM loader: the model folder (its ``text_encoder/``), also when it sits in ``models/text_encoders``.

The files inside a listed folder (shards, configs) are not listed one by one. Names are paths relative to the
model folders of their kind, as ComfyUI lists files, so saved workflows keep working.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import _comfy as bridge

TRANSFORMER, VAE, TEXT_ENCODER = "transformer", "vae", "text_encoder"
COMPONENT_CLASSES = {TRANSFORMER: "Step1XEditTransformer2DModel", VAE: "AutoencoderKL"}


def _has_weights(folder: Path) -> bool:
    return any(p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json") for p in folder.iterdir())


def is_model_folder(folder: Path) -> bool:
    """A diffusers-layout model folder: ``transformer/`` or ``text_encoder/`` with a config.json inside."""
    return any((folder / part / "config.json").is_file() for part in (TRANSFORMER, TEXT_ENCODER))


def is_component(folder: Path, part: str) -> bool:
    """A diffusers component folder of ``part`` (transformer or vae): config.json naming its class, and weights."""
    config = folder / "config.json"
    if not config.is_file() or not _has_weights(folder):
        return False
    try:
        text = config.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return f'"{COMPONENT_CLASSES[part]}"' in text


def _folders(kind: str):
    """(name relative to its model folder, path) of every sub-folder of the ``kind`` folders; model folders are
    not entered (their parts are not listed separately)."""
    for root in bridge.model_folders(kind):
        if not root.is_dir():
            continue
        for here, dirs, _ in os.walk(root, followlinks=True):
            here = Path(here)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if here != root:
                yield here.relative_to(root).as_posix(), here
                if is_model_folder(here):
                    dirs[:] = []


def model_folder_names(kind: str, part: str | None = None) -> list[str]:
    """Model folders in the ``kind`` folders (with ``part`` inside, when given)."""
    return sorted({name for name, path in _folders(kind)
                   if is_model_folder(path) and (part is None or (path / part).is_dir())})


def component_names(kind: str, part: str) -> list[str]:
    """Lone component folders of ``part`` in the ``kind`` folders (not inside a model folder)."""
    return sorted({name for name, path in _folders(kind) if is_component(path, part)})


def _outside(files: list[str], folders: list[str]) -> list[str]:
    return [f for f in files if not any(f.startswith(d + "/") for d in folders)]


def dit_choices() -> list[str]:
    """What the DiT loader offers from models/diffusion_models, sorted: DiT files (what ComfyUI lists, and the GGUF
    files its listing leaves out), model folders with a transformer, and lone transformer folders."""
    folders = model_folder_names("diffusion_models", TRANSFORMER) + component_names("diffusion_models", TRANSFORMER)
    every = model_folder_names("diffusion_models") + folders
    files = set(bridge.model_files("diffusion_models")) | set(bridge.gguf_files("diffusion_models"))
    return sorted(set(folders) | set(_outside(sorted(files), every)))


def vae_choices() -> list[str]:
    """VAE files and diffusers VAE folders in models/vae, and ``<model folder>/vae`` of the model folders in
    models/diffusion_models."""
    folders = component_names("vae", VAE) + [f"{name}/{VAE}" for name in model_folder_names("diffusion_models", VAE)]
    own = component_names("vae", VAE) + model_folder_names("vae")
    return sorted(set(folders)) + _outside(bridge.model_files("vae"), own)


def mllm_choices() -> list[str]:
    """Qwen2.5-VL folders and single files in models/text_encoders, and model folders with a text encoder in
    models/text_encoders or models/diffusion_models."""
    models = model_folder_names("text_encoders", TEXT_ENCODER)
    elsewhere = model_folder_names("diffusion_models", TEXT_ENCODER)
    inside = model_folder_names("text_encoders")
    folders = [f for f in bridge.hf_folders("text_encoders") if not any(f.startswith(d + "/") for d in inside)]
    files = [f for f in bridge.model_files("text_encoders")
             if f.endswith(".safetensors") and not any(f.startswith(d + "/") for d in folders + inside)]
    return sorted(set(models + elsewhere + folders)) + files


def find(kinds: tuple[str, ...], name: str) -> Path:
    """The path of ``name`` in the first of the ``kinds`` folders that has it; the first kind's error otherwise."""
    first = None
    for kind in kinds:
        try:
            return bridge.model_path(kind, name)
        except FileNotFoundError as exc:
            first = first or exc
    raise first

"""Reading a diffusers-layout model component: its folder, shard index, config.json and weight files.

A diffusers model folder holds one folder per component (``transformer/``, ``vae/``, ...), each with a
``config.json`` and either one ``diffusion_pytorch_model.safetensors`` or shards named by
``diffusion_pytorch_model.safetensors.index.json``. :func:`open_component` finds the files from the model
folder, the component folder, the index or one weight file, and checks that every shard is there and
complete; :func:`assign` builds a model's tensors from them through a key map (:mod:`.diffusers_layout`).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .assign import declared_tensors, load_state, refuse_mismatch, refuse_wrong_shapes
from .safetensors_file import PICKLE_SUFFIXES, CheckpointError, Header, TensorInfo, open_tensors, read_header

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"

COPY, STACK, SWAP, CONV = "copy", "stack", "swap halves", "as 1x1 conv"
"""How an official tensor is made from its diffusers parts: as is, the parts' rows stacked in order, the
two halves of its rows swapped, or a Linear weight reshaped to a 1x1 convolution's."""

Plan = Callable[[str], "tuple[tuple[str, ...], str]"]
"""Official key -> (the diffusers tensors it is made of, one of the ways above)."""


# ------------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class DiffusersFiles:
    """One component of a diffusers model: its config and where each tensor is stored."""

    label: str
    """The folder or file, as error messages name it."""
    config: dict
    where: dict[str, Header]
    """Tensor key -> header of the file that holds it."""

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {key: header.tensors[key] for key, header in self.where.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].tensors[key].shape


def looks_like_diffusers(path: str | os.PathLike, markers: tuple[str, ...]) -> bool:
    """Whether ``path`` is a folder, a shard index, or a .safetensors file holding one of the ``markers``
    (diffusers tensor names). Reads at most one header."""
    path = Path(path)
    if path.is_dir() or path.name.endswith(".index.json"):
        return True
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        keys = read_header(path).tensors
    except CheckpointError:
        return False
    return any(m in keys for m in markers)


def open_component(path: str | os.PathLike, component: str) -> DiffusersFiles:
    """The files of ``component`` given a model folder (with ``component/``), the component folder, its
    index json or one weight file. Checks that every shard the index names is there and complete."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model folder or file not found: {path}")
    if path.is_dir():
        folder = path / component if (path / component).is_dir() else path
        if folder is path and not _has_weights(path):
            raise CheckpointError(_no_component_message(path, component))
        return _open_folder(folder)
    if path.name.endswith(".index.json"):
        return _open_index(path)
    header = read_header(path)
    config = _read_config(path.parent / CONFIG_NAME) if path.name.startswith("diffusion_pytorch_model") else {}
    return DiffusersFiles(str(path), config, {key: header for key in header.tensors})


def _has_weights(folder: Path) -> bool:
    return any(p.suffix.lower() in {".safetensors", *PICKLE_SUFFIXES} or p.name.endswith(".index.json")
               for p in folder.iterdir())


def _no_component_message(path: Path, component: str) -> str:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:8]
    listing = ", ".join(found) if found else "nothing"
    return (
        f"{path} has no {component}/ folder and no weights of its own (it holds {listing}). Expected a "
        f"diffusers-layout Step1X-Edit model folder (e.g. Step1X-Edit-v1p2 with {component}/config.json and "
        f"{component}/diffusion_pytorch_model*.safetensors), its {component}/ folder, or a single .safetensors "
        "file. Download the whole model repository, or point at the right folder."
    )


def _open_folder(folder: Path) -> DiffusersFiles:
    index = folder / INDEX_NAME
    if index.is_file():
        return _open_index(index)
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) == 1:
            single = candidates[0]
        elif candidates:
            raise CheckpointError(
                f"{folder} holds several .safetensors files ({', '.join(p.name for p in candidates[:4])}) but no "
                f"{INDEX_NAME} that says which tensors each holds; download the folder again"
            )
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            hint = (f"it has only pickle weights ({', '.join(pickles[:3])}), which are not loaded because they can "
                    "run code; download the .safetensors files" if pickles else "download the folder again")
            raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} and no {INDEX_NAME}: {hint}")
    header = read_header(single)
    return DiffusersFiles(str(folder), _read_config(folder / CONFIG_NAME), {key: header for key in header.tensors})


def _open_index(index: Path) -> DiffusersFiles:
    folder = index.parent
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index} is not a valid shard index (no weight_map); download it again") from None
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index.name} in {folder} names {len(shards)} shard(s) but {len(missing)} are not there "
            f"({', '.join(missing[:3])}). The download is incomplete: download the missing files again."
        )
    headers = {name: read_header(folder / name) for name in shards}
    where = {}
    for key, name in weight_map.items():
        header = headers[name]
        if key not in header.tensors:
            raise CheckpointError(
                f"{index.name} says {key} is in {name}, but that file has no such tensor; the shards and the index "
                f"in {folder} come from different downloads. Download the folder again."
            )
        where[key] = header
    return DiffusersFiles(str(folder), _read_config(folder / CONFIG_NAME), where)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); download it again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a diffusers config (expected a JSON object)")
    return config


# ------------------------------------------------------------------------------------------- assigning


def assign(model: torch.nn.Module, files: DiffusersFiles, plan: Plan, dtype_of: Callable[[str], torch.dtype],
           device: torch.device, what: str,
           alias: Callable[[str], str | None] = lambda key: None) -> None:
    """Build every official tensor of ``model`` from ``files`` by ``plan`` and assign it (one tensor at a
    time, each read, combined and cast before the next). Nothing is loaded unless every tensor is there,
    every tensor of the files is used and every official tensor comes out in the shape the model expects."""
    available = files.where
    expected = declared_tensors(model)
    sources = {}
    missing = []
    for key in sorted(expected):
        try:
            names, op = plan(key)
        except KeyError:
            raise CheckpointError(f"{key} has no diffusers counterpart; this model class is not {what}") from None
        names = tuple(n if n in available else (alias(n) or n) for n in names)
        missing.extend(n for n in names if n not in available)
        sources[key] = (names, op)
    used = {n for names, _ in sources.values() for n in names}
    refuse_mismatch(files.label, what, missing, sorted(set(available) - used))
    state = {}
    with ExitStack() as stack:
        readers = {}

        def read(name: str) -> torch.Tensor:
            header = available[name]
            if header.path not in readers:
                readers[header.path] = stack.enter_context(open_tensors(header.path))
            return readers[header.path].get_tensor(name)

        for key, (names, op) in sources.items():
            tensor = combine([read(n) for n in names], op)
            state[key] = tensor.to(device=device, dtype=dtype_of(key))
            del tensor
    refuse_wrong_shapes(files.label, expected, {key: tuple(t.shape) for key, t in state.items()})
    load_state(model, state, files.label)


def combine(parts: list[torch.Tensor], op: str) -> torch.Tensor:
    """The official tensor from its diffusers parts (see :func:`.diffusers_layout.dit_sources`)."""
    if op == STACK:
        return torch.cat(parts, dim=0)
    tensor = parts[0]
    if op == SWAP:
        first, second = tensor.chunk(2, dim=0)
        return torch.cat((second, first), dim=0)
    if op == CONV and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor

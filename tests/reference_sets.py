"""The reference sets in ``tests/fixtures/``, made whole for a test session.

The repository stores what the reference implementations produced (inputs, outputs, token records, manifests)
but not the seeded tiny weights they ran on: those are rebuilt from the seed rule in ``fixtures/rebuild.json``
into a folder the test session owns, and every rebuilt file must have the sha256 its manifest records. A set's
folder then holds every file of the set, laid out as the reference generators wrote it, with the three sets
side by side (``official/``, ``v12/``, ``regione/``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

STORED = Path(__file__).resolve().parent / "fixtures"
RECIPE = STORED / "rebuild.json"
SETS = ("official", "v12", "regione")
NEEDS = {"official": (), "v12": ("official",), "regione": ()}
"""Sets whose rebuilt files another set's rebuild reads (v12 converts the official v1.1 DiT)."""
ENV = {"official": "STEP1X_FIXTURES", "v12": "STEP1X_FIXTURES_V12", "regione": "STEP1X_FIXTURES_REGIONE"}
"""The environment variable that points a set at another folder holding every file of the set."""


class RebuildError(RuntimeError):
    """A rebuilt file whose bytes differ from the ones the reference was run with."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe() -> dict:
    return json.loads(RECIPE.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ the seed rule


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor of the reference weights: its own generator, seeded by ``seed`` and the tensor's name."""
    gen = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    if "norm" in name and name.endswith(("weight", "scale")):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def _manifest_entry(manifest: str, rel: str) -> dict:
    """A file's entry in its set's manifest (manifest keys are relative to the manifest's folder)."""
    path = STORED / manifest
    files = json.loads(path.read_text(encoding="utf-8"))["files"]
    key = Path(rel).relative_to(Path(manifest).parent).as_posix()
    return files[key]


def expected_sha256(rel: str, spec: dict) -> str:
    """The sha256 a rebuilt file must have: its manifest's, else the one recorded in the recipe."""
    if "manifest" in spec:
        return _manifest_entry(spec["manifest"], rel)["sha256"]
    return spec["sha256"]


def build_weights(rel: str, spec: dict) -> dict[str, torch.Tensor]:
    """The tensors of one seeded weight file, by the rule and the file's scalings and recorded values."""
    if "manifest" in spec:
        tensors = {k: tuple(v["shape"]) for k, v in _manifest_entry(spec["manifest"], rel)["tensors"].items()}
    else:
        tensors = {k: tuple(v) for k, v in spec["tensors"].items()}
    state = {name: seeded_tensor(name, shape, spec["seed"]) for name, shape in tensors.items()}
    for name, factor in spec.get("scale", {}).items():
        state[name] = state[name] * factor
    for name, values in spec.get("values", {}).items():
        state[name] = torch.tensor(values, dtype=torch.float32).reshape(state[name].shape)
    return state


def convert(root: Path, spec: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers-layout shards of an official DiT: each diffusers key taken from its official key by the
    recorded operation (copy, a dim-0 row slice, or a swap of the two dim-0 halves), grouped into the shard
    files the recorded index names."""
    from safetensors.torch import load_file

    official = load_file(root / spec["source"])
    key_map = json.loads((STORED / spec["key_map"]).read_text(encoding="utf-8"))["diffusers_to_official"]
    index = json.loads((STORED / spec["index"]).read_text(encoding="utf-8"))["weight_map"]
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, shard in index.items():
        source = key_map[key]
        shards.setdefault(shard, {})[key] = _apply(official[source["official_key"]], source["op"], key)
    return shards


def _apply(tensor: torch.Tensor, op: str, key: str) -> torch.Tensor:
    if op == "copy":
        return tensor.clone()
    if op.startswith("rows["):
        lo, hi = (int(v) for v in op[len("rows["):op.index("]")].split(":"))
        return tensor[lo:hi].clone()
    if op.startswith("swap_halves_dim0"):
        half = tensor.shape[0] // 2
        return torch.cat([tensor[half:], tensor[:half]]).contiguous()
    raise RebuildError(f"{key}: unknown operation {op!r} in the key map")


# ---------------------------------------------------------------------------------------------- assembly


def rebuilt_files(name: str) -> list[str]:
    """Paths (relative to the fixtures root) of the files of set ``name`` that are rebuilt, not stored."""
    data = recipe()
    out = [rel for rel in data["files"] if rel.startswith(f"{name}/")]
    for folder, spec in data["converted"].items():
        if folder.startswith(f"{name}/"):
            out += [f"{folder}/{shard}" for shard in sorted(set(_index(spec).values()))]
    return out


def _index(spec: dict) -> dict[str, str]:
    return json.loads((STORED / spec["index"]).read_text(encoding="utf-8"))["weight_map"]


def reference_folder(name: str, root: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """The folder of set ``name``: the one in its environment variable when that is set, otherwise the stored set
    assembled under ``root``."""
    value = environ.get(ENV[name])
    if value:
        path = Path(value)
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV[name]}={value} is not a folder; unset it to use tests/fixtures/{name}")
        return path
    return assemble(root, name)


def assemble(root: Path, name: str) -> Path:
    """``root/name``: the stored files of set ``name`` copied and its weights rebuilt (once per root)."""
    target = root / name
    done = root / f".{name}.complete"
    if done.exists():
        return target
    for dependency in NEEDS[name]:
        assemble(root, dependency)
    source = STORED / name
    for path in sorted(source.rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    data = recipe()
    for rel, spec in data["files"].items():
        if rel.startswith(f"{name}/"):
            _write(root / rel, build_weights(rel, spec), spec.get("metadata"), expected_sha256(rel, spec))
    for folder, spec in data["converted"].items():
        if folder.startswith(f"{name}/"):
            for shard, state in convert(root, spec).items():
                rel = f"{folder}/{shard}"
                _write(root / rel, state, spec.get("metadata"), expected_sha256(rel, spec))
    done.touch()
    return target


def _write(path: Path, state: dict[str, torch.Tensor], metadata: dict | None, sha: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    found = sha256(path)
    if found != sha:
        raise RebuildError(
            f"rebuilt {path.name} has sha256 {found}, but the reference ran on {sha}: the seed rule in "
            f"{RECIPE.name} no longer reproduces it (a torch release that changed randn?). Point the set's "
            "environment variable at a folder with the original files to run the parity tests meanwhile."
        )

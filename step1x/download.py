"""``step1x download``: the official weights from Hugging Face into ComfyUI's model folders or one folder.

The single-file models (v1.0, v1.1) go file by file into their folders; a diffusers-layout model (v1.2,
v1.1-diffusers) goes as one model folder, ``models/diffusion_models/<name>/`` in ComfyUI or ``DEST/<name>/``,
with only the files the editor reads (``transformer/``, ``vae/``, ``text_encoder/``, the tokenizer in
``processor/`` or ``tokenizer/``, their configs and ``model_index.json``).

The plan (which file goes where) needs no network. Sizes come from the hub, and the free space of each
target disk is checked before anything is fetched. Files are downloaded into a hidden ``.step1x-download``
folder beside their target (huggingface_hub resumes an interrupted file there) and renamed into place
only when complete, so a target name never holds a partial file. Offline, or when the hub cannot be
reached, the command prints the files to place by hand instead.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoints.model_files import (
    COMFY_VAE_FILE,
    DIT_FILES,
    DIT_REPO,
    MLLM_FOLDER,
    MLLM_REPO,
    MODEL_FOLDERS,
    TEXT_ENCODER_DIR,
    VAE_FILE,
    is_comfyui_root,
)

MLLM_PATTERNS = ("*.json", "*.safetensors", "merges.txt", "vocab.json")
"""Files of the Qwen2.5-VL-7B-Instruct repository the editor needs: config, tokenizer and weights."""
FOLDER_PATTERNS = ("model_index.json", "transformer/*.json", "transformer/*.safetensors", "vae/*.json",
                   "vae/*.safetensors", "text_encoder/*.json", "text_encoder/*.safetensors", "processor/*.json",
                   "processor/*.txt", "tokenizer/*.json", "tokenizer/*.txt")
"""Files of a diffusers-layout model repository the editor needs (no scheduler, README or pickle weights)."""
APPROX_BYTES = {"dit": 24.9e9, "vae": 0.34e9, "mllm": 16.6e9, "folder": 41.7e9}
"""Sizes shown when the hub cannot be asked (a model folder: transformer, text encoder and VAE in bf16)."""
STAGING = ".step1x-download"
GB = 1e9


class DownloadError(RuntimeError):
    """A download that cannot start or finish; the message says what to do."""


class HubUnavailable(DownloadError):
    """Offline mode, or the hub could not be reached."""


@dataclass(frozen=True)
class PlannedFile:
    kind: str
    """"dit", "vae", "mllm" or "folder" (a file of a diffusers-layout model folder)."""
    repo: str
    filename: str
    """Path in the repository; for the MLLM or a model folder before the file list is known, a pattern."""
    target: Path
    size: int | None = None
    folder: Path | None = None
    """The model folder a "folder" file belongs to."""
    skip: tuple[str, ...] = ()
    """Sub-folders of a model folder to leave out."""

    @property
    def complete(self) -> bool:
        return self.target.is_file() and (self.size is None or self.target.stat().st_size == self.size)


@dataclass(frozen=True)
class DownloadPlan:
    root: Path
    layout: str
    files: tuple[PlannedFile, ...]


# ------------------------------------------------------------------------------------------------ plan


def plan_download(*, comfyui: str | os.PathLike | None = None, dest: str | os.PathLike | None = None,
                  versions: tuple[str, ...] = ("v1.1",), mllm: bool = True,
                  folders: tuple[str, ...] = ()) -> DownloadPlan:
    """Where each file goes. ``comfyui``: a ComfyUI folder (or its ``models`` folder); ``dest``: one folder
    in the official standalone layout. ``versions``: single-file DiTs (with the VAE and, with ``mllm``,
    Qwen2.5-VL-7B-Instruct); ``folders``: diffusers-layout models ("v1.2", "v1.1-diffusers"), each a model
    folder with its own VAE and text encoder (``mllm`` False leaves out v1.1-diffusers' text encoder, the stock
    Qwen2.5-VL; v1.2's is its own and always needed). No network."""
    if (comfyui is None) == (dest is None):
        raise DownloadError("give either --comfyui PATH (a ComfyUI install) or --dest PATH (a models folder)")
    for version in versions:
        if version not in DIT_FILES:
            raise DownloadError(f"unknown version {version!r}; choose v1.0, v1.1 or all")
    for name in folders:
        if name not in MODEL_FOLDERS:
            raise DownloadError(f"unknown model {name!r}; choose one of {', '.join(MODEL_FOLDERS)}")
    if "v1.2" in folders and not mllm:
        raise DownloadError(
            "Step1X-Edit v1.2 needs its own text encoder (a fine-tuned Qwen2.5-VL in text_encoder/ of its model "
            "folder); the stock Qwen2.5-VL-7B-Instruct cannot replace it, so --skip-mllm does not apply to v1.2"
        )
    if comfyui is not None:
        root = Path(comfyui).expanduser()
        models = root / "models" if is_comfyui_root(root) else root
        if not (is_comfyui_root(root) or (root.name == "models" and root.is_dir())):
            raise DownloadError(
                f"{root} is not a ComfyUI folder (no models/ and comfy/ inside); give the ComfyUI folder, or use "
                "--dest for a plain models folder"
            )
        dirs = (models / "diffusion_models", models / "vae", models / "text_encoders")
        vae_name, layout = COMFY_VAE_FILE, "comfyui"
    else:
        root = Path(dest).expanduser()
        dirs, vae_name, layout = (root, root, root), VAE_FILE, "standalone"
    files = [PlannedFile("dit", DIT_REPO, DIT_FILES[v], dirs[0] / DIT_FILES[v]) for v in versions]
    if versions:
        files.append(PlannedFile("vae", DIT_REPO, VAE_FILE, dirs[1] / vae_name))
        if mllm:
            files.append(PlannedFile("mllm", MLLM_REPO, "*", dirs[2] / MLLM_FOLDER))
    for name in folders:
        repo, folder_name = MODEL_FOLDERS[name]
        target = dirs[0] / folder_name
        skip = () if mllm else (TEXT_ENCODER_DIR,)
        files.append(PlannedFile("folder", repo, "*", target, folder=target, skip=skip))
    return DownloadPlan(root, layout, tuple(files))


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


class HubClient:
    """The two calls made to huggingface_hub; tests pass a fake with the same methods."""

    def list_files(self, repo: str) -> dict[str, int | None]:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, files_metadata=True)
        return {s.rfilename: s.size for s in info.siblings or []}

    def fetch(self, repo: str, filename: str, local_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, local_dir=str(local_dir)))


def resolve_sizes(plan: DownloadPlan, client: HubClient) -> DownloadPlan:
    """Ask the hub for sizes, and expand the MLLM entry into its files. Raises HubUnavailable."""
    listings: dict[str, dict[str, int | None]] = {}
    try:
        for repo in dict.fromkeys(f.repo for f in plan.files):
            listings[repo] = client.list_files(repo)
    except Exception as exc:  # connection errors come from several libraries
        raise HubUnavailable(f"cannot reach Hugging Face ({type(exc).__name__}: {exc})") from None
    files = []
    for f in plan.files:
        listing = listings[f.repo]
        if f.kind == "mllm":
            names = sorted(n for n in listing if "/" not in n and any(fnmatch.fnmatch(n, p) for p in MLLM_PATTERNS))
            files += [PlannedFile("mllm", f.repo, n, f.target / n, listing[n]) for n in names]
        elif f.kind == "folder":
            names = sorted(n for n in listing if any(fnmatch.fnmatch(n, p) for p in FOLDER_PATTERNS)
                           and n.split("/")[0] not in f.skip)
            if not any(n.startswith("transformer/") for n in names):
                raise DownloadError(f"{f.repo} has no transformer/ weights (found: {', '.join(sorted(listing)[:8])})")
            files += [replace(f, filename=n, target=f.folder / n, size=listing[n]) for n in names]
        elif f.filename not in listing:
            raise DownloadError(f"{f.repo} has no file {f.filename} (found: {', '.join(sorted(listing)[:8])})")
        else:
            files.append(replace(f, size=listing[f.filename]))
    return replace(plan, files=tuple(files))


# ------------------------------------------------------------------------------------------ disk space


def size_text(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{int(n)} bytes"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(plan: DownloadPlan, free_bytes=lambda p: shutil.disk_usage(p).free) -> None:
    """Raise DownloadError when a target disk has less free space than the files still to fetch."""
    need: dict[int, tuple[Path, int]] = {}
    for f in plan.files:
        if f.complete:
            continue
        folder = _existing_parent(f.target.parent)
        dev = folder.stat().st_dev
        where, total = need.get(dev, (folder, 0))
        need[dev] = (where, total + (f.size or 0))
    for folder, total in need.values():
        free = free_bytes(folder)
        if total > free:
            raise DownloadError(
                f"not enough disk space on {folder}: the download needs {size_text(total)} but only "
                f"{size_text(free)} is free. Free {size_text(total - free)} more or choose another folder."
            )


# -------------------------------------------------------------------------------------------- fetching


def staging_dir(f: PlannedFile) -> Path:
    """Hidden folder on the target's disk where huggingface_hub keeps the partial file."""
    if f.kind == "folder":
        return f.folder.parent / STAGING / f.folder.name
    if f.kind == "mllm":
        return f.target.parent.parent / STAGING / f.target.parent.name
    return f.target.parent / STAGING


def fetch_file(f: PlannedFile, client: HubClient) -> None:
    """Download into the staging folder beside the target (resumable), then rename into place."""
    staging = staging_dir(f)
    staging.mkdir(parents=True, exist_ok=True)
    fetched = client.fetch(f.repo, f.filename, staging)
    if f.size is not None and fetched.stat().st_size != f.size:
        raise DownloadError(f"{f.filename} arrived with {fetched.stat().st_size} bytes, expected {f.size}; run again")
    f.target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched, f.target)


def _cleanup_staging(plan: DownloadPlan) -> None:
    for f in plan.files:
        folder = staging_dir(f)
        if f.kind in ("mllm", "folder"):
            folder = folder.parent
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def approx_bytes(f: PlannedFile) -> float:
    """The size shown for ``f`` when the hub cannot be asked."""
    if f.kind == "folder" and TEXT_ENCODER_DIR in f.skip:
        return APPROX_BYTES["folder"] - APPROX_BYTES["mllm"]
    return APPROX_BYTES[f.kind]


def manual_instructions(plan: DownloadPlan, reason: str) -> str:
    lines = [f"{reason}. Download these files yourself and place them as shown:"]
    for f in plan.files:
        approx = f" (about {approx_bytes(f) / GB:.1f} GB)" if f.size is None else f" ({f.size / GB:.2f} GB)"
        if f.kind == "mllm" and f.filename == "*":
            lines.append(f"  https://huggingface.co/{f.repo}: config and tokenizer files (*.json, merges.txt, "
                         f"vocab.json) and every *.safetensors shard{approx}\n      -> {f.target}/")
        elif f.kind == "folder" and f.filename == "*":
            parts = ", ".join(p for p in ("transformer/", "vae/", "text_encoder/") if p.rstrip("/") not in f.skip)
            lines.append(f"  https://huggingface.co/{f.repo}: model_index.json and the folders {parts} and processor/ "
                         f"or tokenizer/ (their *.json, *.txt and *.safetensors files){approx}\n      -> {f.target}/")
        else:
            lines.append(f"  https://huggingface.co/{f.repo}/resolve/main/{f.filename}{approx}\n      -> {f.target}")
    lines.append("Then check the install with `python -m step1x edit --models ...` "
                 "(see the README's Command line section).")
    return "\n".join(lines)


def describe_plan(plan: DownloadPlan) -> str:
    lines = [f"{plan.layout} layout under {plan.root}:"]
    for f in plan.files:
        size = f"{f.size / GB:.2f} GB" if f.size is not None else f"~{approx_bytes(f) / GB:.1f} GB"
        state = "present" if f.filename != "*" and f.complete else size
        lines.append(f"  {f.repo}/{f.filename} -> {f.target} [{state}]")
    return "\n".join(lines)


def download(plan: DownloadPlan, client: HubClient | None = None, *, say=print, free_bytes=None) -> DownloadPlan:
    """Fetch every file of ``plan`` that is not complete yet. Raises HubUnavailable (offline or hub
    unreachable; nothing fetched) or DownloadError (disk space, a failed transfer: run again to resume)."""
    if hub_offline():
        raise HubUnavailable("HF_HUB_OFFLINE is set, so nothing is downloaded")
    client = client or HubClient()
    plan = resolve_sizes(plan, client)
    clash = [f for f in plan.files if f.target.exists() and not f.complete]
    if clash:
        f = clash[0]
        raise DownloadError(
            f"{f.target} already exists but is not {f.repo}/{f.filename} ({f.target.stat().st_size:,} bytes, "
            f"expected {f.size:,}); it is left untouched. Move or delete it, then run again."
        )
    check_disk_space(plan, **({"free_bytes": free_bytes} if free_bytes else {}))
    todo = [f for f in plan.files if not f.complete]
    say(f"{len(plan.files) - len(todo)} of {len(plan.files)} files already present; fetching "
        f"{size_text(sum(f.size or 0 for f in todo))}")
    for i, f in enumerate(todo, 1):
        say(f"[{i}/{len(todo)}] {f.repo}/{f.filename} -> {f.target}")
        try:
            fetch_file(f, client)
        except DownloadError:
            raise
        except Exception as exc:
            raise DownloadError(
                f"downloading {f.filename} failed ({type(exc).__name__}: {exc}); run the same command again to "
                "resume where it stopped"
            ) from None
    _cleanup_staging(plan)
    return plan

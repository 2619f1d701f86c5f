"""What a headless run will do, checked before any model is loaded: the prompts file, the list of
(input, instruction, output) jobs and a safe, writable output folder."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                ".tiff": "TIFF"}
EXAMPLE = '{"cat.png": "make the cat wear a red hat", "street.jpg": "turn the day into night"}'


class JobError(ValueError):
    """A prompts file, file name or output folder that a run cannot use."""


@dataclass(frozen=True)
class Job:
    name: str
    """The entry as given (a file name relative to the input folder), used in messages."""
    prompt: str
    output: Path
    source: Path | None = None
    """The image to edit; None for text-to-image."""


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """Read the official prompts file: a JSON object ``{image file name: instruction}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JobError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read prompts file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise JobError(
            f"{path} holds a JSON {type(data).__name__}; it must be an object mapping image file names to "
            f"instructions, e.g. {EXAMPLE}"
        )
    if not data:
        raise JobError(f"{path} is an empty object; add entries like {EXAMPLE}")
    wrong = [f"{k!r} ({type(v).__name__})" for k, v in data.items() if not isinstance(v, str)]
    if wrong:
        raise JobError(
            f"{path}: every instruction must be a string, but these entries are not: {', '.join(wrong[:5])}"
            f"{' ...' if len(wrong) > 5 else ''}. Expected e.g. {EXAMPLE}"
        )
    return data


def safe_relative(name: str) -> Path:
    """``name`` as a path inside a folder; refuses absolute paths and ``..`` so nothing lands outside it."""
    for flavour in (PurePosixPath, PureWindowsPath):
        pure = flavour(name)
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise JobError(f"{name!r} must be a file name inside the input folder, not an absolute path or '..'")
    if not name.strip() or name.endswith(("/", "\\")):
        raise JobError(f"{name!r} is not a file name")
    return Path(*PurePosixPath(name.replace("\\", "/")).parts)


def output_path(output_dir: Path, name: str, fmt: str | None = None) -> Path:
    """Where the result of ``name`` goes: same relative name; an extension that cannot be written (or a
    forced ``fmt``) becomes that format's."""
    rel = safe_relative(name)
    suffix = f".{fmt.lower().lstrip('.')}" if fmt else rel.suffix.lower()
    if suffix not in SAVE_FORMATS:
        if fmt:
            raise JobError(f"cannot write format {fmt!r}; choose one of {sorted({s[1:] for s in SAVE_FORMATS})}")
        suffix = ".png"
    return output_dir / rel.with_suffix(suffix) if rel.suffix.lower() != suffix else output_dir / rel


def _unique(jobs: list[Job]) -> list[Job]:
    seen: dict[Path, str] = {}
    for job in jobs:
        if job.output in seen:
            raise JobError(f"{seen[job.output]!r} and {job.name!r} would both be written to {job.output}")
        seen[job.output] = job.name
    return jobs


def edit_jobs(input_dir: str | os.PathLike, prompts: dict[str, str], output_dir: str | os.PathLike,
              fmt: str | None = None) -> list[Job]:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise JobError(f"input folder not found: {input_dir}")
    return _unique([Job(name, prompt, output_path(output_dir, name, fmt), input_dir / safe_relative(name))
                    for name, prompt in prompts.items()])


def single_edit_job(image: str | os.PathLike, prompt: str, output_dir: str | os.PathLike,
                    fmt: str | None = None) -> Job:
    image = Path(image)
    return Job(image.name, prompt, output_path(Path(output_dir), image.name, fmt), image)


def t2i_jobs(prompts: dict[str, str], output_dir: str | os.PathLike, fmt: str | None = None) -> list[Job]:
    output_dir = Path(output_dir)
    return _unique([Job(name, prompt, output_path(output_dir, name, fmt or None)) for name, prompt in prompts.items()])


def prepare_output_dir(output_dir: str | os.PathLike, jobs: list[Job], input_dir: str | os.PathLike | None = None,
                       overwrite: bool = False) -> Path:
    """Check that the output folder can be created and written and that no input would be overwritten. A folder
    that did not exist is removed again after the check: results create it when they are written, so a run that
    stops before writing anything leaves no empty folder behind."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise JobError(f"output folder {output_dir} is a file; give a folder")
    if not overwrite:
        if input_dir is not None and output_dir.resolve() == Path(input_dir).resolve():
            raise JobError(
                f"the output folder {output_dir} is the input folder; choose another folder so the originals "
                "are kept (or pass --overwrite to replace them)"
            )
        clash = [j for j in jobs if j.source is not None and j.output.resolve() == j.source.resolve()]
        if clash:
            raise JobError(
                f"writing {clash[0].output} would overwrite the input image; choose another output folder "
                "(or pass --overwrite)"
            )
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".step1x-write-test-", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise JobError(f"cannot write to the output folder {output_dir}: {exc.strerror or exc}") from None
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
    return output_dir

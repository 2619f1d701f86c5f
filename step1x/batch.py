"""Running a list of jobs through one loaded pipeline: per-image progress, one failure never stops the
run, results written atomically, and a closing report.

    from step1x import Step1XPipeline, EditOptions
    from step1x.batch import run_batch
    from step1x.jobs import edit_jobs, read_prompts

    pipe = Step1XPipeline.from_folder("models", offload=True)
    jobs = edit_jobs("inputs", read_prompts("prompts.json"), "outputs")
    report = run_batch(pipe, jobs, EditOptions(seed=42))
    print(report.summary())
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .image_io import load_image
from .jobs import SAVE_FORMATS, Job
from .memory import peak_report, reset_peaks
from .pipeline import EditOptions, Step1XPipeline, Timings
from .pipeline_v12 import ReasoningOptions
from .reasoning import ReasonEditResult
from .sampling.denoise import StepInfo


@dataclass
class JobResult:
    job: Job
    status: str
    """"done", "failed" or "skipped" (the output already existed)."""
    seconds: float = 0.0
    error: str | None = None
    timings: Timings = field(default_factory=Timings)
    """Per-stage seconds (encode, sample, decode) of this image."""


@dataclass
class BatchReport:
    results: list[JobResult] = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float | None = None
    peak_memory: str = ""
    interrupted: bool = False

    def _count(self, status: str) -> list[JobResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> int:
        return len(self._count("done"))

    @property
    def failed(self) -> int:
        return len(self._count("failed"))

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.interrupted

    def summary(self) -> str:
        done = self._count("done")
        per_image = sum(r.seconds for r in done) / len(done) if done else 0.0
        head = f"done {self.done}, failed {self.failed}"
        if self._count("skipped"):
            head += f", skipped {len(self._count('skipped'))} (output exists)"
        head += f" in {self.seconds:.1f} s"
        if done:
            head += f"; {per_image:.2f} s per image"
        if self.load_seconds is not None:
            head += f"; models loaded in {self.load_seconds:.1f} s"
        lines = [head + ("; interrupted" if self.interrupted else "")]
        if self.peak_memory:
            lines.append(f"peak memory: {self.peak_memory}")
        for r in self._count("failed"):
            lines.append(f"  failed {r.job.name}: {r.error}")
        return "\n".join(lines)


def save_atomic(image: Image.Image, path: Path) -> None:
    """Write ``image`` to a hidden temporary file beside ``path`` and rename it into place, so a crash or
    Ctrl-C never leaves a half-written image under the final name."""
    fmt = SAVE_FORMATS.get(path.suffix.lower(), "PNG")
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (temporary files are created 0600; results get the usual permissions)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_reasoning(result: ReasonEditResult) -> str:
    """One line about a reasoning edit: the tries, the pick and the model replies it took."""
    text = f"{len(result.tries)} tr{'y' if len(result.tries) == 1 else 'ies'}"
    if result.reflect:
        last = result.tries[-1].reflection
        text += f", best try {result.best_index + 1}, last verdict {last.verdict}"
    if result.think is not None:
        text += f", instruction rewritten to {result.think.instruction!r}" if result.think.rewritten else \
            ", rewrite not usable (instruction kept)"
    return text + f"; {len(result.calls)} model replies"


DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputWriteError(OSError):
    """A result that could not be written, with the path and what to do."""


def write_result(image: Image.Image, path: Path) -> None:
    """:func:`save_atomic`, with a full disk reported by the path and what to do about it."""
    try:
        save_atomic(image, path)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise OutputWriteError(
            f"no space left to write {path} ({exc.strerror or exc}); free some space on that disk, or write the "
            "results to a folder on another disk (--output-dir), then run again with --skip-existing to do only "
            "what is missing"
        ) from None


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ("out of GPU memory; try --offload, --weight-dtype fp8_e4m3fn, --sequential-cfg or a smaller "
                "--size-level")
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


class _Bars:
    """One bar over the images and one over the steps of the current image (tqdm, on stderr)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.images = tqdm(total=total, desc="images", unit="img", disable=not enabled, file=sys.stderr)
        self.steps = None

    def step(self, info: StepInfo) -> None:
        if self.steps is not None and info.step == 0:  # the next try of a reasoning edit
            self.steps.close()
            self.steps = None
        if self.steps is None:
            self.steps = self._tqdm(total=info.total, desc="  steps", unit="step", leave=False,
                                    disable=not self.enabled, file=sys.stderr)
        self.steps.update(1)

    def image_done(self, name: str) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None
        self.images.set_postfix_str(name, refresh=False)
        self.images.update(1)

    def note(self, text: str) -> None:
        self.images.write(text, file=sys.stderr) if self.enabled else print(text, file=sys.stderr)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()
        self.images.close()


def run_job(pipe: Step1XPipeline, job: Job, options: EditOptions, *, width: int = 1024, height: int = 1024,
            callback: Callable[[StepInfo], None] | None = None, timings: Timings | None = None,
            reasoning: ReasoningOptions | None = None, save_tries: bool = False) -> ReasonEditResult | None:
    """Edit (or generate) one image and write it to ``job.output``. With ``reasoning`` (v1.2 thinking and/or
    reflection) the chosen try is written, with ``save_tries`` also every try (``NAME_tryN``) and the model's
    text (``NAME_reasoning.txt``); the run's record is returned."""
    if job.source is None:
        image = pipe.text_to_image(job.prompt, width, height, options, callback=callback, timings=timings)
    elif reasoning is not None:
        result = pipe.reason_edit(load_image(job.source), job.prompt, options, reasoning, callback=callback,
                                  timings=timings)
        if save_tries:
            for i, try_image in enumerate(result.images):
                write_result(try_image, job.output.with_name(f"{job.output.stem}_try{i + 1}{job.output.suffix}"))
            text = job.output.with_name(f"{job.output.stem}_reasoning.txt")
            text.write_text(result.reasoning_text() + "\n", encoding="utf-8")
        write_result(result.best_image, job.output)
        return result
    else:
        image = pipe.edit(load_image(job.source), job.prompt, options, callback=callback, timings=timings)
    write_result(image, job.output)
    return None


def run_batch(pipe: Step1XPipeline, jobs: list[Job], options: EditOptions | None = None, *, width: int = 1024,
              height: int = 1024, skip_existing: bool = False, progress: bool = True,
              report: BatchReport | None = None, reasoning: ReasoningOptions | None = None,
              save_tries: bool = False) -> BatchReport:
    """Run every job; a failing one is recorded with its reason and the run goes on. Ctrl-C stops after
    cleaning up and marks the report interrupted. ``reasoning``/``save_tries``: see :func:`run_job`."""
    options = options or EditOptions()
    options.validate()
    report = report if report is not None else BatchReport()
    reset_peaks(pipe.devices)
    bars = _Bars(len(jobs), progress)
    start = time.perf_counter()
    try:
        for job in jobs:
            if skip_existing and job.output.exists():
                report.results.append(JobResult(job, "skipped"))
                bars.image_done(job.name)
                continue
            t0 = time.perf_counter()
            timings = Timings()
            try:
                outcome = run_job(pipe, job, options, width=width, height=height, callback=bars.step,
                                  timings=timings, reasoning=reasoning, save_tries=save_tries)
            except KeyboardInterrupt:
                report.interrupted = True
                break
            except Exception as exc:  # one bad image must not end the run; the summary gives the reason
                result = JobResult(job, "failed", time.perf_counter() - t0, describe_error(exc), timings)
            else:
                result = JobResult(job, "done", time.perf_counter() - t0, timings=timings)
                if outcome is not None:
                    bars.note(f"{job.name}: {describe_reasoning(outcome)}")
            report.results.append(result)
            bars.image_done(job.name)
    finally:
        bars.close()
        report.seconds = time.perf_counter() - start
        report.peak_memory = peak_report(pipe.devices)
    return report

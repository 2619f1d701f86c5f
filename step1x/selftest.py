"""``step1x selftest``: prove an install works, offline, on the CPU, in seconds.

Builds tiny random models in a temporary folder under the official file names, then edits a generated
image through the same path real weights take: the models folder is resolved, the files are loaded by
the real loaders, the MLLM encodes image + instruction, the connector and DiT sample, the VAE decodes,
and the result is written by the batch runner. The image is noise; the mechanics are what is tested.

``version="v1.2"`` builds a tiny v1.2 model folder in the diffusers layout instead (sharded transformer with
its index, VAE, text encoder with its language-model head, tokenizer in ``processor/``), runs a plain edit,
then the thinking + reflection loop with scripted model replies (two tries), and lets the tiny text encoder
write one real reply.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKENIZER_ENV = "STEP1X_QWEN_TOKENIZER"
PROMPT = 'make the sky purple and write "OK" on the wall'
SIZE_LEVEL = 64
SELFTEST_VERSIONS = ("v1.1", "v1.2")


@dataclass
class SelftestResult:
    ok: bool
    image: Path | None
    tokenizer: str
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: str = ""
    error: str | None = None

    def report(self) -> str:
        lines = [f"tokenizer: {self.tokenizer}"]
        lines += [f"{name:>8}: {seconds:6.2f} s" for name, seconds in self.timings.items()]
        if self.peak_memory:
            lines.append(f"peak memory: {self.peak_memory}")
        if self.ok and self.image is not None and self.image.exists():
            lines.append(f"selftest passed; wrote {self.image}")
        elif self.ok:
            lines.append("selftest passed; the image was written, checked and removed with the temporary folder "
                         "(--output FILE keeps it)")
        else:
            lines.append(f"selftest FAILED: {self.error}")
        return "\n".join(lines)


def find_tokenizer(explicit: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(folder, description) of real Qwen2.5 tokenizer files: ``explicit``, then $STEP1X_QWEN_TOKENIZER,
    then ComfyUI's bundled copy when this package sits inside ComfyUI; (None, ...) when there is none."""
    from .checkpoints.model_files import comfy_tokenizer

    if explicit is not None:
        return Path(explicit), f"{explicit} (--tokenizer)"
    if os.environ.get(TOKENIZER_ENV):
        return Path(os.environ[TOKENIZER_ENV]), f"{os.environ[TOKENIZER_ENV]} (${TOKENIZER_ENV})"
    bundled = comfy_tokenizer(Path(__file__).resolve().parent)
    if bundled is not None:
        return bundled, f"{bundled} (ComfyUI's bundled Qwen2.5 tokenizer)"
    return None, "stand-in built at run time (no Qwen2.5 tokenizer files found; see step1x/tiny_tokenizer.py)"


def test_image(width: int = 96, height: int = 64) -> Image.Image:
    """A smooth colour gradient with a square, so resizes and crops are visible."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    rgb[height // 4: height // 2, width // 4: width // 2] = (240, 240, 40)
    return Image.fromarray(rgb, "RGB")


def _check_output(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as im:
        im.load()
        if im.size != size:
            raise AssertionError(f"the result is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}")
        arr = np.asarray(im.convert("RGB"))
    if arr.std() == 0:
        raise AssertionError("the result is one flat colour; the decoder produced no image")


def _check_reasoning(pipe, source: Image.Image, steps: int, say) -> None:
    """Thinking + reflection with scripted replies (think, refine try 1, accept try 2), then one real reply."""
    from .pipeline import EditOptions
    from .pipeline_v12 import ReasoningOptions
    from .reasoning.scripted import EXAMPLE_SCRIPT, ScriptedGenerator

    options = EditOptions(steps=steps, size_level=SIZE_LEVEL, seed=42)
    script = ScriptedGenerator(EXAMPLE_SCRIPT)
    result = pipe.reason_edit(source, PROMPT, options, ReasoningOptions(max_tries=3), generate=script)
    expected = (2, 1, 11, EXAMPLE_SCRIPT["think_reformat"][0])
    found = (len(result.tries), result.best_index, len(result.calls), result.reformat_prompt)
    if found != expected:
        raise AssertionError(f"the scripted reasoning edit gave (tries, best, replies, instruction) {found}, "
                             f"expected {expected}")
    if result.tries[1].source != 0 or any(t.image.size != source.size for t in result.tries):
        raise AssertionError("the second try did not edit the first try's output at the input size")
    say(f"reasoning edit: {len(result.tries)} tries, {len(result.calls)} scripted replies, best try "
        f"{result.best_index + 1}")
    tokens: list[int] = []
    real = pipe.reason_edit(source, PROMPT, options, ReasoningOptions(reflect=False, max_new_tokens=4),
                            on_token=lambda done, total: tokens.append(done))
    if len(real.calls) != 1 or not tokens:
        raise AssertionError(f"the tiny text encoder generated no tokens: {real.calls}")
    reply = real.calls[0].reply
    say(f"the tiny text encoder generated {tokens[-1]} tokens"
        + (f": {reply!r}" if reply else " (outside the stand-in tokenizer's small vocabulary, so no text)"))


def run_selftest(*, tokenizer: str | os.PathLike | None = None, keep: str | os.PathLike | None = None,
                 output: str | os.PathLike | None = None, device: str = "cpu", steps: int = 4,
                 version: str = "v1.1", say=print) -> SelftestResult:
    """Run the whole pipeline on tiny models. ``keep``: build in this folder and leave everything there
    (otherwise a temporary folder is used and removed); ``output``: also copy the result image there.
    ``version``: "v1.1" (the official single files) or "v1.2" (a diffusers-layout model folder, plain and
    reasoning edits)."""
    if version not in SELFTEST_VERSIONS:
        raise ValueError(f"unknown self-test version {version!r}; choose one of {list(SELFTEST_VERSIONS)}")
    from .batch import run_batch
    from .checkpoints.model_files import MODEL_FOLDERS
    from .encoder.tokens import load_tokenizer
    from .jobs import edit_jobs, prepare_output_dir
    from .pipeline import EditOptions, Step1XPipeline
    from .tiny import build_tiny_model_folder, build_tiny_models
    from .tiny_tokenizer import write_tiny_tokenizer

    token_dir, token_source = find_tokenizer(tokenizer)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="step1x-selftest-"))
    timings: dict[str, float] = {}
    result = SelftestResult(False, None, token_source)
    start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        if token_dir is None:
            token_dir = write_tiny_tokenizer(work / "tokenizer")
        else:
            load_tokenizer(token_dir)
        if version == "v1.2":
            build_tiny_model_folder(work / "models" / MODEL_FOLDERS["v1.2"][1], token_dir, version="v1.2")
        else:
            build_tiny_models(work / "models", token_dir)
        timings["build"] = time.perf_counter() - t0
        say(f"built tiny {version} models in {work / 'models'}")

        t0 = time.perf_counter()
        pipe = Step1XPipeline.from_folder(work / "models", device=device, compute_dtype=torch.float32,
                                          generation=version == "v1.2")
        timings["load"] = time.perf_counter() - t0
        if pipe.version != version:
            raise AssertionError(f"the tiny DiT was read as {pipe.version}, expected {version}")

        source = test_image()
        (work / "input").mkdir(parents=True, exist_ok=True)
        source.save(work / "input" / "gradient.png")
        jobs = edit_jobs(work / "input", {"gradient.png": PROMPT}, work / "output")
        prepare_output_dir(work / "output", jobs, work / "input")
        report = run_batch(pipe, jobs, EditOptions(steps=steps, size_level=SIZE_LEVEL, seed=42), progress=False)
        if not report.ok:
            raise AssertionError(report.results[0].error)
        stage = report.results[0].timings
        timings.update(encode=stage.encode_s, sample=stage.sample_s, decode=stage.decode_s)
        _check_output(jobs[0].output, source.size)
        result.image = jobs[0].output
        if version == "v1.2":
            t0 = time.perf_counter()
            _check_reasoning(pipe, source, steps, say)
            timings["reason"] = time.perf_counter() - t0
        if output is not None:
            result.image = Path(output)
            result.image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(jobs[0].output, result.image)
        timings["total"] = time.perf_counter() - start
        result.ok, result.peak_memory = True, report.peak_memory
    except Exception as exc:  # the report must say what broke, whatever it was
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.timings = timings
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return result

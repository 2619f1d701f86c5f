"""The think → edit → reflect → retry loop of Step1X-Edit v1.2, with the reference's retry and best-image rules.

The edit itself is a callable, ``edit_fn(image, instruction, try_index) -> image``, so the loop runs with any
editor (the v1.2 pipeline, a test double). It must return the edited image at the input image's size, as the
reference resizes its output back before reflecting.

Rules (reference ``Step1XEditPipeline_v1p2.__call__``):
* Thinking rewrites the instruction once, from the original image. That prompt (or the user's, without
  thinking) is what every reflection judges; it is never replaced by a refine prompt.
* With reflection, tries continue until a reflection says ``<#Success>``/``<#Others>`` or ``max_tries`` edits
  were made. After ``<#Reflection> …`` the next try edits the *previous output* with that text; otherwise
  (``<#Failed>`` or an unreadable reflection) it starts again from the original image with the first prompt.
* Without reflection there is exactly one edit.
* Best image: ``min(score1) × min(score2)`` per try; a strictly larger score wins; on a tie a try whose
  reflection holds ``<#Success>`` beats one without, otherwise the later try wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from . import prompts as P
from .generation import ReasoningCancelled
from .parsers import score_floor
from .thinker import CallRecord, ReflectResult, Thinker, ThinkResult

EditFn = Callable[[Image.Image, str, int], Image.Image]
"""``edit_fn(image, instruction, try_index) -> edited image`` (same size as the input image)."""

STAGES = ("think", "edit", "reflect")


@dataclass(frozen=True)
class TryRecord:
    index: int
    source: int | None
    """None when this try edited the original image, k when it edited try k's output."""
    instruction: str
    image: Image.Image
    reflection: ReflectResult | None
    calls: tuple[CallRecord, ...]
    """The generate() calls of this try's reflection (empty without reflection)."""


@dataclass
class ReasonEditResult:
    tries: list[TryRecord]
    best_index: int
    think: ThinkResult | None
    """The thinking step (None without thinking)."""
    reflect: bool
    calls: list[CallRecord] = field(default_factory=list)
    """Every generate() call of the run, in order (thinking first)."""

    @property
    def images(self) -> list[Image.Image]:
        """Every try's edited image, in order (the reference's ``images``)."""
        return [t.image for t in self.tries]

    @property
    def best_image(self) -> Image.Image:
        """The chosen image (the reference's ``final_images[0]``)."""
        return self.tries[self.best_index].image

    @property
    def reformat_prompt(self) -> str | None:
        """The instruction after thinking (None without thinking)."""
        return self.think.instruction if self.think is not None else None

    @property
    def think_info(self) -> list[str] | None:
        """Each try's reflection text; [] with thinking only; None with neither thinking nor reflection."""
        if not self.reflect:
            return [] if self.think is not None else None
        return [t.reflection.reflection for t in self.tries]

    @property
    def best_info(self) -> list[dict[str, Any]] | None:
        """Each try's ``{"score1": …, "score2": …}``, shaped like ``think_info``."""
        if not self.reflect:
            return [] if self.think is not None else None
        return [t.reflection.best_info for t in self.tries]

    @property
    def success(self) -> bool:
        return bool(self.tries) and self.tries[-1].reflection is not None and self.tries[-1].reflection.success

    def calls_per_try(self) -> list[int]:
        """generate() calls spent on each try's reflection (5 normally, up to 5 × retries)."""
        return [len(t.calls) for t in self.tries]

    def reasoning_text(self) -> str:
        """A readable account of the run: the rewritten instruction, each try's reflection and scores, the pick."""
        lines = []
        if self.think is not None:
            lines.append(f"Thinking: {self.think.reasoning}")
        for t in self.tries:
            source = "the original image" if t.source is None else f"the output of try {t.source + 1}"
            lines.append(f"Try {t.index + 1}: edited {source} with {t.instruction!r}.")
            r = t.reflection
            if r is not None:
                lines.append(f"  Reflection ({r.verdict}): {r.reflection}")
                lines.append(
                    f"  Scores: success/over-editing {r.score1.get('score')}, naturalness/artifacts "
                    f"{r.score2.get('score')} -> {r.score:g}"
                )
                lines.append(f"  generate() calls: {len(t.calls)}")
        if self.reflect:
            lines.append(f"Best: try {self.best_index + 1} of {len(self.tries)}.")
        return "\n".join(lines)


def pick_best(reflections: Sequence[ReflectResult]) -> int:
    """The index of the try the reference keeps (see the module docstring)."""
    if not reflections:
        raise ValueError("no tries to choose from")
    best, best_score, best_success = 0, -1.0, False
    for index, r in enumerate(reflections):
        score = score_floor(r.score1) * score_floor(r.score2)
        has_success = P.TAG_SUCCESS in r.reflection
        if score > best_score:
            best, best_score, best_success = index, score, has_success
        elif score == best_score:
            if has_success and not best_success:
                best, best_success = index, True
            elif has_success == best_success:
                best = index
    return best


def reason_edit(
    image: Image.Image,
    instruction: str,
    edit_fn: EditFn,
    thinker: Thinker | None = None,
    *,
    think: bool = False,
    reflect: bool = True,
    max_tries: int = 3,
    should_stop: Callable[[], bool] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> ReasonEditResult:
    """Edit ``image`` by ``instruction`` with optional thinking and reflection.

    thinker: needed when ``think`` or ``reflect`` is on.
    think, reflect: the reference's defaults (thinking off, reflection on); both on is the published
        "thinking + reflection" setting, both off a plain single edit.
    max_tries: edits at most (default 3, as the reference); must be at least 1.
    should_stop: checked before every stage; True raises ``ReasoningCancelled``. (Pass it to the generator
        and the editor as well to stop inside a generate() call or a denoising run.)
    on_stage: ``(stage, try_index)`` before each stage, stage in ``think``/``edit``/``reflect``.
    """
    _check_args(image, instruction, thinker, think, reflect, max_tries)
    first_call = len(thinker.calls) if thinker is not None else 0

    def stage(name: str, index: int) -> None:
        if should_stop is not None and should_stop():
            raise ReasoningCancelled(f"the reasoning edit was cancelled before {name} (try {index + 1})")
        if on_stage is not None:
            on_stage(name, index)

    thought = None
    prompt = instruction
    if think:
        stage("think", 0)
        thought = thinker.think(image, instruction)
        prompt = thought.instruction
    first_prompt = prompt
    tries: list[TryRecord] = []
    current, source = image, None
    while len(tries) < (max_tries if reflect else 1):
        index = len(tries)
        stage("edit", index)
        edited = edit_fn(current, prompt, index)
        if not isinstance(edited, Image.Image):
            raise TypeError(f"edit_fn returned {type(edited).__name__} for try {index + 1}; it must return a PIL image")
        if not reflect:
            tries.append(TryRecord(index, source, prompt, edited, None, ()))
            break
        stage("reflect", index)
        before = len(thinker.calls)
        judged = thinker.reflect(image, edited, first_prompt)
        tries.append(TryRecord(index, source, prompt, edited, judged, tuple(thinker.calls[before:])))
        if judged.success:
            break
        if judged.refine_prompt is not None:
            current, source, prompt = edited, index, judged.refine_prompt
        else:
            current, source, prompt = image, None, first_prompt
    best = pick_best([t.reflection for t in tries]) if reflect else 0
    calls = list(thinker.calls[first_call:]) if thinker is not None else []
    return ReasonEditResult(tries=tries, best_index=best, think=thought, reflect=reflect, calls=calls)


def _check_args(image, instruction, thinker, think, reflect, max_tries) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"the image must be a PIL image, got {type(image).__name__}; convert ComfyUI IMAGE tensors with "
            "step1x.image_io.comfy_to_pil."
        )
    if not isinstance(instruction, str):
        raise TypeError(f"the instruction must be a string, got {type(instruction).__name__}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(
            f"max_tries must be at least 1 (it counts edits, the first one included), got {max_tries!r}; use 1 "
            "to reflect once without retrying."
        )
    if (think or reflect) and thinker is None:
        raise ValueError("thinking and reflection need a Thinker (a text encoder that can generate); pass thinker=")

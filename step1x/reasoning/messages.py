"""The six chat calls of v1.2's thinking and reflection, and their chat-template text.

Each call is one system turn plus one user turn of images and text, in the reference's order (the
consistency evaluation puts its text *before* the image; the others put the images first). The chat text is
the Qwen2.5-VL template without "Picture N:" labels and without the default system turn (every call has its
own system prompt). Images stay as given here; ``inputs.py`` turns a call into token ids and pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..encoder.template import GENERATION_PROMPT, IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START
from . import prompts as P
from .parsers import analyze_text

THINK = "think_reformat"
DESCRIBE = "descriptions"
EVALUATE = "evaluate_consistency"
REFLECT = "reflection"
SCORE1 = "score1"
SCORE2 = "score2"
CALL_KINDS = (THINK, DESCRIBE, EVALUATE, REFLECT, SCORE1, SCORE2)

REFERENCE_MAX_TOKENS = {THINK: 512, DESCRIBE: 768, EVALUATE: 1024, REFLECT: 768, SCORE1: 768, SCORE2: 768}
"""The ``max_tokens`` the reference passes per call. Its client ignores them and always generates at most 128
new tokens; ``GenerationSettings(max_new_tokens=None)`` uses these budgets instead."""

IMAGE_SLOT = f"{VISION_START}{IMAGE_PAD}{VISION_END}"

_PLACEHOLDER = re.compile(r"\{(instruction|language|description|score|reason)\}")


def fill(template: str, **values: str) -> str:
    """Fill a prompt template's placeholders in one pass, so braces or placeholder names inside the values
    (a user's instruction, a model's description) are inserted literally."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"the prompt template needs a value for {{{name}}}")
        return values[name]

    return _PLACEHOLDER.sub(value, template)


@dataclass(frozen=True)
class ChatCall:
    """One generate() call: which step it is, the system prompt and the user turn's parts in order
    (``str`` for text, ``PIL.Image.Image`` for an image)."""

    kind: str
    system: str
    parts: tuple[str | Image.Image, ...]

    def __post_init__(self):
        for part in self.parts:
            if not isinstance(part, (str, Image.Image)):
                raise TypeError(
                    f"thinking/reflection images must be PIL images, got {type(part).__name__}; convert ComfyUI "
                    "IMAGE tensors with step1x.image_io.comfy_to_pil."
                )

    @property
    def images(self) -> list[Image.Image]:
        return [part for part in self.parts if isinstance(part, Image.Image)]

    @property
    def user_text(self) -> str:
        return "".join(part for part in self.parts if isinstance(part, str))

    @property
    def reference_max_tokens(self) -> int:
        return REFERENCE_MAX_TOKENS[self.kind]


def chat_text(call: ChatCall, image_slots: list[str] | None = None) -> str:
    """The templated string of a call. ``image_slots`` replaces each image's
    ``<|vision_start|><|image_pad|><|vision_end|>`` (used to expand the pads to the image's token count)."""
    slots = iter(image_slots) if image_slots is not None else None
    user = []
    for part in call.parts:
        if isinstance(part, str):
            user.append(part)
        else:
            user.append(next(slots) if slots is not None else IMAGE_SLOT)
    return (
        f"{IM_START}system\n{call.system}{IM_END}\n"
        f"{IM_START}user\n{''.join(user)}{IM_END}\n"
        f"{GENERATION_PROMPT}"
    )


def think_call(source: Image.Image, instruction: str) -> ChatCall:
    """Rewrite the instruction into a clear, standard one (the "thinking" step)."""
    user = fill(P.THINK_USER, instruction=instruction, language=analyze_text(instruction))
    return ChatCall(THINK, P.THINK_SYSTEM, (source, user))


def describe_call(source: Image.Image, instruction: str) -> ChatCall:
    """Describe the image the instruction should produce from the source image."""
    language = analyze_text(instruction)
    system = fill(P.DESCRIBE_SYSTEM, language=language)
    user = fill(P.DESCRIBE_USER, instruction=instruction, language=language)
    return ChatCall(DESCRIBE, system, (source, user))


def evaluate_call(edited: Image.Image, instruction: str, description: str) -> ChatCall:
    """Score how well the edited image matches the description, as JSON (text first, then the image)."""
    user = fill(P.EVALUATE_USER, instruction=instruction, language=analyze_text(instruction), description=description)
    return ChatCall(EVALUATE, P.EVALUATE_SYSTEM, (user, edited))


def reflect_call(source: Image.Image, edited: Image.Image, instruction: str, evaluation: dict[str, Any]) -> ChatCall:
    """Judge the edit: ``<#Think> … <#Success|Failed|Reflection …|Others>``, with the evaluation as a prior."""
    score = evaluation.get("score", evaluation.get("raw_score", P.PRIOR_SCORE_MISSING))
    reason = evaluation.get("reason", P.PRIOR_REASON_MISSING)
    user = fill(P.REFLECT_USER, instruction=instruction, score=str(score), reason=str(reason))
    return ChatCall(REFLECT, P.REFLECT_SYSTEM, (source, edited, user))


def score1_call(source: Image.Image, edited: Image.Image, instruction: str) -> ChatCall:
    """Score [editing success, over-editing] of the edited image against the source and the instruction."""
    return ChatCall(SCORE1, P.SCORE1_SYSTEM, (source, edited, fill(P.SCORE1_USER, instruction=instruction)))


def score2_call(edited: Image.Image) -> ChatCall:
    """Score [naturalness, artifacts] of the edited image alone (the instruction is not shown)."""
    return ChatCall(SCORE2, P.SCORE2_SYSTEM, (edited, P.SCORE2_USER))

"""Reading the model's replies, with the v1.2 reference's exact rules.

Two different checks look at a reflection. ``check_reflection`` decides whether the reflection step accepts
a reply (``<#Think>`` somewhere, then exactly one verdict tag, once); it keeps the text from ``<#Think>`` on.
``read_verdict`` then decides what the loop does with the accepted text, and is stricter: the text must
*start* with ``<#Think>`` and hold exactly one tag in total, otherwise it is neither a success nor a refine
prompt. Both are reproduced as they are, including where they disagree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import prompts as P

_CJK = re.compile(r"[\u4e00-\u9fff]")
_JSON_BLOCK = re.compile(r"\{.*\}", flags=re.S)


def analyze_text(text: str) -> str:
    """The language word for the prompts: Chinese when ``text`` holds more than one CJK character."""
    count = len(_CJK.findall(text)) if isinstance(text, str) else 0
    return P.LANGUAGE_CHINESE if count > 1 else P.LANGUAGE_ENGLISH


def is_error_reply(text: str) -> bool:
    """A reply the reference rejects as an error report (it starts with ``错误:``)."""
    return text.startswith(P.ERROR_PREFIX)


# ------------------------------------------------------------------------------------------------ reflection

REFLECTION_OK = "ok"
MISSING_THINK = "missing_think"
TAG_COUNT = "tag_count"
REPEATED_TAG = "repeated_tag"
TAG_BEFORE_THINK = "tag_before_think"


@dataclass(frozen=True)
class ReflectionCheck:
    valid: bool
    text: str
    """The reply from ``<#Think>`` on, stripped, when valid; otherwise an explanation."""
    problem: str = REFLECTION_OK
    """``ok`` or one of ``missing_think``, ``tag_count``, ``repeated_tag``, ``tag_before_think``."""


def check_reflection(text: str) -> ReflectionCheck:
    """Whether the reflection step accepts ``text`` (it retries the call otherwise)."""
    think = text.find(P.TAG_THINK)
    if think < 0:
        return ReflectionCheck(False, f"the reply has no {P.TAG_THINK} tag", MISSING_THINK)
    present = [tag for tag in P.VERDICT_TAGS if tag in text]
    if len(present) != 1:
        return ReflectionCheck(
            False, f"the reply must hold exactly one of {', '.join(P.VERDICT_TAGS)}; it holds {len(present)}",
            TAG_COUNT,
        )
    tag = present[0]
    if text.count(tag) > 1:
        return ReflectionCheck(False, f"the reply holds {tag} more than once", REPEATED_TAG)
    if text.find(tag) < think:
        return ReflectionCheck(False, f"{tag} comes before {P.TAG_THINK}", TAG_BEFORE_THINK)
    return ReflectionCheck(True, text[think:].strip())


def is_well_formed(text: str) -> bool:
    """The loop's format check: starts with ``<#Think>``, one ``<#Think>``, exactly one verdict tag in all."""
    if not text.startswith(P.TAG_THINK) or text.count(P.TAG_THINK) != 1:
        return False
    return sum(text.count(tag) for tag in P.VERDICT_TAGS) == 1


@dataclass(frozen=True)
class Verdict:
    success: bool
    refine_prompt: str | None
    """The text after ``<#Reflection>``, not stripped (its leading space is kept), or None."""


def read_verdict(text: str) -> Verdict:
    """What the loop does with an accepted reflection: ``<#Success>``/``<#Others>`` stop it, ``<#Reflection>``
    gives the next try's instruction, ``<#Failed>`` or a malformed text gives neither."""
    if not is_well_formed(text):
        return Verdict(False, None)
    if P.TAG_REFLECTION in text:
        return Verdict(False, text.split(P.TAG_REFLECTION)[1])
    return Verdict(P.TAG_SUCCESS in text or P.TAG_OTHERS in text, None)


# ------------------------------------------------------------------------------------------------ evaluation


def parse_json_block(text: str) -> dict[str, Any] | None:
    """The JSON object from the first ``{`` to the last ``}`` of a reply, or None when absent or invalid."""
    match = _JSON_BLOCK.search(text)
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def apply_score_caps(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Finalise a consistency evaluation: the 0..10 score capped by the reported problems.

    A raw score in [0, 1] is read as a fraction (×10), then clamped to 0..10. Caps: "no" → 2, "partial" → 5;
    two or more major conflicts → 5, one → 8; hallucinations or omissions → 7; anything short of a clean
    "yes" → 8.99. The score is ``min(raw, cap)`` to 4 decimals. None when a count or the score is not a
    number (the step is retried)."""
    try:
        meets = str(obj.get("meets_instruction", "")).strip().lower()
        major = int(obj.get("major_conflicts", 0) or 0)
        minor = int(obj.get("minor_conflicts", 0) or 0)
        hallucinations = int(obj.get("hallucinations", 0) or 0)
        omissions = int(obj.get("omissions", 0) or 0)
        raw = float(obj.get("raw_score", 0))
        reason = str(obj.get("reason", "")).strip()
    except (TypeError, ValueError, OverflowError):
        return None
    if 0 <= raw <= 1.0000001:
        raw *= 10.0
    raw = max(0.0, min(10.0, raw))
    cap = 10.0
    trace: list[str] = []
    if meets == "no":
        cap = min(cap, 2.0)
        trace.append("cap<=2: instruction not met")
    elif meets == "partial":
        cap = min(cap, 5.0)
        trace.append("cap<=5: instruction partly met")
    if major >= 2:
        cap = min(cap, 5.0)
        trace.append("cap<=5: several major conflicts")
    elif major == 1:
        cap = min(cap, 8.0)
        trace.append("cap<=8: one major conflict")
    if hallucinations > 0 or omissions > 0:
        cap = min(cap, 7.0)
        why = []
        if hallucinations > 0:
            why.append(f"hallucinations x{hallucinations}")
        if omissions > 0:
            why.append(f"omissions x{omissions}")
        trace.append(f"cap<=7: {', '.join(why)}")
    if meets != "yes" or major > 0 or hallucinations > 0 or omissions > 0:
        cap = min(cap, 8.99)
        trace.append("cap<9: visible differences or problems")
    return {
        "score": float(f"{min(raw, cap):.4f}"),
        "raw_score": raw,
        "cap_trace": trace,
        "meets_instruction": meets,
        "major_conflicts": major,
        "minor_conflicts": minor,
        "hallucinations": hallucinations,
        "omissions": omissions,
        "reason": reason,
    }


# ----------------------------------------------------------------------------------------------------- scores


def parse_score_reply(text: str) -> dict[str, Any] | None:
    """A score1/score2 reply: JSON with a ``score`` list and a ``reasoning``, or None (the step retries).

    A leading fenced block is removed by fixed offsets, as the reference does: after stripping, text starting
    ```` ```json ```` loses its first 7 and last 3 characters, text starting ```` ``` ```` its first and last 3."""
    content = text.strip()
    if content.startswith("```json"):
        content = content[7:-3].strip()
    elif content.startswith("```"):
        content = content[3:-3].strip()
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and "score" in value and "reasoning" in value and isinstance(value["score"], list):
        return value
    return None


def score_floor(score: dict[str, Any]) -> float:
    """The smallest entry of a score list, as the best-image rule uses it.

    The reference crashes on an empty list (``min([])``) and on non-numeric entries; here a list that is
    empty or holds something that is not a number counts as the fallback score 0. Numeric strings count as
    their number."""
    values = score.get("score") if isinstance(score, dict) else None
    if not isinstance(values, list) or not values:
        return 0.0
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            return 0.0
    return min(numbers)

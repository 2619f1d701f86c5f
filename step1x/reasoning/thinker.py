"""Thinking (rewrite the instruction) and reflection (judge and score an edit), step by step as the v1.2
reference runs them, on any ``GenerateFn``.

A reflection is five steps, each one generate() call when the reply is usable:
descriptions → consistency evaluation → reflection, then score1 and score2. A step whose reply is not
usable asks again, up to ``retries`` times (20 in the reference). When one of the first three steps runs
out, the reflection becomes the fixed ``<#Failed>`` text and the rest of those three is skipped; a
scoring step that runs out scores ``[0, 0]``. So one reflection costs 5 calls normally, 61 when every reply
is unusable (1 description + 20 evaluations + 20 + 20 scores), and at most ``5 × retries`` = 100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from . import messages as M
from . import prompts as P
from .generation import GenerateFn, ReasoningCancelled
from .parsers import (
    apply_score_caps,
    check_reflection,
    is_error_reply,
    is_well_formed,
    parse_json_block,
    parse_score_reply,
    read_verdict,
    score_floor,
)

RETRIES = 20


@dataclass(frozen=True)
class CallRecord:
    """One generate() call: its kind, the stripped reply, and whether the step accepted it."""

    kind: str
    reply: str
    accepted: bool


@dataclass(frozen=True)
class ThinkResult:
    instruction: str
    """The rewritten instruction; the original one when the reply was empty or an error report."""
    reply: str
    """The model's (stripped) reply."""
    rewritten: bool
    """False when the original instruction was kept."""

    @property
    def reasoning(self) -> str:
        if self.rewritten:
            return f"Rewritten instruction: {self.instruction}"
        return f"The rewrite was not usable ({self.reply!r}); the original instruction is kept: {self.instruction}"


@dataclass(frozen=True)
class ReflectResult:
    reflection: str
    """The accepted reflection text (from ``<#Think>`` on) or the fixed failure text."""
    success: bool
    """``<#Success>`` or ``<#Others>``: the loop stops."""
    refine_prompt: str | None
    """The instruction after ``<#Reflection>`` (leading space kept), for editing the edited image again."""
    score1: dict[str, Any]
    """``{"score": [editing success, over-editing], "reasoning": …}`` (0–10 each)."""
    score2: dict[str, Any]
    """``{"score": [naturalness, artifacts], "reasoning": …}`` (0–10 each)."""
    description: str | None
    """The description step's reply (None when it ran out of attempts)."""
    evaluation: dict[str, Any] | None
    """The finalised consistency evaluation (None when it was not reached or ran out of attempts)."""
    calls: tuple[CallRecord, ...]

    @property
    def score(self) -> float:
        """min(score1) × min(score2), 0–100: the number the best-image rule compares."""
        return score_floor(self.score1) * score_floor(self.score2)

    @property
    def verdict(self) -> str:
        """``success``, ``others``, ``refine``, ``failed`` or ``invalid`` (a text the loop cannot read)."""
        if self.refine_prompt is not None:
            return "refine"
        if self.success:
            return "others" if P.TAG_OTHERS in self.reflection else "success"
        if is_well_formed(self.reflection) and P.TAG_FAILED in self.reflection:
            return "failed"
        return "invalid"

    @property
    def best_info(self) -> dict[str, Any]:
        """The reference's ``best_info`` entry for this try."""
        return {"score1": self.score1, "score2": self.score2}


class _Rejected(Exception):
    """A reply the step cannot use; the step asks again."""


@dataclass
class Thinker:
    """v1.2's thinker on ``generate`` (a ``QwenGenerator`` or any ``(ChatCall) -> str``).

    retries: attempts per step before its fallback (the reference: 20).
    should_stop: checked before every call; True raises ``ReasoningCancelled``.
    on_call: told about every call after its reply was judged (for logs and progress).
    """

    generate: GenerateFn
    retries: int = RETRIES
    should_stop: Callable[[], bool] | None = None
    on_call: Callable[[CallRecord], None] | None = None
    calls: list[CallRecord] = field(default_factory=list)
    """Every call made so far, in order."""

    def __post_init__(self):
        if not isinstance(self.retries, int) or self.retries < 1:
            raise ValueError(f"retries must be a positive integer, got {self.retries!r}")

    # ---------------------------------------------------------------------------------------------- think

    def think(self, image: Image.Image, instruction: str) -> ThinkResult:
        """Rewrite ``instruction`` for ``image`` (one call, no retries, as in the reference).

        The reference aborts the edit on a reply that starts with ``错误:``; here such a reply, or an empty
        one, keeps the original instruction instead."""
        _check_instruction(instruction)
        reply, rewritten = self._ask(M.think_call(image, instruction), _accept_rewrite)
        if rewritten is None:
            return ThinkResult(instruction, reply, False)
        return ThinkResult(rewritten, reply, True)

    # -------------------------------------------------------------------------------------------- reflect

    def reflect(self, reference: Image.Image, result: Image.Image, instruction: str) -> ReflectResult:
        """Judge ``result`` (an edit of ``reference`` by ``instruction``) and score it."""
        _check_instruction(instruction)
        start = len(self.calls)
        reflection = P.FAILED_REFLECTION
        evaluation = None
        description = self._retry(lambda: M.describe_call(reference, instruction), _accept_description)
        if description is not None:
            evaluation = self._retry(lambda: M.evaluate_call(result, instruction, description), _accept_evaluation)
        if evaluation is not None:
            accepted = self._retry(
                lambda: M.reflect_call(reference, result, instruction, evaluation), _accept_reflection
            )
            if accepted is not None:
                reflection = accepted
        score1 = self._retry(lambda: M.score1_call(reference, result, instruction), _accept_score)
        score2 = self._retry(lambda: M.score2_call(result), _accept_score)
        verdict = read_verdict(reflection)
        return ReflectResult(
            reflection=reflection,
            success=verdict.success,
            refine_prompt=verdict.refine_prompt,
            score1=score1 if score1 is not None else _failed_score(M.SCORE1, self.retries),
            score2=score2 if score2 is not None else _failed_score(M.SCORE2, self.retries),
            description=description,
            evaluation=evaluation,
            calls=tuple(self.calls[start:]),
        )

    # ------------------------------------------------------------------------------------------- plumbing

    def _retry(self, build: Callable[[], M.ChatCall], accept: Callable[[str], Any]) -> Any:
        """Ask until ``accept`` takes a reply (its value is returned) or the attempts run out (None)."""
        for _ in range(self.retries):
            _, value = self._ask(build(), accept)
            if value is not None:
                return value
        return None

    def _ask(self, call: M.ChatCall, accept: Callable[[str], Any]) -> tuple[str, Any]:
        if self.should_stop is not None and self.should_stop():
            raise ReasoningCancelled("thinking/reflection was cancelled")
        reply = self.generate(call)
        if not isinstance(reply, str):
            raise TypeError(
                f"the generate function returned {type(reply).__name__} for the {call.kind} call; it must return str"
            )
        reply = reply.strip()
        try:
            value = accept(reply)
        except _Rejected:
            value = None
        record = CallRecord(call.kind, reply, value is not None)
        self.calls.append(record)
        if self.on_call is not None:
            self.on_call(record)
        return reply, value


def _check_instruction(instruction: str) -> None:
    if not isinstance(instruction, str):
        raise TypeError(f"the instruction must be a string, got {type(instruction).__name__}")


def _accept_rewrite(reply: str) -> str:
    if not reply or is_error_reply(reply):
        raise _Rejected
    return reply


def _accept_description(reply: str) -> str:
    if is_error_reply(reply):
        raise _Rejected
    return reply


def _accept_evaluation(reply: str) -> dict[str, Any]:
    if is_error_reply(reply):
        raise _Rejected
    obj = parse_json_block(reply)
    evaluation = apply_score_caps(obj) if obj is not None else None
    if evaluation is None:
        raise _Rejected
    return evaluation


def _accept_reflection(reply: str) -> str:
    check = check_reflection(reply)
    if not check.valid:
        raise _Rejected
    return check.text


def _accept_score(reply: str) -> dict[str, Any]:
    value = parse_score_reply(reply)
    if value is None:
        raise _Rejected
    return value


def _failed_score(step: str, attempts: int) -> dict[str, Any]:
    return {"score": list(P.FAILED_SCORE), "reasoning": P.FAILED_SCORE_REASONING.format(step=step, attempts=attempts)}

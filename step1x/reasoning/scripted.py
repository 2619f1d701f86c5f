"""A scripted stand-in for the model's replies: the self-test and the tests run the whole reasoning loop with it.

``ScriptedGenerator(script)`` is a ``GenerateFn``: the n-th call of a kind gets that kind's n-th reply, the last
one repeating (so one reply serves every call of its kind). Every call and reply is kept.
"""

from __future__ import annotations

from collections import defaultdict

from .messages import CALL_KINDS, ChatCall

EXAMPLE_SCRIPT = {
    "think_reformat": ["Make the sky purple and keep everything else unchanged."],
    "descriptions": ["A colour gradient with a yellow square in the upper left."],
    "evaluate_consistency": ['{"meets_instruction": "partial", "major_conflicts": 0, "minor_conflicts": 1, '
                             '"omissions": 0, "raw_score": 7, "reason": "the sky is only partly purple"}'],
    "reflection": ["<#Think> Only part of the sky turned purple.<#Reflection> Make the rest of the sky purple.",
                   "<#Think> The sky is purple now and nothing else changed.<#Success>"],
    "score1": ['{"score": [6, 9], "reasoning": "half done"}', '{"score": [9, 9], "reasoning": "done"}'],
    "score2": ['{"score": [8, 8], "reasoning": "natural"}'],
}
"""Think once, refine the first try, accept the second (two edits, ten reflection replies)."""


class ScriptedGenerator:
    """Answers each call kind from ``script`` (kind -> replies); unknown kinds raise ``KeyError``."""

    def __init__(self, script: dict[str, list[str]]):
        unknown = sorted(set(script) - set(CALL_KINDS))
        if unknown:
            raise KeyError(f"the script names unknown call kinds {unknown}; the kinds are {list(CALL_KINDS)}")
        self.script = script
        self.calls: list[ChatCall] = []
        self.replies: list[str] = []
        self.counts: dict[str, int] = defaultdict(int)

    def __call__(self, call: ChatCall) -> str:
        replies = self.script.get(call.kind)
        if not replies:
            raise KeyError(f"the script has no reply for a {call.kind} call")
        reply = replies[min(self.counts[call.kind], len(replies) - 1)]
        self.counts[call.kind] += 1
        self.calls.append(call)
        self.replies.append(reply)
        return reply

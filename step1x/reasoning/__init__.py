"""Step1X-Edit v1.2 (ReasonEdit-S) thinking and reflection: rewrite an instruction, judge and score an edit,
and the think → edit → reflect → retry loop, faithful to the v1.2 reference.

Pure PyTorch + transformers. The model replies come from a ``GenerateFn`` (``(ChatCall) -> str``):
``QwenGenerator`` on a loaded Qwen2.5-VL with its language-model head, or any stand-in.
"""

from .generation import (
    CannotGenerateError,
    GenerateFn,
    GenerationSettings,
    QwenGenerator,
    ReasoningCancelled,
    check_can_generate,
)
from .inputs import ModelInputs, build_model_inputs
from .loop import EditFn, ReasonEditResult, TryRecord, pick_best, reason_edit
from .messages import CALL_KINDS, ChatCall
from .parsers import analyze_text, read_verdict
from .thinker import CallRecord, ReflectResult, Thinker, ThinkResult

__all__ = [
    "CALL_KINDS",
    "CallRecord",
    "CannotGenerateError",
    "ChatCall",
    "EditFn",
    "GenerateFn",
    "GenerationSettings",
    "ModelInputs",
    "QwenGenerator",
    "ReasonEditResult",
    "ReasoningCancelled",
    "ReflectResult",
    "ThinkResult",
    "Thinker",
    "TryRecord",
    "analyze_text",
    "build_model_inputs",
    "check_can_generate",
    "pick_best",
    "read_verdict",
    "reason_edit",
]

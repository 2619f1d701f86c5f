"""State-dict key names of Qwen2.5-VL across checkpoint layouts and transformers releases.

Canonical names are those of the published checkpoint, transformers 4.49-4.51 and ComfyUI's
``text_encoders`` files: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``visual.*``,
``lm_head``. transformers >= 4.52 names the same tensors ``model.language_model.*`` and ``model.visual.*``.
"""

from __future__ import annotations

NEW_TEXT = "model.language_model."
NEW_VISUAL = "model.visual."
OLD_TEXT = "model."
OLD_VISUAL = "visual."
ANCHORS = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight")
"""Embedding-table names, the longer first: the short one is also a suffix of the long one."""

DROPPED = ("lm_head.",)
"""Tensors the encoder never uses (it reads the final-norm hidden state, not logits)."""


def canonical(key: str) -> str:
    if key.startswith(NEW_TEXT):
        return OLD_TEXT + key[len(NEW_TEXT) :]
    if key.startswith(NEW_VISUAL):
        return OLD_VISUAL + key[len(NEW_VISUAL) :]
    return key


def for_model(key: str, new_layout: bool) -> str:
    """Canonical key -> the name the installed transformers model uses."""
    if not new_layout:
        return key
    if key.startswith(OLD_VISUAL):
        return NEW_VISUAL + key[len(OLD_VISUAL) :]
    if key.startswith(OLD_TEXT):
        return NEW_TEXT + key[len(OLD_TEXT) :]
    return key


def uses_new_layout(model_keys) -> bool:
    return any(k.startswith(NEW_TEXT) for k in model_keys)


def find_prefix(keys) -> str | None:
    """The prefix in front of the model's own names (e.g. a wrapper's ``qwen25_7b.transformer.``),
    '' when there is none, None when no embedding table is found at all."""
    keys = list(keys)
    for anchor in ANCHORS:
        for key in keys:
            if key.endswith(anchor):
                return key[: -len(anchor)]
    return None


def is_dropped(key: str) -> bool:
    return key.startswith(DROPPED)

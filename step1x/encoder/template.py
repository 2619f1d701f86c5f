"""The text side of the official Step1X-Edit prompt: chat layout and the quote-splitting rule.

The official encoder renders one user turn ``[prefix text, image, instruction]`` with the Qwen2.5-VL
chat template (default system turn, generation prompt, no "Picture 1: " label), then re-tokenises that
string piece by piece: quoted text is fed to the model one character at a time.
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

SYSTEM_TURN = f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
GENERATION_PROMPT = f"{IM_START}assistant\n"

STEP1X_PREFIX = "\n".join(
    (
        'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
        "suitable for image generation. Evaluate the level of detail in the user prompt:",
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and "
        "spatial relationships to create vivid and concrete scenes.",
        "- If the prompt is already detailed, refine and enhance the existing details slightly without "
        "overcomplicating.",
        "",
        "Here are examples of how to transform or refine prompts:",
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
        "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
        "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by "
        "towering glass skyscrapers.",
        "",
        "Please generate only the enhanced description for the prompt below and avoid including any "
        "additional commentary or evaluations:",
        "User Prompt:",
    )
)
"""The instruction-rewriting preamble the model was trained with (official ``Qwen25VL_7b_PREFIX``)."""

QUOTE_CHARS = ("'", "\u201c", "\u201d")
"""Characters the official splitter rewrites to ``"`` before splitting (apostrophe, curly quotes)."""

OPEN_CURLY = "\u201c"
CLOSE_CURLY = "\u201d"

QUOTE_MIN_INDEX = 156
"""Quotes before this character index are ignored: they are the prefix's own ``"Enhanced prompt"``."""


def chat_text(instruction: str) -> str:
    """The templated string of one (image, instruction) pair, image placeholder unexpanded."""
    user = f"{STEP1X_PREFIX}{VISION_START}{IMAGE_PAD}{VISION_END}{instruction}"
    return f"{SYSTEM_TURN}{IM_START}user\n{user}{IM_END}\n{GENERATION_PROMPT}"


def split_quoted(text: str) -> list[str]:
    """Split a templated string the way the official encoder does before re-tokenising it.

    Apostrophes and curly quotes become ``"``. From index ``QUOTE_MIN_INDEX`` on, every ``"`` toggles
    quote mode; an opening quote closes the current piece (the quote is its last character), a closing
    quote starts the next piece. Inside quotes each character becomes its own piece wrapped in curly
    quotes. An unterminated quote therefore splits everything after it, template suffix included.
    """
    for ch in QUOTE_CHARS:
        text = text.replace(ch, '"')
    pieces: list[str] = []
    current = ""
    quoted = False
    for index, ch in enumerate(text):
        if ch == '"' and index >= QUOTE_MIN_INDEX:
            current += ch
            if not quoted:
                pieces.append(current)
                current = ""
            quoted = not quoted
        elif quoted:
            pieces.append(f"{OPEN_CURLY}{ch}{CLOSE_CURLY}")
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces

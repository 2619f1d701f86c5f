"""The text side of the Step1X-Edit prompts: chat layouts, the model-facing strings, and the v1.0/v1.1
quote-splitting rule.

v1.0/v1.1: the official encoder renders one user turn ``[prefix text, image, instruction]`` with the
Qwen2.5-VL chat template (default system turn, generation prompt, no "Picture 1: " label), then
re-tokenises that string piece by piece: quoted text is fed to the model one character at a time.

v1.2: one user turn ``[prefix + " " + instruction, image]`` rendered with the vision label, so the
instruction runs straight into ``Picture 1: `` (see ``quotes_v12`` for its splitting rule).
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


EDIT_PREFIX_V12 = "\n".join(
    (
        "Given a reference image and a user editing instruction.",
        "You need to understand the information of the reference image and the content of the editing instruction,",
        "and then generate a detailed description of the edited target image based on the reference image and the "
        "editing instruction. ",
        "The description should include the requirements in the editing instruction and try to closely match the "
        "content of the target image.",
        "The editing instruction is:",
    )
)
"""The v1.2 preamble (its third line ends in a space, as in the released pipeline)."""

VISION_LABEL_V12 = "Picture 1: "
"""What the chat template writes in front of the image when asked to number images (v1.2 asks)."""

T2I_NEGATIVE_PROMPT_V12 = (
    "worst quality, wrong limbs, unreasonable limbs, normal quality, low quality, low res, blurry, text, watermark, "
    "logo, banner, extra digits, cropped, jpeg artifacts, signature, username, error, sketch ,duplicate, ugly, "
    "monochrome, horror, geometry, mutation, disgusting"
)
"""v1.2's negative prompt for text-to-image (no reference image). Editing uses ``""``."""


def chat_text_v12(instruction: str) -> str:
    """The templated v1.2 string of one instruction, image placeholder unexpanded."""
    user = f"{EDIT_PREFIX_V12} {instruction}{VISION_LABEL_V12}{VISION_START}{IMAGE_PAD}{VISION_END}"
    return f"{SYSTEM_TURN}{IM_START}user\n{user}{IM_END}\n{GENERATION_PROMPT}"


def default_negative_prompt_v12(text_to_image: bool) -> str:
    """The negative prompt v1.2 uses when none is given: ``""`` for an edit, a quality list without an image."""
    return T2I_NEGATIVE_PROMPT_V12 if text_to_image else ""

"""Token ids of the Step1X-Edit prompts: tokenizer loading, the official (v1.0/v1.1) piecewise
re-tokenisation and splice, and the v1.2 chunk-by-chunk ids with their quote mask."""

from __future__ import annotations

import os
from pathlib import Path

from .quotes_v12 import Chunk, special_token_strings, split_prompt
from .template import EDIT_PREFIX_V12, IMAGE_PAD, VISION_END, chat_text, chat_text_v12, split_quoted

IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
OPEN_CURLY_ID = 2073
CLOSE_CURLY_ID = 854

EXPECTED_IDS = {
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "<|image_pad|>": IMAGE_PAD_ID,
    "<|video_pad|>": VIDEO_PAD_ID,
    "\u201c": OPEN_CURLY_ID,
    "\u201d": CLOSE_CURLY_ID,
}

RESERVED_IN_INSTRUCTION = {IMAGE_PAD_ID: "<|image_pad|>", VIDEO_PAD_ID: "<|video_pad|>"}
"""Placeholders that would ask the model for a second image or a video if typed in an instruction."""

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class TokenizerError(ValueError):
    """A tokenizer folder that is missing or is not the Qwen2.5 tokenizer."""


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike):
    """Load the Qwen2.5 tokenizer from local files only and check its special-token ids."""
    folder = Path(folder)
    if not folder.is_dir() or not has_tokenizer_files(folder):
        raise TokenizerError(
            f"no Qwen2.5 tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt "
            "(+ tokenizer_config.json). Point tokenizer_dir at the Qwen2.5-VL-7B-Instruct folder or, inside "
            "ComfyUI, at comfy/text_encoders/qwen25_tokenizer."
        )
    import transformers

    cls = getattr(transformers, "Qwen2TokenizerFast", None) or transformers.Qwen2Tokenizer
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load the Qwen2.5 tokenizer from {folder}: {exc}") from None
    check_tokenizer(tokenizer, folder)
    return tokenizer


def check_tokenizer(tokenizer, source: object = "the tokenizer") -> None:
    """Raise unless ``tokenizer`` maps the tokens the official encoder relies on to their fixed ids."""
    wrong = []
    for text, expected in EXPECTED_IDS.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != [expected]:
            wrong.append(f"{text!r} -> {ids} (expected [{expected}])")
    if wrong:
        raise TokenizerError(
            f"{source} is not the Qwen2.5 tokenizer: " + "; ".join(wrong) + ". Use the tokenizer files that "
            "come with Qwen2.5-VL-7B-Instruct (or ComfyUI's comfy/text_encoders/qwen25_tokenizer)."
        )


def piece_ids(tokenizer, pieces: list[str]) -> list[int]:
    """Tokenise each piece on its own and concatenate, dropping the curly quotes of a quoted character
    only when the tokenizer kept them as the standalone tokens ``“`` and ``”``."""
    out: list[int] = []
    if not pieces:
        return out
    for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        if len(ids) >= 2 and ids[0] == OPEN_CURLY_ID and ids[-1] == CLOSE_CURLY_ID:
            ids = ids[1:-1]
        out.extend(ids)
    return out


def prompt_ids(tokenizer, instruction: str, num_image_tokens: int) -> list[int]:
    """Input ids of the official encoder for one instruction and an image of ``num_image_tokens`` tokens.

    Everything before the template's ``<|vision_end|>`` is the plain tokenisation with the image
    placeholder expanded; from ``<|vision_end|>`` on, the ids come from the piecewise re-tokenisation
    of the quote-split string.
    """
    text = chat_text(instruction)
    cut = text.index(VISION_END)
    head = text[:cut].replace(IMAGE_PAD, IMAGE_PAD * num_image_tokens)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = piece_ids(tokenizer, split_quoted(text))
    start = tail_ids.index(VISION_END_ID)
    ids = list(head_ids) + tail_ids[start:]
    check_placeholders(ids, num_image_tokens, instruction)
    return ids


PLACEHOLDER_FIX = "remove it or put it in quotes."
PLACEHOLDER_FIX_V12 = "remove it (the v1.2 template reads it as a placeholder even in quotes)."


def check_placeholders(ids: list[int], num_image_tokens: int, instruction: str, fix: str = PLACEHOLDER_FIX) -> None:
    """Raise when the instruction itself holds image or video placeholder tokens; ``fix`` ends the message."""
    found = []
    if ids.count(IMAGE_PAD_ID) > num_image_tokens:
        found.append(RESERVED_IN_INSTRUCTION[IMAGE_PAD_ID])
    if VIDEO_PAD_ID in ids:
        found.append(RESERVED_IN_INSTRUCTION[VIDEO_PAD_ID])
    if found:
        shown = instruction if len(instruction) <= 80 else instruction[:77] + "..."
        raise ValueError(
            f"the instruction {shown!r} contains {', '.join(found)}, a placeholder reserved for the reference "
            f"image; {fix}"
        )


def prompt_chunks_v12(tokenizer, instruction: str) -> list[Chunk]:
    """The v1.2 pieces of the templated ``instruction`` (see ``quotes_v12``)."""
    return split_prompt(chat_text_v12(instruction), len(EDIT_PREFIX_V12), special_token_strings(tokenizer))


def prompt_ids_v12(tokenizer, instruction: str, num_image_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, text mask) of v1.2 for one instruction and an image of ``num_image_tokens`` tokens.

    Every piece is tokenised on its own and the ids are concatenated; the image placeholder piece becomes
    ``num_image_tokens`` pads. The mask is 1 on the tokens of quoted characters."""
    chunks = prompt_chunks_v12(tokenizer, instruction)
    ids: list[int] = []
    mask: list[int] = []
    texts = [c.text for c in chunks]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for chunk, chunk_ids in zip(chunks, encoded, strict=True):
        if chunk.text == IMAGE_PAD:
            chunk_ids = [IMAGE_PAD_ID] * num_image_tokens
        ids.extend(chunk_ids)
        mask.extend([int(chunk.quoted)] * len(chunk_ids))
    check_placeholders(ids, num_image_tokens, instruction, PLACEHOLDER_FIX_V12)
    return ids, mask

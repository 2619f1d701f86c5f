"""How v1.2 cuts its templated prompt before tokenising it: special tokens, then quotes.

1. The text is cut at every added/special token of the tokenizer; each token is a piece of its own and the
   quote state starts afresh after it.
2. Inside each piece, characters before ``prefix_len`` (counted from the start of the whole text) are
   plain text. Then ``"`` opens and closes an English quote; only ``“`` opens and only ``”`` closes a
   Chinese one. Apostrophes and ``‘’`` are plain text.
3. The opening quote character ends the piece before it; every character inside the quotes (spaces
   included) becomes a piece of its own, marked quoted; the closing quote character starts the next piece.
4. A ``“`` with nothing before it in its piece is dropped. An unterminated quote is not split: its text is
   appended to the previous unquoted piece.

Each piece is then tokenised on its own; the tokens of quoted pieces are the ones the DiT's text-token
mapping sees (``text_mask``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENGLISH_QUOTE = '"'
CHINESE_OPEN = "\u201c"
CHINESE_CLOSE = "\u201d"


@dataclass(frozen=True)
class Chunk:
    text: str
    quoted: bool


def special_token_strings(tokenizer) -> list[str]:
    """Every added or special token of ``tokenizer``, longest first (the order a regex needs)."""
    found = {token.content for token in tokenizer.added_tokens_decoder.values()}
    found.update(getattr(tokenizer, "additional_special_tokens", None) or [])
    return sorted((t for t in found if t), key=len, reverse=True)


def split_quotes(text: str, skip: int) -> list[Chunk]:
    """Split one piece holding no special token; its first ``skip`` characters are never quotes."""
    chunks: list[Chunk] = []
    buffer = ""
    inside: list[str] = []
    closer: str | None = None
    for index, ch in enumerate(text):
        if index < skip:
            buffer += ch
        elif closer is None:
            if ch == ENGLISH_QUOTE:
                chunks.append(Chunk(buffer + ch, False))
                buffer, closer = "", ENGLISH_QUOTE
            elif ch == CHINESE_OPEN:
                if buffer:
                    chunks.append(Chunk(buffer + ch, False))
                buffer, closer = "", CHINESE_CLOSE
            else:
                buffer += ch
        elif ch == closer:
            chunks.extend(Chunk(c, True) for c in inside)
            inside, buffer, closer = [], ch, None
        else:
            inside.append(ch)
    if closer is not None:
        rest = "".join(inside) + buffer
        if chunks and not chunks[-1].quoted:
            chunks[-1] = Chunk(chunks[-1].text + rest, False)
        else:
            chunks.append(Chunk(rest, False))
    elif buffer:
        chunks.append(Chunk(buffer, False))
    return chunks


def split_prompt(text: str, prefix_len: int, special_tokens: list[str]) -> list[Chunk]:
    """The v1.2 pieces of a templated prompt (see the module docstring)."""
    if not special_tokens:
        return split_quotes(text, prefix_len)
    pattern = "(" + "|".join(re.escape(t) for t in sorted(set(special_tokens), key=len, reverse=True)) + ")"
    chunks: list[Chunk] = []
    start = 0
    for part in re.split(pattern, text):
        if not part:
            continue
        chunks.extend(split_quotes(part, max(0, prefix_len - start)))
        start += len(part)
    return chunks

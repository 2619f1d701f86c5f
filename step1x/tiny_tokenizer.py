"""A small stand-in for the Qwen2.5 tokenizer, written at run time for the offline self-test.

The self-test must run on a fresh machine without downloading anything, and the real tokenizer files are
not part of this package. This module writes ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` in
the Qwen2.5 format that any Qwen2 tokenizer class reads, with:

* the byte-level alphabet in GPT-2 order (so ``!`` is id 0, as in Qwen2.5), which can spell any text;
* merges that tokenise the official prompt template exactly as Qwen2.5 does (218 tokens before the image,
  the ``:`` of "User Prompt:" at index 217), so the official 217-token cut lands where it does for real,
  and the v1.2 template likewise (the ``:`` of "The editing instruction is:" at index 90);
* the special tokens and the curly quotes at their real ids (``<|vision_start|>`` 151652, ``“`` 2073, ...).

Ordinary words outside the template fall back to short pieces; that changes nothing the pipeline checks.
Real models must always use the real tokenizer that comes with Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
}
"""Qwen2.5's control tokens at their ids."""

FIXED_IDS = {"\u201c": 2073, "\u201d": 854}
"""Curly quotes: the official encoder recognises quoted characters by these two ids."""

TEMPLATE_SPLITS = {
    "Enhanced": ("Enh", "anced"),
    "Ġovercomplicating": ("Ġover", "comp", "lic", "ating"),
    "Ġwindowsill": ("Ġwindows", "ill"),
    "Ġblooming": ("Ġblo", "oming"),
    "-decker": ("-de", "cker"),
    "Ġskyscrapers": ("Ġskys", "crap", "ers"),
}
"""The words of the templates that Qwen2.5 splits into several tokens (byte-level spelling, Ġ = space).
Every other word of the templates is one token."""


def _byte_table() -> dict[int, str]:
    """Byte -> byte-level character in GPT-2 order: printable bytes stand for themselves, the others are
    mapped past 255. Iterating it in insertion order gives the vocabulary order (``!`` first)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def _pretokenize(text: str) -> list[str]:
    """Qwen2.5's pre-tokenisation: regex split, then byte-level spelling (a space becomes ``Ġ``)."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return [word for word, _ in split.pre_tokenize_str(text)]


def template_words() -> list[tuple[str, tuple[str, ...]]]:
    """(byte-level word, its Qwen2.5 tokens) for every word of the official and the v1.2 prompt templates."""
    from .encoder.template import chat_text, chat_text_v12

    specials = "|".join(re.escape(content) for content, _ in SPECIAL_TOKENS.values())
    words = [_pretokenize(segment) for text in (chat_text(""), chat_text_v12(""))
             for segment in re.split(specials, text)]
    words.append([_pretokenize(text)[0] for text in FIXED_IDS])
    return [(word, TEMPLATE_SPLITS.get(word, (word,))) for group in words for word in group]


def _chains(pieces: list[str]) -> list[tuple[str, str]]:
    """Merges that build each piece left to right, in the order of ``pieces``."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            pair = (piece[: end - 1], piece[end - 1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
    return merges


def _vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte alphabet, then merge results, skipping the ids reserved for the curly quotes."""
    reserved = set(FIXED_IDS.values())
    vocab: dict[str, int] = {}
    next_id = 0
    for token in list(_byte_table().values()) + ["".join(m) for m in merges]:
        if token in vocab:
            continue
        while next_id in reserved:
            next_id += 1
        vocab[token] = next_id
        next_id += 1
    return vocab


def _first_mismatch(words, merges) -> tuple[str, tuple[str, ...]] | None:
    from tokenizers.models import BPE

    model = BPE(vocab=_vocabulary(merges), merges=merges)
    for word, pieces in words:
        if tuple(t.value for t in model.tokenize(word)) != pieces:
            return word, pieces
    return None


def build_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges that reproduce Qwen2.5's tokens for every template word.

    Pieces that start with a space go first: inside a space-led word only its own growing prefix can
    merge, so nothing else can cut it apart. The other pieces can interfere with each other; whenever a
    word comes out wrong, its pieces move to the front and the merges are rebuilt."""
    words = template_words()
    pieces = list(dict.fromkeys(p for _, group in words for p in group))
    spaced = [p for p in pieces if p.startswith("Ġ")]
    rest = [p for p in pieces if not p.startswith("Ġ")]
    for _ in range(len(rest) + 1):
        merges = _chains(spaced + rest)
        wrong = _first_mismatch(words, merges)
        if wrong is None:
            break
        first = [p for p in wrong[1] if p in rest]
        rest = first + [p for p in rest if p not in first]
    else:
        raise RuntimeError(f"the stand-in tokenizer cannot reproduce the template word {wrong[0]!r}")
    vocab = _vocabulary(merges)
    for text, token_id in FIXED_IDS.items():
        vocab[_pretokenize(text)[0]] = token_id
    for token_id, (content, _) in SPECIAL_TOKENS.items():
        vocab[content] = token_id
    return vocab, merges


def write_tiny_tokenizer(dst: str | os.PathLike) -> Path:
    """Write the stand-in tokenizer files into ``dst`` and return it."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary()
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (dst / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    added = {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": special}
        for i, (c, special) in SPECIAL_TOKENS.items()
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for i, (c, _) in SPECIAL_TOKENS.items() if i != 151643],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return dst

"""Fast encoding for byte-level BPE: split words in Python, run BPE once per distinct word.

`tokenizers` spends its time per token (the pre-tokenizer's regex, then an Encoding object with
a string per token), about 1 MB/s per core here. Text repeats its words, so splitting with the
same pattern as the ByteLevel pre-tokenizer and looking each word up in a cache gives the same ids
several times faster (bench/data.py). BPE never merges across pre-tokens, so a word's ids do not
depend on its neighbours. Texts that contain an added token (e.g. a literal "[SEP]") take the
`tokenizers` path, which matches those first; so do texts with a character this Python's Unicode
database does not know (assigned in a later Unicode version than Python's, it could be a letter
to `tokenizers` and split differently here).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import unicodedata

import numpy as np

# The Unicode White_Space property (what the Oniguruma regex behind `tokenizers` calls \s);
# Python's \s differs (it includes \x1c-\x1f), so the classes are spelt out.
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
MAX_WORDS = 2_000_000  # the cache starts over beyond this many distinct words (bounded memory)


def _ranges(pred, top: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for cp in range(top + 1):
        if pred(chr(cp)):
            if out and out[-1][1] == cp - 1:
                out[-1] = (out[-1][0], cp)
            else:
                out.append((cp, cp))
    return out


def _cls(ranges) -> str:
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


@functools.cache
def split_pattern(astral: bool = True) -> re.Pattern:
    """The ByteLevel pre-tokenizer's pattern (GPT-2's) with \\p{L}, \\p{N} and \\s as explicit classes.

    `astral=False` leaves out characters above U+FFFF: exact only for text without them, and
    ~7x faster, because `re` keeps a bitmap for the Basic Multilingual Plane but scans the
    astral part of a class range by range."""
    top = sys.maxunicode if astral else 0xFFFF
    letters = _cls(_ranges(lambda c: unicodedata.category(c)[0] == "L", top))
    numbers = _cls(_ranges(lambda c: unicodedata.category(c)[0] == "N", top))
    space = _cls(_WHITE_SPACE)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])|[{space}]+"
    )


@functools.cache
def unassigned_pattern(astral: bool = True) -> re.Pattern:
    """Characters unassigned in this Python's Unicode database (category Cn)."""
    top = sys.maxunicode if astral else 0xFFFF
    return re.compile(f"[{_cls(_ranges(lambda c: unicodedata.category(c) == 'Cn', top))}]")


def _has_astral(text: str) -> bool:
    return not text.isascii() and len(text.encode("utf-16-le", "surrogatepass")) != 2 * len(text)


def supports(tk) -> bool:
    """True for a byte-level BPE tokenizer that this cache reproduces exactly."""
    spec = json.loads(tk.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
    )


class _Index(dict):
    """word -> key; an unseen word gets the next key and waits in `new` for its ids."""

    def __init__(self):
        super().__init__()
        self.new: list[str] = []

    def __missing__(self, word: str) -> int:
        key = self[word] = len(self)
        self.new.append(word)
        return key


class WordCache:
    """Encodes documents into one flat id stream (each document followed by `eos_id`)."""

    def __init__(self, tk, eos_id: int):
        self.tk, self.eos_id = tk, eos_id
        self._encode_batch = getattr(tk, "encode_batch_fast", tk.encode_batch)  # _fast: tokenizers >= 0.21
        self.split_bmp = split_pattern(astral=False).findall
        added = sorted((t.content for t in tk.get_added_tokens_decoder().values()), key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, added))) if added else None
        self._reset()

    def _reset(self) -> None:
        # "" never comes out of the split (every alternative matches at least one character),
        # so it marks a document end.
        self.index = _Index()
        self.index[""] = 0
        self.flat = np.array([self.eos_id], dtype=np.int64)  # all known words' ids, back to back
        self.used = 1
        self.starts = np.zeros(1, dtype=np.int64)  # word key -> its ids are flat[start : start + len]
        self.lens = np.ones(1, dtype=np.int64)

    def _learn(self) -> None:
        """Run BPE on the words first seen in this batch (in parallel, inside `tokenizers`)."""
        new = self.index.new
        ids = [e.ids for e in self._encode_batch(new, add_special_tokens=False)]
        self.index.new = []
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        self.starts = np.concatenate([self.starts, self.used + np.cumsum(lens) - lens])
        self.lens = np.concatenate([self.lens, lens])
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
        self.flat = np.concatenate([self.flat[: self.used], flat])
        self.used = len(self.flat)

    def _gather(self, words: list[str]) -> np.ndarray:
        if len(self.index) > MAX_WORDS:
            self._reset()
        k = np.fromiter(map(self.index.__getitem__, words), dtype=np.int64, count=len(words))
        if self.index.new:
            self._learn()
        lens, starts = self.lens[k], self.starts[k]
        ends = np.cumsum(lens)
        # output position i reads flat[start of its word + its offset within the word]
        return self.flat[np.repeat(starts - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)]

    def needs_tokenizers(self, doc: str, astral: bool) -> bool:
        """Documents this cache leaves to `tokenizers`: added-token text, or a character unknown
        to Python's Unicode database."""
        return bool((self.added is not None and self.added.search(doc))
                    or (not doc.isascii() and unassigned_pattern(astral).search(doc)))

    def encode(self, docs: list[str]) -> np.ndarray:
        parts: list[np.ndarray] = []
        words: list[str] = []
        for doc in docs:
            astral = _has_astral(doc)
            if self.needs_tokenizers(doc, astral):
                if words:
                    parts.append(self._gather(words))
                    words = []
                ids = self.tk.encode(doc, add_special_tokens=False).ids
                parts.append(np.asarray(ids + [self.eos_id], dtype=np.int64))
            else:
                words += (split_pattern().findall if astral else self.split_bmp)(doc)
                words.append("")
        if words:
            parts.append(self._gather(words))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

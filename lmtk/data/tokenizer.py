"""Tokenizers trained with `tokenizers`: byte-level BPE (GPT) or WordPiece (BERT).

Tokenizers lmtk trains have the five special tokens [PAD] [UNK] [CLS] [SEP] [MASK] (at ids
0-4); a tokenizer that comes from elsewhere (a Hugging Face checkpoint, tokenizer.path) keeps its
own. The ids are read from the vocabulary by name (ALIASES), never assumed: a special token the
tokenizer lacks is None, and what needs it says so in one line (Tokenizer.require).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmtk.errors import UserError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Spellings of each special token, lmtk's (BERT's) first: RoBERTa/BART use <s> </s> <pad> <mask>,
# GPT-2 one <|endoftext|> for everything it has.
ALIASES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<s>", "<cls>", "<|startoftext|>"),
    "eos": ("[SEP]", "</s>", "<sep>", "<|endoftext|>", "<eos>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LMTK_CACHE", Path.home() / ".cache" / "lmtk"))


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and byte lengths lmtk needs."""

    def __init__(self, tk):
        self.tk = tk
        vocab = tk.get_vocab()
        ids = {role: next((vocab[a] for a in names if a in vocab), None) for role, names in ALIASES.items()}
        self.pad_id, self.unk_id, self.cls_id, self.eos_id, self.mask_id = (ids[r] for r in ("pad", "unk", "cls", "eos", "mask"))
        self.vocab_size = tk.get_vocab_size()
        added = {t.content for t in getattr(tk, "get_added_tokens_decoder", dict)().values() if getattr(t, "special", False)}
        self.special_ids = sorted({i for i in ids.values() if i is not None} | {vocab[t] for t in added if t in vocab})
        self._words = None  # lmtk.data.wordcache.WordCache once encode_stream needs it (False: unsupported)

    TOKEN_NAMES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"}

    def require(self, *roles: str, why: str) -> None:
        """One-line error when the tokenizer lacks a special token `why` needs (roles: pad, unk,
        cls, eos, mask), e.g. masked LM on a tokenizer without [MASK]."""
        missing = [self.TOKEN_NAMES[r] for r in roles if getattr(self, f"{r}_id") is None]
        if missing:
            raise UserError(f"{why} needs the special token{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                            "which this tokenizer lacks; use a tokenizer that has it (lmtk's have all five)")

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as TK

        try:
            return cls(TK.from_file(str(path)))
        except Exception as err:
            raise UserError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}") from None

    def save(self, path) -> None:
        self.tk.save(str(path))

    def to_str(self) -> str:
        return self.tk.to_str()

    def to_json(self) -> str:
        """The text of the tokenizer.json that save() writes."""
        return self.tk.to_str(pretty=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets we never use (1.4x faster, same ids)
        fast = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def _word_cache(self):
        """lmtk.data.wordcache.WordCache for a byte-level BPE tokenizer it reproduces, else None."""
        if self._words is None:
            from lmtk.data import wordcache

            self._words = wordcache.WordCache(self.tk, self.eos_id) if wordcache.supports(self.tk) else False
        return self._words or None

    def release_word_cache(self) -> None:
        if self._words:
            self._words = None

    def encode_stream(self, docs: list[str], with_bytes: bool = False):
        """Ids of the documents back to back, each followed by [SEP] (the packed-stream layout).

        with_bytes=True returns (ids, nbytes): beside each id, the UTF-8 bytes of the original text
        it is charged for in bits-per-byte, from the end of the previous token to its own end, so
        whitespace and characters a normaliser dropped count; each document's [SEP] gets the
        document's trailing bytes. A document's counts sum to len(doc.encode('utf-8')) exactly."""
        words = self._word_cache()
        if words is not None:
            return words.encode(docs) if not with_bytes else self._word_cache_bytes(words, docs)
        if with_bytes:
            return self._offsets_bytes(docs)
        eos = [self.eos_id]
        return np.fromiter(itertools.chain.from_iterable(ids + eos for ids in self.encode_batch(docs)), dtype=np.int64)

    def _word_cache_bytes(self, words, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Byte-level BPE without a normaliser: tokens are consecutive byte pieces of the text, so
        token_bytes[ids] is each token's share and [SEP] gets 0. Documents containing added-token
        text (a literal "[SEP]", 0 bytes in the table) take the offsets path."""
        table = self.token_bytes()
        ids_parts, byte_parts, run = [], [], []

        def flush():
            if run:
                ids = words.encode(run)
                ids_parts.append(ids)
                byte_parts.append(table[ids])
                run.clear()

        for doc in docs:
            if words.added is not None and words.added.search(doc):
                flush()
                ids, nbytes = self._offsets_bytes([doc])
                ids_parts.append(ids)
                byte_parts.append(nbytes)
            else:
                run.append(doc)
        flush()
        if not ids_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(ids_parts), np.concatenate(byte_parts)

    def _offsets_bytes(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Any tokenizer: per-token bytes from `tokenizers`' character offsets into the original text
        (converted to byte offsets with a cumulative sum of each character's UTF-8 length)."""
        ids_parts, byte_parts = [], []
        for doc, enc in zip(docs, self.tk.encode_batch(docs, add_special_tokens=False)):
            cps = np.frombuffer(doc.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            at = np.zeros(len(cps) + 1, dtype=np.int64)  # byte offset of each character boundary
            np.cumsum(1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000), out=at[1:])
            n = len(enc.ids)
            ends = at[np.fromiter((e for _, e in enc.offsets), dtype=np.int64, count=n)]
            ends = np.maximum.accumulate(ends) if n else ends  # never charge a negative share
            nbytes = np.empty(n + 1, dtype=np.int64)
            nbytes[:n] = np.diff(ends, prepend=0)
            nbytes[n] = at[-1] - (ends[-1] if n else 0)  # [SEP]: the document's trailing bytes
            ids_parts.append(np.asarray(enc.ids + [self.eos_id], dtype=np.int64))
            byte_parts.append(nbytes)
        if not ids_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(ids_parts), np.concatenate(byte_parts)

    @property
    def exact_token_bytes(self) -> bool:
        """Whether token_bytes()[ids] is exactly each token's share of the text's bytes (byte-level
        BPE without a normaliser, the word-cache path)."""
        return self._word_cache() is not None

    @property
    def parallel_encode(self) -> bool:
        """Whether encode_stream runs in Python (so worth several processes; `tokenizers` threads itself)."""
        return self._word_cache() is not None

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for specials). Exact for byte-level BPE without a
        normaliser (exact_token_bytes); for other tokenizers an estimate (WordPiece drops
        whitespace and normalises), which is why bits-per-byte uses encode_stream(with_bytes=True)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        byte_level = type(self.tk.pre_tokenizer).__name__ == "ByteLevel"
        specials = set(self.special_ids)
        for tok, i in self.tk.get_vocab().items():
            if i in specials or i >= self.vocab_size:
                continue
            if byte_level:
                out[i] = len(tok)  # byte-level alphabet: one character per byte
            elif tok.startswith("##"):
                out[i] = len(tok[2:].encode())
            else:
                out[i] = len(tok.encode()) + 1  # a word-initial piece also stands for its space
        return out


def train_tokenizer(cfg, docs: Iterable[str]) -> Tokenizer:
    from tokenizers import Tokenizer as TK, decoders, models, normalizers, pre_tokenizers, trainers

    if cfg.kind == "bpe":
        tk = TK(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        if cfg.lowercase:
            tk.normalizer = normalizers.Lowercase()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tk = TK(models.WordPiece(unk_token="[UNK]"))
        tk.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIALS, show_progress=False)
    tk.train_from_iterator(_take_chars(docs, cfg.train_chars), trainer=trainer)
    return Tokenizer(tk)


def _take_chars(docs: Iterable[str], limit: int) -> Iterator[str]:
    seen = 0
    for d in docs:
        if seen >= limit:
            return
        d = d[: limit - seen]
        seen += len(d)
        yield d


def resolve_tokenizer_path(path: str, runs_root: Path) -> Path:
    """tokenizer.path may be a tokenizer.json, a run directory or a run name."""
    p = Path(path).expanduser()
    for cand in (p, p / "tokenizer.json", runs_root / path / "tokenizer.json"):
        if cand.is_file():
            return cand
    raise UserError(f"tokenizer.path={path}: no tokenizer.json there (give a file, a run directory or a run name)")


def get_tokenizer(cfg, source, runs_root: Path) -> tuple[Tokenizer, bool]:
    """Load tokenizer.path, or train one on the source (cached by data + settings).

    Returns (tokenizer, trained_now)."""
    if cfg.path:
        tok = Tokenizer.from_file(resolve_tokenizer_path(cfg.path, runs_root))
        tok.require("eos", why="pretraining (documents are separated by [SEP])")
        return tok, False
    key = hashlib.sha256(repr((source.fingerprint(), cfg.kind, cfg.vocab_size, cfg.train_chars, cfg.lowercase)).encode())
    cached = cache_root() / "tokenizers" / f"{key.hexdigest()[:16]}.json"
    if cached.is_file():
        return Tokenizer.from_file(cached), False
    docs = iter(source.documents("train"))
    first = next(docs, None)
    if first is None:  # fail before training (and caching) a tokenizer on nothing
        raise UserError("the training data is empty (no text after reading); check data.train")
    tok = train_tokenizer(cfg, itertools.chain([first], docs))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, cached)
    return tok, True


def copy_tokenizer(tok: Tokenizer, dest: Path) -> None:
    tmp = dest.with_suffix(".tmp")
    tok.save(tmp)
    os.replace(tmp, dest)


"""Tokenizers trained with `tokenizers`: byte-level BPE (GPT) or WordPiece (BERT).

Every tokenizer lmtk trains has the same five special tokens at ids 0-4 ([PAD], [UNK], [CLS],
[SEP], [MASK]; [SEP] is also the document separator, eos_id). An imported tokenizer (a Hugging
Face tokenizer.json) has what it has: its special tokens' roles (pad, unk, cls, sep, mask, bos,
eos) are read from the files beside it (models/hf.py) or recognised by their usual names, and
an id is None where the tokenizer has no such token. What an objective needs is checked with
require_special (one line: "the tokenizer has no mask token ...").
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
ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
# lmtk's own tokenizers: [SEP] separates documents in the token stream, so it is also eos
LMTK_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "eos": "[SEP]"}
# The usual spellings of each role, for tokenizers that come without a map of them (first found wins)
USUAL_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),  # RoBERTa: <s> is its bos and cls
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "<bos>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "[EOS]", "<eos>", "[SEP]"),
}


def usual_specials(vocab) -> dict[str, str]:
    """{role: token} for the roles whose usual spelling (USUAL_NAMES) is in `vocab`."""
    out = {}
    for role, names in USUAL_NAMES.items():
        for name in names:
            if name in vocab:
                out[role] = name
                break
    return out


def require_special(tok: "Tokenizer", role: str, why: str) -> int:
    """The id of the tokenizer's `role` token (pad, unk, cls, sep, mask, bos, eos), or a one-line
    UserError saying that `why` needs it and how to add one (models/hf.add_special)."""
    if role not in ROLES:
        raise ValueError(f"unknown special-token role {role!r}; one of {', '.join(ROLES)}")
    tid = getattr(tok, f"{role}_id", None)
    if tid is None:
        name = LMTK_SPECIALS.get(role, f"<{role}>")
        raise UserError(
            f"the tokenizer has no {role} token, which {why}; add one explicitly "
            f"(lmtk.models.hf.add_special(model, tok, {name!r}), which resizes the embedding) or use a tokenizer that has one"
        )
    return tid


def cache_root() -> Path:
    return Path(os.environ.get("LMTK_CACHE", Path.home() / ".cache" / "lmtk"))


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and byte lengths lmtk needs.

    `specials` maps roles (ROLES) to token strings; None: lmtk's five when the tokenizer has them
    (every tokenizer lmtk trained), else the usual spellings found in its vocabulary. The ids are
    attributes (pad_id, unk_id, cls_id, sep_id, mask_id, bos_id, eos_id; None where absent);
    eos_id is the document separator of the token stream (lmtk's [SEP], GPT-2's <|endoftext|>,
    Llama's </s>; BERT's [SEP] when it has no eos)."""

    def __init__(self, tk, specials: dict | None = None):
        self.tk = tk
        self._words = None  # lmtk.data.wordcache.WordCache once encode_stream needs it (False: unsupported)
        self._set_specials(specials)

    def _set_specials(self, specials: dict | None) -> None:
        vocab = self.tk.get_vocab()
        if specials is None:
            specials = dict(LMTK_SPECIALS) if all(s in vocab for s in SPECIALS) else usual_specials(vocab)
        unknown = sorted(set(specials) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown special-token roles {unknown}; roles: {', '.join(ROLES)}")
        specials = {r: t for r, t in specials.items() if t is not None}
        if "eos" not in specials and "sep" in specials:
            specials["eos"] = specials["sep"]  # BERT's: [SEP] separates documents
        absent = [t for t in specials.values() if t not in vocab]
        if absent:
            raise UserError(f"the tokenizer's special tokens {absent} are not in its vocabulary; check its tokenizer.json")
        self.specials = {r: specials[r] for r in ROLES if r in specials}  # role -> token (saved with checkpoints)
        for role in ROLES:
            setattr(self, f"{role}_id", vocab[self.specials[role]] if role in self.specials else None)
        self.vocab_size = self.tk.get_vocab_size()
        added = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        self.special_tokens = added | set(self.specials.values())  # never text: 0 bytes, no random replacement
        self.special_ids = sorted(vocab[t] for t in self.special_tokens if t in vocab)
        self._words = None

    def special_id(self, role: str) -> int | None:
        return getattr(self, f"{role}_id", None)

    def has(self, role: str) -> bool:
        return self.special_id(role) is not None

    has_pad = property(lambda self: self.pad_id is not None)
    has_mask = property(lambda self: self.mask_id is not None)
    has_cls = property(lambda self: self.cls_id is not None)
    has_sep = property(lambda self: self.sep_id is not None)
    has_bos = property(lambda self: self.bos_id is not None)
    has_eos = property(lambda self: self.eos_id is not None)

    def add_special(self, token: str, role: str) -> int:
        """Give `role` to `token`, adding it to the vocabulary as a special token if it is new
        (then vocab_size grows: resize the model's embedding, models/hf.add_special). Its id."""
        if role not in ROLES:
            raise ValueError(f"unknown special-token role {role!r}; one of {', '.join(ROLES)}")
        if token not in self.tk.get_vocab():
            self.tk.add_special_tokens([token])
        self._set_specials({**self.specials, role: token})
        return self.tk.get_vocab()[token]

    def require(self, *roles: str, why: str) -> None:
        """require_special for each role: a one-line error when the tokenizer lacks what `why` needs."""
        for role in roles:
            require_special(self, role, why)

    @classmethod
    def from_file(cls, path, specials: dict | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as TK

        try:
            tk = TK.from_file(str(path))
        except Exception as err:
            raise UserError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}") from None
        return cls(tk, specials)

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
        require_special(self, "eos", "separates documents in the token stream")
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

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """The text's ids; specials=True adds the tokenizer's template (BERT's [CLS] ... [SEP],
        Llama's <s> ...: the post-processor of an imported tokenizer.json; none for lmtk's)."""
        return self.tk.encode(text, add_special_tokens=specials).ids

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
            if tok in self.special_tokens or tok in SPECIALS:
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


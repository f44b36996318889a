"""Tokenise documents once into a flat token stream cached as a memmap, then cut windows.

The cache holds one flat stream per split (documents joined by [SEP]) keyed by the data
and the tokenizer; windows of data.seq_len are cut at load time, so changing seq_len
reuses the cache. uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import multiprocessing
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lmtk.data.tokenizer import Tokenizer, cache_root
from lmtk.errors import UserError
from lmtk.log import Progress

CACHE_VERSION = 3  # part of the cache key: bumped when the cache's files change (2: counts.npy, 3: val.bytes)
BATCH_CHARS = 1_000_000  # text per encode call (and per task of a worker process)
POOL_AFTER_BATCHES = 4  # small data stays in-process: a pool costs ~0.1 s to start


def _batches(docs: Iterable[str], chars: int) -> Iterator[list[str]]:
    buf: list[str] = []
    size = 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if size >= chars:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


_worker_tok: Tokenizer | None = None
_worker_bytes = False


def _worker_init(tok: Tokenizer, with_bytes: bool = False) -> None:
    global _worker_tok, _worker_bytes
    _worker_tok, _worker_bytes = tok, with_bytes
    # Ctrl-C reaches the whole process group: the parent handles it (and stops the pool);
    # workers dying of it would each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_encode(batch: list[str]):
    return _worker_tok.encode_stream(batch, with_bytes=_worker_bytes)


def _fork_pool(tok: Tokenizer, workers: int, with_bytes: bool = False):
    """A fork pool, or None when the system cannot give one (then encoding stays in-process).
    Forked workers inherit the tokenizer, its warm word cache and the compiled split pattern;
    they never touch torch. TOKENIZERS_PARALLELISM set across the fork keeps `tokenizers` from
    warning that its threads were used before (the workers are single-threaded on purpose)."""
    from concurrent.futures import ProcessPoolExecutor

    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _worker_init, (tok, with_bytes))
        pool.submit(int).result()  # start the workers now: a failing fork shows here
        return pool
    except OSError:
        return None
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _encoded(docs: Iterable[str], tok: Tokenizer, workers: int, with_bytes: bool = False) -> Iterator[tuple[list[str], object]]:
    """(batch, ids) in document order ((batch, (ids, nbytes)) with_bytes: Tokenizer.encode_stream);
    batches after the first few go to `workers` processes when the encoding runs in Python
    (byte-level BPE's word cache)."""
    from concurrent.futures.process import BrokenProcessPool

    batches = _batches(docs, BATCH_CHARS)
    head = list(itertools.islice(batches, POOL_AFTER_BATCHES))
    for batch in head:
        yield batch, tok.encode_stream(batch, with_bytes=with_bytes)
    pool = None
    if len(head) == POOL_AFTER_BATCHES and workers > 1 and tok.parallel_encode:
        pool = _fork_pool(tok, workers, with_bytes)
    if pool is None:
        for batch in batches:
            yield batch, tok.encode_stream(batch, with_bytes=with_bytes)
        return
    pending: collections.deque = collections.deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(_worker_encode, batch)))
            if len(pending) > 2 * workers:  # bounded read-ahead: memory stays flat on big corpora
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()
    except BrokenProcessPool:
        raise UserError("a tokenising worker process died (out of memory?); "
                        "try again, or lower data.max_chars to find the document") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def encode_workers() -> int:
    """One per usable core (at most 8) on Linux; elsewhere 1: the pool forks, and fork is unsafe
    on macOS once system frameworks are loaded (Python itself defaults to spawn there)."""
    if not sys.platform.startswith("linux"):
        return 1
    return min(len(os.sched_getaffinity(0)), 8)


COUNT_CHUNK = 1 << 22  # tokens per np.bincount call when counting a stored stream (32 MB of int64)


def count_tokens(tokens: np.ndarray, vocab: int, chunk: int | None = None) -> np.ndarray:
    """Occurrences of each id in `tokens` (a memmap is fine), as int64 [vocab]. Counts a chunk at
    a time: memory O(vocab + chunk), never an int64 copy of the whole stream."""
    chunk = chunk or COUNT_CHUNK
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=vocab)
    return counts


BYTES_DTYPE = np.uint32  # per-token byte counts (a [SEP] after a long whitespace run can pass 65535)


def tokenize_to_file(docs: Iterable[str], tok: Tokenizer, path: Path, dtype, workers: int | None = None,
                     progress: Callable[[int], None] | None = None, counts: np.ndarray | None = None,
                     bytes_path: Path | None = None) -> tuple[int, int]:
    """Stream documents through the tokenizer into a raw binary file. Returns (tokens, chars);
    `progress(chars)` is called after every batch; `counts` (int64 [vocab]), when given, gets
    the occurrences of every id added while the ids stream past; `bytes_path`, when given,
    receives the parallel stream of per-token UTF-8 byte counts (BYTES_DTYPE; see
    Tokenizer.encode_stream), the denominator of bits-per-byte."""
    n_tok = n_chars = 0
    with open(path, "wb") as f, (open(bytes_path, "wb") if bytes_path is not None else contextlib.nullcontext()) as fb:
        for batch, out in _encoded(docs, tok, encode_workers() if workers is None else workers, fb is not None):
            ids, nbytes = out if fb is not None else (out, None)
            chars = sum(map(len, batch))
            n_chars += chars
            f.write(ids.astype(dtype).tobytes())
            if fb is not None:
                fb.write(nbytes.astype(BYTES_DTYPE).tobytes())
            n_tok += len(ids)
            if counts is not None and len(ids):
                counts += np.bincount(ids, minlength=len(counts))
            if progress is not None:
                progress(chars)
        for fh in (f, fb):
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
    return n_tok, n_chars


class TokenCache:
    """Flat token streams of the train and val splits, tokenised once per (data, tokenizer)."""

    def __init__(self, source, tok: Tokenizer, seq_len: int):
        self.tok, self.source = tok, source
        self.dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
        key = hashlib.sha256(f"{CACHE_VERSION}:{source.fingerprint()}:{tok.fingerprint()}".encode()).hexdigest()[:16]
        self.dir = cache_root() / "tokens" / key
        self.hit = (self.dir / "meta.json").is_file()
        if not self.hit:
            self._build(source)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.train = self._open("train.bin") if self.meta["train_tokens"] else np.zeros(0, self.dtype)
        self.val = self._open("val.bin") if self.meta["val_tokens"] else None
        self.val_bytes = self._open("val.bytes", BYTES_DTYPE) if self.meta["val_tokens"] else None
        self._ensure_sizes(seq_len)

    def _open(self, name: str, dtype=None) -> np.ndarray:
        return np.memmap(self.dir / name, dtype=dtype or self.dtype, mode="r")

    def _build(self, source) -> None:
        tmp = self.dir.with_name(self.dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            with Progress("tokenising", source.approx_chars(), "MB", 1e6) as progress:
                counts = np.zeros(self.tok.vocab_size, dtype=np.int64)
                n_train, chars = tokenize_to_file(source.documents("train"), self.tok, tmp / "train.bin", self.dtype,
                                                  progress=progress, counts=counts)
                n_val, _ = tokenize_to_file(source.documents("val"), self.tok, tmp / "val.bin", self.dtype, progress=progress,
                                            bytes_path=tmp / "val.bytes")
        except BaseException:  # an error or Ctrl-C: no half-written streams left in the cache
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.tok.release_word_cache()  # up to a few hundred MB, not needed for training
        meta = {
            "train_tokens": n_train,
            "val_tokens": n_val,
            "train_chars": chars,
            "dtype": np.dtype(self.dtype).name,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        np.save(tmp / "counts.npy", counts)
        (tmp / "meta.json").write_text(json.dumps(meta))
        if self.dir.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, self.dir)

    def unigram(self, val_tokens: int) -> tuple[float, float]:
        """(loss, bits per byte) of the train split's unigram model on the first val_tokens of val:
        the baseline every run's summary prints beside its own."""
        n = min(len(self.val), val_tokens)
        return unigram_bpb(self.train_counts(), self.val[:n], self.val_bytes[:n])

    def train_counts(self) -> np.ndarray:
        """Occurrences of each id in the train stream (int64 [vocab]), for the unigram baseline.
        Counted while the cache was built (counts.npy); a cache from before that is counted now,
        in chunks, and the counts stored. When the val split was cut from the tail of train, the
        tail's counts are taken out."""
        path = self.dir / "counts.npy"
        if path.is_file():
            counts = np.load(path)
        else:
            full = self._open("train.bin")
            counts = count_tokens(full, self.tok.vocab_size)
            tmp = path.with_name(f"counts.tmp{os.getpid()}.npy")
            np.save(tmp, counts)
            os.replace(tmp, path)
        if self.val_from_train:
            counts = counts - count_tokens(self.val, self.tok.vocab_size)
        return counts

    def _ensure_sizes(self, seq_len: int) -> None:
        self.val_from_train = False
        if len(self.train) == 0:
            raise UserError("the training data is empty (no text after reading); check data.train")
        if self.val is None or len(self.val) < seq_len:
            # Too few held-out documents (tiny corpus): hold out the tail of the stream instead.
            n_val = max(seq_len, int(len(self.train) * 0.01))
            if len(self.train) - n_val < seq_len:
                raise UserError(
                    f"the data has {len(self.train)} tokens, fewer than two sequences of data.seq_len={seq_len}; "
                    "give more text or lower data.seq_len"
                )
            self.val = self.train[-n_val:]
            self.val_bytes = self._train_tail_bytes(n_val)
            self.train = self.train[:-n_val]
            self.val_from_train = True

    def _train_tail_bytes(self, n: int) -> np.ndarray:
        """Per-token bytes of the last n train tokens, for a val split cut from the tail. Byte-level
        BPE without a normaliser reads them off its table; other tokenizers tokenise the train
        documents again with offsets, once: the result is stored as train.bytes."""
        if self.tok.exact_token_bytes:
            return self.tok.token_bytes()[np.asarray(self.train[-n:])]
        path = self.dir / "train.bytes"
        if not path.is_file():
            tmp_ids, tmp_bytes = (self.dir / f".train-{os.getpid()}.tmp{suffix}" for suffix in (".bin", ".bytes"))
            try:
                n_tok, _ = tokenize_to_file(self.source.documents("train"), self.tok, tmp_ids, self.dtype, bytes_path=tmp_bytes)
                if n_tok != len(self.train):
                    raise UserError(f"the training data changed while in use (cache {self.dir}); delete it and run again")
                os.replace(tmp_bytes, path)
            finally:
                tmp_ids.unlink(missing_ok=True)
                tmp_bytes.unlink(missing_ok=True)
        return self._open("train.bytes", BYTES_DTYPE)[-n:]


class Batches:
    """Fixed-length windows of a token stream, visited in a seeded permutation per epoch.

    Stateless by design: sample number s (counted from the start of training) always maps
    to the same window, so the data position is one integer and resume is exact."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, nbytes: np.ndarray | None = None):
        """`nbytes`: per-token UTF-8 byte counts beside `tokens` (TokenCache.val_bytes), which
        ordered() yields for bits-per-byte."""
        if nbytes is not None and len(nbytes) != len(tokens):
            raise ValueError(f"{len(nbytes)} byte counts for {len(tokens)} tokens")
        self.tokens, self.seq_len, self.seed, self.nbytes = tokens, seq_len, seed, nbytes
        self.n = len(tokens) // seq_len
        self._epoch, self._perm = -1, None

    def window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[i])

    def get(self, start: int, count: int, pin: bool = False) -> torch.Tensor:
        L = self.seq_len
        rows = np.stack([self.tokens[w * L : (w + 1) * L] for w in (self.window(s) for s in range(start, start + count))])
        t = torch.from_numpy(rows.astype(np.int64))
        return t.pin_memory() if pin else t

    def ordered(self, max_tokens: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The first max_tokens worth of windows, in order (validation): (ids [B, L], the UTF-8
        bytes each token is charged for [B, L], or None without byte counts)."""
        n = max(1, min(self.n, max_tokens // self.seq_len))
        L = self.seq_len

        def rows(a, start, stop):
            return torch.from_numpy(np.asarray(a[start * L : stop * L], dtype=np.int64).reshape(-1, L))

        for start in range(0, n, batch):
            stop = min(n, start + batch)
            yield rows(self.tokens, start, stop), (rows(self.nbytes, start, stop) if self.nbytes is not None else None)


def unigram_bpb(counts: np.ndarray, val: np.ndarray, val_bytes: np.ndarray) -> tuple[float, float]:
    """Cross-entropy (nats/token) and bits-per-byte of an add-one unigram model fit on the train
    split's token counts (TokenCache.train_counts: memory O(vocab), whatever the corpus size),
    scored on `val` with its per-token bytes."""
    counts = np.asarray(counts, dtype=np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    v = np.asarray(val)
    nats = -logp[v].sum()
    return float(nats / len(v)), float(nats / np.log(2) / max(1, int(np.asarray(val_bytes, dtype=np.int64).sum())))

"""The byte-level BPE word cache gives exactly the ids `tokenizers` gives, on any text."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from omegaconf import OmegaConf

from lmtk.data import packing, wordcache
from lmtk.data.sources import stdlib_files
from lmtk.data.tokenizer import Tokenizer, train_tokenizer
from lmtk.errors import UserError

# Characters the split pattern must classify like Oniguruma does: letters and numbers outside
# ASCII (some above U+FFFF), combining marks, every kind of white space (and \x1c-\x1f, which
# Python's \s calls space and Unicode does not), contractions, symbols, emoji.
TRICKY = (
    "naïve café Ünïcödé ΑΒΓ αβγ Привет мир 中文字符 日本語テキスト 한국어 ١٢٣ ۴۵۶ ² ³ ½ Ⅻ ⅷ "
    "𝐀𝐁𝐂 𝟎𝟏𝟐 𐐀𐐨 𠀀𠀁 e\u0301 a\u0308 \x1c\x1d\x1e\x1f \u00a0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000 "
    "it's we're they've I'm you'll he'd IT'S don't 's 't ''s "
    "\t\t  \n\n    \r\n\x0b\x0c  x   y\t \tz "
    "😀👍🏽 ∑∫≈ §¶ — – … «» “quoted” ‘single’ $100 €5 ¥ £ 3.14 1e-9 0x1F _under_score_ "
)


@pytest.fixture(scope="module")
def bpe():
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in stdlib_files()[:20]) + TRICKY * 5
    cfg = OmegaConf.create(dict(kind="bpe", vocab_size=400, train_chars=300_000, lowercase=False))
    return train_tokenizer(cfg, [text])


def reference(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """What `tokenizers` itself gives: each document's ids then [SEP]."""
    return np.array([i for e in tok.tk.encode_batch(docs, add_special_tokens=False) for i in e.ids + [tok.eos_id]])


def random_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list(TRICKY) + [chr(rng.randrange(0x20, 0x3000)) for _ in range(300)] + \
        [chr(rng.randrange(0x10000, 0x2FFFF)) for _ in range(100)]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200))) for _ in range(n)]


def test_supported_only_for_plain_byte_level_bpe(bpe):
    assert wordcache.supports(bpe.tk)
    wp = train_tokenizer(OmegaConf.create(dict(kind="wordpiece", vocab_size=200, train_chars=10_000, lowercase=True)), [TRICKY * 20])
    lower = train_tokenizer(OmegaConf.create(dict(kind="bpe", vocab_size=300, train_chars=10_000, lowercase=True)), [TRICKY * 20])
    assert not wordcache.supports(wp.tk) and not wordcache.supports(lower.tk)


def test_identical_ids_on_code_unicode_and_random_text(bpe):
    code = [open(f, encoding="utf-8", errors="replace").read() for f in stdlib_files()[20:60]]
    # characters Unicode assigned after Python 3.11's database (14.0): letters to `tokenizers`
    newer = ["x\U00031350y caf\u00e9", "\U0002EBF0a b", "\U0001E4D0\U0001E4F0 \u00e9t\u00e9"]
    docs = code + [TRICKY, "", " ", "\n", "   leading and trailing   ", *newer] + random_docs(300, seed=0)
    cache = wordcache.WordCache(bpe.tk, bpe.eos_id)
    got = np.concatenate([cache.encode(docs[i : i + 37]) for i in range(0, len(docs), 37)])
    np.testing.assert_array_equal(got, reference(bpe, docs))
    assert len(cache.index) > 1000  # the cache did the work, not a fallback


def test_split_matches_the_pre_tokenizer_wherever_the_cache_is_used(bpe):
    """Stronger than equal ids (a small vocabulary may hide a split difference): equal pieces."""
    newer = ["x\U00031350y", "\U0002EBF0a", "\U0001E4D0\U0001E4F0"]  # Unicode 15+: unknown to Python 3.11
    cache = wordcache.WordCache(bpe.tk, bpe.eos_id)
    docs = [TRICKY, *random_docs(300, seed=5)]
    for doc in docs + newer:
        astral = wordcache._has_astral(doc)
        if cache.needs_tokenizers(doc, astral):
            continue
        ours = [m.span() for m in wordcache.split_pattern(astral).finditer(doc)]
        assert ours == [span for _, span in bpe.tk.pre_tokenizer.pre_tokenize_str(doc)], doc
    import unicodedata

    if unicodedata.unidata_version < "15":
        assert all(cache.needs_tokenizers(d, wordcache._has_astral(d)) for d in newer)


def test_documents_with_special_token_text_take_the_tokenizers_path(bpe):
    docs = ["plain words here", "a literal [SEP] and [MASK] inside", "more plain words"]
    got = wordcache.WordCache(bpe.tk, bpe.eos_id).encode(docs)
    np.testing.assert_array_equal(got, reference(bpe, docs))
    assert (got == bpe.mask_id).sum() == 1  # `tokenizers` matches added tokens in the text


def test_cache_starts_over_when_full(bpe, monkeypatch):
    monkeypatch.setattr(wordcache, "MAX_WORDS", 50)
    docs = random_docs(60, seed=1)
    cache = wordcache.WordCache(bpe.tk, bpe.eos_id)
    got = np.concatenate([cache.encode(docs[i : i + 5]) for i in range(0, len(docs), 5)])
    np.testing.assert_array_equal(got, reference(bpe, docs))
    assert len(cache.index) < 50 + 5 * 200


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_to_file_in_worker_processes_keeps_order(bpe, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(packing, "BATCH_CHARS", 500)
    monkeypatch.setattr(packing, "POOL_AFTER_BATCHES", 2)
    pools = []
    real = packing._fork_pool
    monkeypatch.setattr(packing, "_fork_pool", lambda *a: pools.append(real(*a)) or pools[-1])
    docs = random_docs(120, seed=2) + [TRICKY] * 3
    n_tok, n_chars = packing.tokenize_to_file(iter(docs), bpe, tmp_path / "t.bin", np.uint16, workers=workers)
    got = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
    np.testing.assert_array_equal(got, reference(bpe, docs))
    assert (n_tok, n_chars) == (len(got), sum(map(len, docs)))
    assert len(pools) == (workers > 1) and all(p is not None for p in pools)


def _die(batch):
    os._exit(1)  # as an out-of-memory kill would


def test_a_dead_worker_is_a_clear_error_not_a_hang(bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "BATCH_CHARS", 500)
    monkeypatch.setattr(packing, "POOL_AFTER_BATCHES", 1)
    monkeypatch.setattr(packing, "_worker_encode", _die)
    with pytest.raises(UserError, match="tokenising worker process died"):
        packing.tokenize_to_file(iter(random_docs(50, seed=4)), bpe, tmp_path / "t.bin", np.uint16, workers=2)


def test_failed_build_leaves_no_partial_cache(bpe, monkeypatch, fresh_cache):
    class Broken:
        def fingerprint(self):
            return "broken"

        def approx_chars(self):
            return None

        def documents(self, split):
            yield "some text"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        packing.TokenCache(Broken(), bpe, 8)
    assert not any((fresh_cache / "tokens").iterdir())


def test_wordpiece_stream_matches_its_encode(tmp_path):
    wp = train_tokenizer(OmegaConf.create(dict(kind="wordpiece", vocab_size=300, train_chars=50_000, lowercase=True)), [TRICKY * 50])
    docs = [TRICKY, "Hello World", ""]
    n_tok, _ = packing.tokenize_to_file(iter(docs), wp, tmp_path / "w.bin", np.uint16, workers=2)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "w.bin", dtype=np.uint16), reference(wp, docs))


def test_tokenising_progress_reports_mb_rate_and_eta(bpe, tmp_path, monkeypatch, capsys):
    from lmtk.log import console

    monkeypatch.setattr(packing, "BATCH_CHARS", 2000)
    console.file = None  # rich follows sys.stderr (captured; not a terminal); conftest resets it after
    docs = random_docs(100, seed=3)
    total = sum(map(len, docs))
    with packing.Progress("tokenising", 2 * total, "MB", 1e6, quiet_s=0.0, every_s=0.0) as progress:
        packing.tokenize_to_file(iter(docs), bpe, tmp_path / "p.bin", np.uint16, workers=1, progress=progress)
    assert progress.done == total
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(line.startswith("tokenising: ") for line in lines)
    assert " MB/s" in lines[-1] and "ETA" in lines[-1] and f"/{2 * total / 1e6:,.1f} MB" in lines[-1]


def test_byte_counts_in_worker_processes_match_the_text(bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "BATCH_CHARS", 500)
    monkeypatch.setattr(packing, "POOL_AFTER_BATCHES", 1)
    docs = random_docs(60, seed=5) + [TRICKY, "a literal [SEP] here"] * 3
    packing.tokenize_to_file(iter(docs), bpe, tmp_path / "t.bin", np.uint16, workers=2, bytes_path=tmp_path / "t.bytes")
    ids, nbytes = bpe.encode_stream(docs, with_bytes=True)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "t.bin", dtype=np.uint16), ids)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "t.bytes", dtype=packing.BYTES_DTYPE), nbytes)
    assert nbytes.sum() == sum(len(d.encode()) for d in docs)

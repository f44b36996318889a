"""The tokenizer and token caches under LMTK_CACHE are built once and reused."""

from __future__ import annotations

import json

import pytest

import helpers

RUN = [*helpers.TINY, "budget.steps=2", "val.at_start=false"]


def _snapshot(cache):
    """{relative path: mtime_ns} of every file in the cache."""
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def test_second_run_reuses_tokenizer_and_tokens(fresh_cache, lmtk_env):
    first = helpers.train(*RUN, "run.name=one")
    assert "trained bpe tokenizer" in first.output and "tokenised" in first.output
    tok_dirs = list((fresh_cache / "tokens").iterdir())
    tokenizers = list((fresh_cache / "tokenizers").glob("*.json"))
    assert len(tok_dirs) == 1 and len(tokenizers) == 1
    assert {p.name for p in tok_dirs[0].iterdir()} >= {"train.bin", "val.bin", "meta.json"}
    before = _snapshot(fresh_cache)

    second = helpers.train(*RUN, "run.name=two")
    assert "trained bpe tokenizer" not in second.output and "tokenised" not in second.output
    assert _snapshot(fresh_cache) == before  # nothing rebuilt, nothing added
    assert (lmtk_env.runs / "one" / "tokenizer.json").read_text() == (lmtk_env.runs / "two" / "tokenizer.json").read_text()
    assert tokenizers[0].read_text() == (lmtk_env.runs / "two" / "tokenizer.json").read_text()

    # windows are cut at load time: another seq_len reuses the same token cache
    helpers.train(*RUN, "data.seq_len=16", "run.name=three")
    assert _snapshot(fresh_cache) == before

    # another tokenizer setting is another tokenizer and another token cache
    helpers.train(*RUN, "tokenizer.vocab_size=600", "run.name=four")
    assert len(list((fresh_cache / "tokenizers").glob("*.json"))) == 2
    assert len(list((fresh_cache / "tokens").iterdir())) == 2
    assert all(_snapshot(fresh_cache)[k] == v for k, v in before.items())


def test_token_cache_matches_the_tokenizer(fresh_cache, lmtk_env):
    import json

    import numpy as np

    from lmtk.data.tokenizer import Tokenizer

    helpers.train(*RUN, "run.name=one")
    (tok_dir,) = (fresh_cache / "tokens").iterdir()
    meta = json.loads((tok_dir / "meta.json").read_text())
    train = np.fromfile(tok_dir / "train.bin", dtype=meta["dtype"])
    assert meta["dtype"] == "uint16" and len(train) == meta["train_tokens"] > 1000
    tok = Tokenizer.from_file(lmtk_env.runs / "one" / "tokenizer.json")
    assert train.max() < tok.vocab_size
    # the cached streams are the tokenization of the source's own documents, each followed by [SEP]
    from lmtk.config import compose
    from lmtk.data.sources import Source

    src = Source(compose("default", [*RUN, "run.name=one"]).data)
    docs = {split: list(src.documents(split)) for split in ("train", "val")}
    expected = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs["train"]])
    np.testing.assert_array_equal(train, expected)
    assert tok.decode(train[: len(tok.encode(docs["train"][0]))]) == tok.decode(tok.encode(docs["train"][0]))
    val = np.fromfile(tok_dir / "val.bin", dtype=meta["dtype"])
    ids, nbytes = tok.encode_stream(docs["val"], with_bytes=True)
    np.testing.assert_array_equal(val, ids)
    # beside val: each token's bytes of the original text, adding up to the documents' UTF-8 bytes
    val_bytes = np.fromfile(tok_dir / "val.bytes", dtype=np.uint32)
    np.testing.assert_array_equal(val_bytes, nbytes)
    assert val_bytes.sum() == sum(len(d.encode()) for d in docs["val"]) > 0  # held-out documents even when capped


def test_tokenizer_path_reuses_a_runs_tokenizer(lmtk_env):
    helpers.train(*RUN, "run.name=src")
    # a different vocab_size would train another tokenizer; tokenizer.path wins
    res = helpers.train(*RUN, "tokenizer.vocab_size=700", "tokenizer.path=src", "run.name=dst")
    assert "trained" not in res.output
    runs = lmtk_env.runs
    assert (runs / "dst" / "tokenizer.json").read_text() == (runs / "src" / "tokenizer.json").read_text()


# ---- token counts for the unigram baseline ------------------------------------------------


def _text_cache(tmp_path, n_docs=300, vocab=300, seq_len=16, val_fraction=0.1, kind="bpe"):
    """A TokenCache over a small text corpus in tmp_path (LMTK_CACHE is the test's)."""
    import random

    from lmtk.config import compose
    from lmtk.data.packing import TokenCache
    from lmtk.data.sources import Source
    from lmtk.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "the a model token data train loss value layer head step batch cache run text file word".split()
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n" for _ in range(n_docs)))
    cfg = compose("default", ["budget.steps=1", "data=text", f"data.train={f}", f"data.val_fraction={val_fraction}",
                              f"tokenizer={kind}", f"tokenizer.vocab_size={vocab}"])
    src = Source(cfg.data)
    tok = train_tokenizer(cfg.tokenizer, src.documents("train"))
    return src, tok, TokenCache(src, tok, seq_len)


def test_count_tokens_in_chunks_equals_bincount(monkeypatch):
    import numpy as np

    from lmtk.data import packing

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 10_007).astype(np.uint16)
    seen = []
    real = np.bincount
    monkeypatch.setattr(np, "bincount", lambda x, **kw: seen.append(len(x)) or real(x, **kw))
    counts = packing.count_tokens(tokens, 64, chunk=1000)
    assert counts.dtype == np.int64 and counts.shape == (64,)
    np.testing.assert_array_equal(counts, real(tokens, minlength=64))
    assert seen and max(seen) <= 1000  # never the whole stream at once


def test_cache_stores_train_counts_and_unigram_uses_them(fresh_cache, tmp_path, monkeypatch):
    import numpy as np

    from lmtk.data import packing

    src, tok, cache = _text_cache(tmp_path)
    counts_file = cache.dir / "counts.npy"
    assert counts_file.is_file()
    train = np.fromfile(cache.dir / "train.bin", dtype=cache.meta["dtype"])
    np.testing.assert_array_equal(np.load(counts_file), np.bincount(train, minlength=tok.vocab_size))
    assert len(np.load(counts_file)) == tok.vocab_size

    # an older cache without counts: counted in chunks when first needed, then stored
    counts_file.unlink()
    monkeypatch.setattr(packing, "COUNT_CHUNK", 100)
    seen = []
    real = np.bincount
    monkeypatch.setattr(np, "bincount", lambda x, **kw: seen.append(len(x)) or real(x, **kw))
    again = packing.TokenCache(src, tok, 16)
    assert again.hit
    np.testing.assert_array_equal(again.train_counts(), real(train, minlength=tok.vocab_size))
    assert counts_file.is_file() and max(seen) <= 100

    # the unigram baseline reads the counts, never the train stream
    monkeypatch.setattr(np, "bincount", real)
    loss, bpb = packing.unigram_bpb(again.train_counts(), again.val, again.val_bytes)
    p = (real(train, minlength=tok.vocab_size) + 1.0) / (len(train) + tok.vocab_size)
    assert loss == pytest.approx(-np.log(p[np.asarray(again.val)]).mean())
    assert bpb == pytest.approx(loss * len(again.val) / np.log(2) / int(np.asarray(again.val_bytes).sum()))


def test_counts_leave_out_a_val_split_cut_from_train(fresh_cache, tmp_path):
    import numpy as np

    _, tok, cache = _text_cache(tmp_path, val_fraction=0.0)
    assert cache.val_from_train  # no held-out documents: the tail of train is val
    np.testing.assert_array_equal(cache.train_counts(), np.bincount(np.asarray(cache.train), minlength=tok.vocab_size))


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_val_cut_from_train_gets_the_bytes_of_its_text(fresh_cache, tmp_path, kind):
    """A corpus with no held-out documents validates on the tail of train: its byte counts are
    those of the train documents' text (WordPiece: tokenised again with offsets, stored)."""
    import numpy as np

    from lmtk.data import packing

    src, tok, cache = _text_cache(tmp_path, val_fraction=0.0, kind=kind)
    assert cache.val_from_train
    ids, nbytes = tok.encode_stream(list(src.documents("train")), with_bytes=True)
    n = len(cache.val)
    np.testing.assert_array_equal(np.asarray(cache.val), ids[-n:])
    np.testing.assert_array_equal(np.asarray(cache.val_bytes), nbytes[-n:])
    assert (cache.dir / "train.bytes").is_file() == (kind == "wordpiece")
    again = packing.TokenCache(src, tok, 16)  # stored: read back, not recomputed
    np.testing.assert_array_equal(np.asarray(again.val_bytes), nbytes[-n:])

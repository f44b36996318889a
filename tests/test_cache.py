"""The tokenizer and token caches under LMTK_CACHE are built once and reused."""

from __future__ import annotations

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
    # documents are joined by [SEP]; decoding the start gives back real Python source
    first_doc = train[: int(np.argmax(train == tok.eos_id))]
    text = tok.decode(first_doc)
    assert len(first_doc) > 10 and ("def " in text or "import " in text)


def test_tokenizer_path_reuses_a_runs_tokenizer(lmtk_env):
    helpers.train(*RUN, "run.name=src")
    # a different vocab_size would train another tokenizer; tokenizer.path wins
    res = helpers.train(*RUN, "tokenizer.vocab_size=700", "tokenizer.path=src", "run.name=dst")
    assert "trained" not in res.output
    runs = lmtk_env.runs
    assert (runs / "dst" / "tokenizer.json").read_text() == (runs / "src" / "tokenizer.json").read_text()

"""Data sources (txt, jsonl, parquet, directory, glob, saved HF dataset), the split, the tokenizer."""

from __future__ import annotations

import json
import random

import pytest

import helpers
from lmtk.config import compose
from lmtk.data.sources import Source
from lmtk.errors import UserError

WORDS = "the a model token data train loss value layer head step batch cache run text file word".split()


def make_docs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def source(*overrides: str) -> Source:
    return Source(compose("default", ["budget.steps=1", *overrides]).data)


def all_docs(src: Source) -> list[str]:
    return list(src.documents("train")) + list(src.documents("val"))


# ---- file formats -------------------------------------------------------------------------


def test_txt_documents_split_at_blank_lines(tmp_path):
    paras = ["first paragraph " * 200, "second one " * 200, "third " * 10]
    f = tmp_path / "a.txt"
    f.write_text("\n\n".join(paras) + "\n")
    docs = all_docs(source("data=text", f"data.train={f}"))
    text = "\n\n".join(docs)
    for p in paras:
        assert p.strip() in text
    assert len(docs) >= 2  # grouped into documents of about 2000 characters


def test_txt_invalid_utf8_is_replaced_not_fatal(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good text \xff\xfe more text\n\nsecond \xc3\x28 paragraph\n")
    docs = all_docs(source("data=text", f"data.train={f}"))
    joined = "".join(docs)
    assert "\ufffd" in joined and "good text" in joined and "second" in joined


def test_jsonl_field(tmp_path):
    rows = make_docs(30)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"content": r, "id": i}) + "\n" for i, r in enumerate(rows)) + "\n")
    docs = all_docs(source("data=text", f"data.train={f}", "data.field=content"))
    assert sorted(docs) == sorted(rows)


def test_jsonl_missing_field_and_bad_json(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match="no field 'content'"):
        all_docs(source("data=text", f"data.train={f}", "data.field=content"))
    f.write_text(json.dumps({"text": "x"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"d.jsonl:2 is not valid JSON"):
        all_docs(source("data=text", f"data.train={f}"))


def test_parquet_via_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = make_docs(25, seed=1)
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": rows, "n": list(range(25))}), f)
    assert sorted(all_docs(source("data=text", f"data.train={f}", "data.field=body"))) == sorted(rows)
    with pytest.raises(UserError, match="no column 'text'"):
        all_docs(source("data=text", f"data.train={f}"))


def test_directory_and_glob(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha document\n")
    (d / "sub" / "b.md").write_text("beta document\n")
    (d / "c.jsonl").write_text(json.dumps({"text": "gamma document"}) + "\n")
    (d / "image.png").write_bytes(b"\x89PNG\x00\x00binary")  # skipped: not a text suffix
    docs = all_docs(source("data=text", f"data.train={d}"))
    assert sorted(docs) == ["alpha document\n", "beta document\n", "gamma document"]
    globbed = all_docs(source("data=text", f"data.train={d}/**/*.md"))
    assert globbed == ["beta document\n"]
    both = all_docs(source("data=text", f"data.train=[{d}/a.txt,{d}/sub/b.md]"))
    assert sorted(both) == ["alpha document\n", "beta document\n"]


def test_explicit_val_files(tmp_path):
    (tmp_path / "tr.txt").write_text("train text\n")
    (tmp_path / "va.txt").write_text("val text\n")
    src = source("data=text", f"data.train={tmp_path}/tr.txt", f"data.val={tmp_path}/va.txt")
    assert list(src.documents("train")) == ["train text\n"]
    assert list(src.documents("val")) == ["val text\n"]


@pytest.mark.parametrize(
    "spec,needle",
    [("/nonexistent/x.txt", "not found"), ("/nonexistent/*.txt", "no files match")],
)
def test_missing_files(spec, needle):
    with pytest.raises(UserError, match=needle):
        source("data=text", f"data.train={spec}")


def test_binary_file_is_refused(tmp_path):
    f = tmp_path / "blob.txt"
    f.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(UserError, match="binary"):
        all_docs(source("data=text", f"data.train={f}"))


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = make_docs(40, seed=2)
    path = tmp_path / "hfds"
    datasets.Dataset.from_dict({"text": rows + ["", "   "], "label": list(range(42))}).save_to_disk(str(path))
    src = source("data=hf", f"data.name={path}")
    assert sorted(all_docs(src)) == sorted(rows)  # empty rows dropped
    with pytest.raises(UserError, match="no column 'body'"):
        all_docs(source("data=hf", f"data.name={path}", "data.field=body"))


def test_hf_dataset_dict_with_val_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    tr, va = make_docs(20, seed=3), make_docs(5, seed=4)
    path = tmp_path / "hfdd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": tr}), "validation": datasets.Dataset.from_dict({"text": va})}
    ).save_to_disk(str(path))
    src = source("data=hf", f"data.name={path}", "data.val_split=validation")
    assert list(src.documents("train")) == tr and list(src.documents("val")) == va


# ---- split and cap ----------------------------------------------------------------------


def test_document_split_is_deterministic_and_disjoint(tmp_path):
    rows = make_docs(600, seed=5, words=10)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    over = ("data=text", f"data.train={f}", "data.val_fraction=0.2")
    a, b = source(*over), source(*over)
    tr, va = list(a.documents("train")), list(a.documents("val"))
    assert tr == list(b.documents("train")) and va == list(b.documents("val"))  # same split every time
    assert not set(tr) & set(va)
    assert sorted(tr + va) == sorted(rows)  # nothing lost, whole documents only
    assert 60 < len(va) < 180  # ~20% held out
    # order of train documents is the file order
    assert tr == [r for r in rows if r in set(tr)]


def test_split_does_not_depend_on_process_hash_seed(tmp_path):
    """The split must be the same in another interpreter (PYTHONHASHSEED differs)."""
    import subprocess
    import sys

    rows = make_docs(200, seed=6, words=8)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    code = (
        "from lmtk.config import compose; from lmtk.data.sources import Source;"
        f"s=Source(compose('default',['budget.steps=1','data=text','data.train={f}','data.val_fraction=0.2']).data);"
        "print(len(list(s.documents('val'))), sum(map(len, s.documents('val'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__('os').environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    va = list(source("data=text", f"data.train={f}", "data.val_fraction=0.2").documents("val"))
    assert out.stdout.split() == [str(len(va)), str(sum(map(len, va)))]


def test_max_chars_caps_the_text(tmp_path):
    rows = make_docs(100, seed=7)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    docs = all_docs(source("data=text", f"data.train={f}", "data.max_chars=1000"))
    assert sum(map(len, docs)) == 1000


def test_fingerprint_changes_with_the_data(tmp_path):
    import os

    f = tmp_path / "a.txt"
    f.write_text("one\n")
    fp1 = source("data=text", f"data.train={f}").fingerprint()
    assert source("data=text", f"data.train={f}").fingerprint() == fp1
    f.write_text("one two\n")
    os.utime(f, ns=(10**18, 10**18))
    assert source("data=text", f"data.train={f}").fingerprint() != fp1
    assert source("data=text", f"data.train={f}", "data.max_chars=5").fingerprint() != source("data=text", f"data.train={f}").fingerprint()


def test_embedded_source_is_the_stdlib():
    src = source("data.max_chars=20000")
    assert len(src.files) > 100 and all(p.suffix == ".py" for p in src.files)
    assert not any("/test/" in str(p) or "/tests/" in str(p) for p in src.files)
    assert sum(map(len, all_docs(src))) == 20000


# ---- the embedded corpus's split ------------------------------------------------------------


def _shingle_hashes(doc: str, n: int = 5):
    """Distinct hashes of a document's character n-grams (the test's own, independent of lmtk's)."""
    import numpy as np

    cp = np.frombuffer(doc.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    cp = np.concatenate([cp, np.zeros(max(0, n - len(cp)), np.uint64)])
    h = np.zeros(len(cp) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * np.uint64(1000003) + cp[i : len(cp) - n + 1 + i]
    return np.unique(h)


def test_embedded_val_is_documents_from_many_files_without_near_duplicates_in_train():
    """Held-out documents come from across the library, and none has a near-duplicate
    (character 5-gram Jaccard >= 0.8) in train: MinHash with 64 permutations finds candidate
    pairs, their exact Jaccard decides."""
    import numpy as np

    src = source()
    val, train = list(src.labelled("val")), list(src.labelled("train"))
    assert len({origin for origin, _ in val}) >= 50
    assert 40_000 < sum(len(d) for _, d in val) < 0.05 * sum(len(d) for _, d in train)
    assert max(len(d) for _, d in val) < 60_000  # documents, not whole files
    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**63, 64, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, 64, dtype=np.uint64)

    def minhash(sh):
        with np.errstate(over="ignore"):
            return ((sh[:, None] * a + b) >> np.uint64(11)).min(axis=0)

    vsh = [_shingle_hashes(d) for _, d in val]
    tsh = [_shingle_hashes(d) for _, d in train]
    vsig, tsig = np.stack([minhash(x) for x in vsh]), np.stack([minhash(x) for x in tsh])
    estimate = (vsig[:, None, :] == tsig[None, :, :]).mean(-1)
    for i, j in zip(*np.nonzero(estimate >= 0.6)):
        jac = len(np.intersect1d(vsh[i], tsh[j])) / len(np.union1d(vsh[i], tsh[j]))
        assert jac < 0.8, (val[i][0], train[j][0], jac)


def test_embedded_corpus_leaves_out_generated_files():
    from lmtk.data.sources import is_generated, stdlib_files

    names = {"/".join(p.parts[-2:]) for p in stdlib_files()}
    for generated in ("encodings/iso8859_13.py", "encodings/cp1252.py", "encodings/mac_roman.py", "pydoc_data/topics.py"):
        assert generated not in names
    for written in ("encodings/utf_8.py", "encodings/__init__.py", "http/cookiejar.py", "json/decoder.py"):
        assert written in names  # cookiejar quotes a "generated file" notice in a string: not a header
    assert not any("gencodec" in p.read_text(errors="replace")[:500] for p in stdlib_files())
    assert is_generated('""" Python Character Mapping Codec x generated from \'X.TXT\' with gencodec.py.\n"""\n')
    assert is_generated("# -*- coding: utf-8 -*-\n# Autogenerated by Sphinx on Mon Dec  4 17:55:07 2023\n")
    assert not is_generated("import os\n" * 10 + "# This file is generated by hand\n")


def test_a_val_document_copied_into_train_moves_to_train():
    from lmtk.data.sources import near_duplicates, sketch

    docs = make_docs(50, seed=13, words=300)
    val = {0: sketch(docs[0]), 1: sketch(docs[1])}
    copy = docs[0][:-30].replace("model", "modal", 2) + " extra"  # Jaccard ~0.9
    train = [sketch(d) for d in docs[2:]] + [sketch(copy)]
    assert near_duplicates(val, train, 0.7) == {0}
    assert near_duplicates(val, train[:-1], 0.7) == set()


def test_embedded_split_with_capped_text_still_has_a_val():
    src = source("data.max_chars=500000")
    val = list(src.labelled("val"))
    assert len(val) >= 2 and sum(len(d) for _, d in val) > 5000
    assert not {d for _, d in val} & set(src.documents("train"))


# ---- the tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_specials_and_roundtrip(kind):
    from lmtk.data.tokenizer import SPECIALS, train_tokenizer

    cfg = compose("default", ["budget.steps=1", f"tokenizer={kind}", "tokenizer.vocab_size=400"]).tokenizer
    tok = train_tokenizer(cfg, make_docs(200, seed=8))
    vocab = tok.tk.get_vocab()
    assert [vocab[s] for s in SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.eos_id, tok.mask_id) == (0, 3, 4)
    assert tok.vocab_size <= 400
    text = "the model data train loss"
    ids = tok.encode(text)
    assert ids and all(i >= 5 for i in ids)
    assert tok.decode(ids).strip() == text
    # bits-per-byte's denominator: the real UTF-8 bytes of the text, whatever the tokenizer
    ids, nbytes = tok.encode_stream([text + "  again"], with_bytes=True)
    assert len(nbytes) == len(ids) and nbytes.sum() == len((text + "  again").encode())


# Non-ASCII (2-, 3- and 4-byte characters, a combining accent BERT's normaliser strips), runs of
# spaces and tabs, characters WordPiece drops (control characters, U+FFFD), a literal "[SEP]".
TRICKY_TEXT = [
    "def  f(x):\n\t\treturn x   # café, naïve, Ångström, e\u0301, 日本語, 😀\n\n\n",
    "bell\x07 here \ufffd and \x00 nul, zero\u200bwidth,   trailing spaces   \n",
    "a literal [SEP] inside, then ΑΒΓ δεζ and ½ ² ﬁ",
    "",
    "   ",
]


@pytest.mark.parametrize("lowercase", [False, True])
def test_bpe_and_wordpiece_charge_the_same_real_bytes(lowercase):
    """Every tokenizer's per-token byte counts add up to the document's UTF-8 length, so bits
    per byte divide by the same number for BPE and WordPiece on the same text."""
    from types import SimpleNamespace

    import numpy as np

    from lmtk.data.tokenizer import train_tokenizer

    corpus = make_docs(200, seed=11) + TRICKY_TEXT * 20
    totals = {}
    for kind in ("bpe", "wordpiece"):
        tok = train_tokenizer(SimpleNamespace(kind=kind, vocab_size=400, train_chars=10**9, lowercase=lowercase), corpus)
        for doc in TRICKY_TEXT + make_docs(3, seed=12):
            ids, nbytes = tok.encode_stream([doc], with_bytes=True)
            np.testing.assert_array_equal(ids, tok.encode_stream([doc]))  # the same ids as without bytes
            assert ids[-1] == tok.eos_id and (nbytes >= 0).all()
            assert nbytes.sum() == len(doc.encode("utf-8")), (kind, doc)
        ids, nbytes = tok.encode_stream(TRICKY_TEXT, with_bytes=True)
        totals[kind] = int(nbytes.sum())
        # a batch is its documents back to back: each one's bytes end at its own [SEP]
        each = [tok.encode_stream([d], with_bytes=True) for d in TRICKY_TEXT]
        np.testing.assert_array_equal(ids, np.concatenate([i for i, _ in each]))
        np.testing.assert_array_equal(nbytes, np.concatenate([b for _, b in each]))
    assert totals["bpe"] == totals["wordpiece"] == sum(len(d.encode()) for d in TRICKY_TEXT)


@pytest.mark.parametrize(
    "kind",
    [
        "bpe",
        pytest.param("wordpiece", marks=pytest.mark.xfail(strict=True, reason=(
            "upstream: tokenizers' WordPieceTrainer breaks count ties at the vocabulary cut nondeterministically "
            "(a few tokens differ between trainings on the same text). lmtk caches the trained tokenizer per data + "
            "settings, so runs sharing a cache agree; a fresh cache may give a slightly different WordPiece vocab."))),
    ],
)
def test_tokenizer_training_is_deterministic(kind):
    from types import SimpleNamespace

    from lmtk.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    docs = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(300)]
    cfg = SimpleNamespace(kind=kind, vocab_size=300, train_chars=10**9, lowercase=False)
    assert len({train_tokenizer(cfg, docs).to_str() for _ in range(4)}) == 1


def test_tiny_train_on_text_and_hf_sources(tmp_path):
    """The whole pipeline on local files (a directory) and a saved HF dataset."""
    datasets = pytest.importorskip("datasets")
    rows = make_docs(400, seed=9)
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(4):
        (d / f"part{i}.txt").write_text("\n\n".join(rows[i::4]))
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "hf"))
    common = [*helpers.TINY_MODEL, "data.seq_len=32", "tokenizer.vocab_size=300", "budget.hours=null",
              "budget.steps=3", "val.tokens=1024", "train.batch_size=4", "train.micro_batch_size=4"]
    for name, src in (("txt", ["data=text", f"data.train={d}"]), ("hf", ["data=hf", f"data.name={tmp_path / 'hf'}"])):
        helpers.train(*src, *common, f"run.name={name}")
        info = helpers.info(tmp_path / "runs" / name)
        assert info["status"] == "done" and info["summary"]["steps"] == 3

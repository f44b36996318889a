"""Text sources. Each yields documents (str); a document never straddles train and val.

- embedded: the running Python's standard-library source, test suites excluded
- text: local .txt (documents split at blank lines), .jsonl and .parquet (data.field)
- hf: datasets.load_dataset(name, config) -- a hub name, or a local dataset folder
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from lmtk.errors import UserError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".json", ".parquet", ""}
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _expand(spec) -> list[Path]:
    """Paths, globs, directories or lists of them -> sorted file list; a clear error when empty."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[Path] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        matches = sorted(glob.glob(s, recursive=True)) if glob.has_magic(s) else [s]
        if not matches:
            raise UserError(f"no files match '{s}'; check data.train / data.val")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            elif p.is_file():
                out.append(p)
            else:
                raise UserError(f"data file not found: {m}; check data.train / data.val")
    if not out:
        raise UserError(f"no data files in {specs}; check data.train / data.val")
    return out


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror}") from None
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks binary (NUL bytes), not text; point data.train at text files")
    return raw.decode("utf-8", errors="replace")  # invalid UTF-8 is replaced, never fatal


def _split_paragraphs(text: str, target: int = 2000) -> Iterator[str]:
    """Group blank-line-separated paragraphs into documents of about `target` characters."""
    buf, size = [], 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= target:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _file_docs(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=[field]) if field in names else None
        except Exception as err:
            raise UserError(f"cannot read parquet file {path}: {str(err).splitlines()[0]}") from None
        if table is None:  # pyarrow raises ArrowInvalid (a multi-line message), not KeyError, for a missing column
            raise UserError(f"{path} has no column '{field}' (columns: {', '.join(names)}); set data.field")
        for value in table.column(field).to_pylist():
            if value:
                yield str(value)
    elif path.suffix == ".jsonl":
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON") from None
            if field not in row:
                raise UserError(f"{path}:{n} has no field '{field}'; set data.field")
            if row[field]:
                yield str(row[field])
    else:
        yield from _split_paragraphs(_read_text(path))


class Source:
    """Documents of one dataset, split deterministically into train and val."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.kind = cfg.source
        if self.kind == "embedded":
            self.files = stdlib_files()
        elif self.kind == "text":
            if cfg.train is None:
                raise UserError("data=text needs data.train=PATH (file, glob or directory)")
            self.files = _expand(cfg.train)
            self.val_files = _expand(cfg.val) if cfg.val is not None else None
        elif self.kind == "hf":
            if not cfg.name:
                raise UserError("data=hf needs data.name=<dataset> (e.g. wikitext)")
        else:
            raise UserError(f"unknown data.source '{self.kind}'")

    def fingerprint(self) -> str:
        """Identifies the data (files' names, sizes and mtimes; HF name/config/split)."""
        h = hashlib.sha256()
        c = self.cfg
        h.update(repr((self.kind, c.field, c.val_fraction, c.max_chars, c.name, c.config, c.split, c.val_split)).encode())
        for f in getattr(self, "files", []) + (getattr(self, "val_files", None) or []):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def approx_chars(self) -> int | None:
        """About how many characters documents() reads over both splits, for progress and ETA:
        plain-text file sizes (bytes: a little high for non-ASCII text), capped by data.max_chars
        (per split when the val files are given). None when unknown: HF datasets, and .jsonl /
        .parquet files, whose size says little about their text."""
        files = getattr(self, "files", None)
        cap = self.cfg.max_chars
        val_files = getattr(self, "val_files", None) or []
        if files is None or any(f.suffix in (".jsonl", ".parquet") for f in files + val_files):
            return None
        total = sum(f.stat().st_size for f in files + val_files)
        return total if cap is None else min(total, cap * (2 if val_files else 1))

    def _hf_rows(self, split: str) -> Iterator[str]:
        import datasets

        c = self.cfg
        local = Path(c.name).expanduser()
        try:
            if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
                ds = datasets.load_from_disk(str(local))  # a folder written by save_to_disk
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(c.name, c.config, split=split)
        except Exception as err:  # hub, network, config and split errors all mean: this dataset cannot be read
            raise UserError(f"cannot load dataset '{c.name}' ({c.config}, split {split}): {str(err).splitlines()[0]}") from None
        if c.field not in ds.column_names:
            raise UserError(f"dataset '{c.name}' has no column '{c.field}' (columns: {', '.join(ds.column_names)}); set data.field")
        for batch in ds.iter(batch_size=1000):
            for text in batch[c.field]:
                if text and text.strip():
                    yield text

    def _all(self) -> Iterator[str]:
        if self.kind == "embedded":
            for f in self.files:
                yield _read_text(f)
        elif self.kind == "text":
            for f in self.files:
                yield from _file_docs(f, self.cfg.field)
        else:
            yield from self._hf_rows(self.cfg.split)

    def _capped(self, docs: Iterator[str]) -> Iterator[str]:
        left = self.cfg.max_chars
        for d in docs:
            if left is not None:
                if left <= 0:
                    return
                d = d[:left]
                left -= len(d)
            yield d

    def _is_val(self, index: int, doc: str) -> bool:
        # Hash of index and content: stable across runs and machines, no RNG state involved.
        key = zlib.crc32(f"{index}".encode() + doc[:256].encode("utf-8", "replace"))
        return (key % 100_000) < self.cfg.val_fraction * 100_000

    def documents(self, split: str) -> Iterator[str]:
        """Documents of `split` ('train' or 'val')."""
        explicit_val = (self.kind == "text" and self.val_files) or (self.kind == "hf" and self.cfg.val_split)
        if explicit_val:
            if split == "train":
                yield from self._capped(self._all())
            elif self.kind == "text":
                yield from self._capped(d for f in self.val_files for d in _file_docs(f, self.cfg.field))
            else:
                yield from self._capped(self._hf_rows(self.cfg.val_split))
            return
        for i, doc in enumerate(self._capped(self._all())):
            if self._is_val(i, doc) == (split == "val"):
                yield doc

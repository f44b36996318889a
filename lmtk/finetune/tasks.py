"""Labelled tasks: sentence and sentence-pair classification or regression.

Sources: GLUE by name through `datasets` (nyu-mll/glue), or local .tsv / .csv / .jsonl files
with configurable columns (task.text, task.text_pair, task.label). Examples are tokenised
once ([CLS] a [SEP] b [SEP] for encoders, a [SEP] b [SEP] for causal models, truncated longest
first to task.max_len) and batched by LabelledBatches: right-padded per batch with an
attention mask, visited in a seeded permutation per epoch, so the data position is one integer
(sample s of training is always the same example) and resume is exact."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtk.errors import UserError

# name -> (text column, pair column, classes (1: regression), metrics (first: the score), validation split)
GLUE = {
    "cola": ("sentence", None, 2, ["matthews", "accuracy"], "validation"),
    "sst2": ("sentence", None, 2, ["accuracy"], "validation"),
    "mrpc": ("sentence1", "sentence2", 2, ["f1", "accuracy"], "validation"),
    "qqp": ("question1", "question2", 2, ["f1", "accuracy"], "validation"),
    "stsb": ("sentence1", "sentence2", 1, ["pearson", "spearman"], "validation"),
    "mnli": ("premise", "hypothesis", 3, ["accuracy"], "validation_matched"),
    "qnli": ("question", "sentence", 2, ["accuracy"], "validation"),
    "rte": ("sentence1", "sentence2", 2, ["accuracy"], "validation"),
    "wnli": ("sentence1", "sentence2", 2, ["accuracy"], "validation"),
}


@dataclass
class Rows:
    """Raw examples of one split: texts, second texts (pair tasks) and labels as read."""

    text: list
    pair: list | None
    labels: list
    where: str  # for messages: the file or dataset split


@dataclass
class Task:
    name: str
    kind: str  # classification | regression
    classes: list  # classification: the label values, in index order; regression: []
    metrics: list
    train: "Encoded"
    val: "Encoded"

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.classes)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "classes": self.classes, "metrics": self.metrics,
                "train_examples": self.train.n, "val_examples": self.val.n}


# ---- reading ---------------------------------------------------------------------------------


def _read_table(path: Path) -> tuple[list[dict], list[str]]:
    """Rows (dicts) and the column names of a .tsv / .csv / .jsonl file."""
    if not path.is_file():
        raise UserError(f"task file not found: {path}; check task.train / task.val")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{i} is not a JSON object") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}:{i} is not a JSON object")
                    rows.append(row)
            cols = list(dict.fromkeys(k for r in rows for k in r))
            return rows, cols
        if suffix in (".tsv", ".csv", ".txt"):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="," if suffix == ".csv" else "\t", quoting=csv.QUOTE_NONE if suffix != ".csv" else csv.QUOTE_MINIMAL)
                rows = list(reader)
                return rows, list(reader.fieldnames or [])
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; give a .tsv, .csv or .jsonl file") from None
    raise UserError(f"task file {path}: unknown format '{suffix}'; use .tsv, .csv or .jsonl")


def _columns(rows: list[dict], cols: list[str], cfg, where: str) -> Rows:
    for key in ("text", "text_pair", "label"):
        col = cfg[key]
        if col is not None and col not in cols:
            raise UserError(f"{where} has no column '{col}' (task.{key}); its columns: {', '.join(map(str, cols)) or 'none'}")
    pair = [r.get(cfg.text_pair) for r in rows] if cfg.text_pair else None
    return Rows([r.get(cfg.text) for r in rows], pair, [r.get(cfg.label) for r in rows], where)


def _local(cfg) -> tuple[Rows, Rows]:
    if not cfg.train:
        raise UserError("task=local needs task.train=FILE (.tsv, .csv or .jsonl)")
    path = Path(cfg.train).expanduser()
    rows, cols = _read_table(path)
    train = _columns(rows, cols, cfg, str(path))
    if cfg.val:
        vpath = Path(cfg.val).expanduser()
        vrows, vcols = _read_table(vpath)
        return train, _columns(vrows, vcols, cfg, str(vpath))
    # no val file: a seeded share of train held out
    n = len(train.labels)
    k = max(1, int(round(cfg.val_fraction * n))) if n > 1 else 0
    order = np.random.default_rng(12345).permutation(n)
    held, kept = sorted(order[:k]), sorted(order[k:])

    def pick(idx):
        return Rows([train.text[i] for i in idx], [train.pair[i] for i in idx] if train.pair else None,
                    [train.labels[i] for i in idx], f"{path} (held out)")

    return pick(kept), pick(held)


def _glue(cfg) -> tuple[Rows, Rows]:
    name = (cfg.name or "").lower()
    if name not in GLUE:
        raise UserError(f"unknown GLUE task '{cfg.name}'; choices: {', '.join(GLUE)}")
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as err:
        raise UserError(f"cannot load GLUE task '{name}' (nyu-mll/glue): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    out = []
    for split in (cfg.split, cfg.val_split):
        if split not in ds:
            raise UserError(f"GLUE task '{name}' has no split '{split}'; its splits: {', '.join(ds)}")
        d = ds[split]
        cols = list(d.column_names)
        out.append(_columns([dict(zip(cols, vals)) for vals in zip(*(d[c] for c in cols))], cols, cfg, f"glue/{name} {split}"))
    return out[0], out[1]


# ---- labels ----------------------------------------------------------------------------------


def _number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except (TypeError, ValueError):
        return None


def _check_labels(rows: Rows) -> None:
    for i, v in enumerate(rows.labels, 1):
        if v is None or isinstance(v, str) and not v.strip():
            raise UserError(f"{rows.where}: row {i} has no label (column task.label); every example needs one")
        if not isinstance(v, (str, int, float)) or isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{rows.where}: row {i} has label {v!r}, which is neither a number nor a class name")
    for i, t in enumerate(rows.text, 1):
        if t is None:
            raise UserError(f"{rows.where}: row {i} has no text (column task.text)")


def _kind(cfg, rows: Rows) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    nums = [_number(v) for v in rows.labels]
    if all(x is not None for x in nums) and any(x != int(x) for x in nums):
        return "regression"
    return "classification"


def _key(v):
    """A class label's identity: 1, 1.0 and '1' are one class."""
    x = _number(v)
    return int(x) if x is not None and x == int(x) else str(v).strip()


def _encode_labels(rows: Rows, kind: str, classes: list | None):
    if kind == "regression":
        out = []
        for i, v in enumerate(rows.labels, 1):
            x = _number(v)
            if x is None:
                raise UserError(f"{rows.where}: row {i} has label {v!r}, not a number (task.kind=regression)")
            out.append(x)
        return np.asarray(out, dtype=np.float32), []
    keys = [_key(v) for v in rows.labels]
    if classes is None:
        classes = sorted(set(keys), key=lambda k: (isinstance(k, str), k))
    index = {c: i for i, c in enumerate(classes)}
    for i, k in enumerate(keys, 1):
        if k not in index:
            raise UserError(f"{rows.where}: row {i} has label {rows.labels[i - 1]!r}, not one of the training classes "
                            f"({', '.join(map(str, classes[:10]))})")
    return np.asarray([index[k] for k in keys], dtype=np.int64), classes


# ---- tokenising and batching -----------------------------------------------------------------


def encode(rows: Rows, tok, max_len: int, encoder: bool) -> list[list[int]]:
    """Token ids per example: [CLS] a [SEP] (b [SEP]) for encoders (no [CLS] when the tokenizer
    has none), a [SEP] (b [SEP]) for causal models; the longer text loses tokens first."""
    cls = [tok.cls_id] if encoder and tok.cls_id is not None else []
    sep = [tok.eos_id] if tok.eos_id is not None else []
    a = tok.encode_batch([str(t) for t in rows.text])
    b = tok.encode_batch([str(t) if t is not None else "" for t in rows.pair]) if rows.pair is not None else None
    out = []
    for i, x in enumerate(a):
        if b is None:
            room = max(1, max_len - len(cls) - len(sep))
            out.append(cls + x[:room] + sep)
            continue
        y = b[i]
        room = max(2, max_len - len(cls) - 2 * len(sep))
        while len(x) + len(y) > room:
            if len(x) >= len(y):
                x = x[:-1]
            else:
                y = y[:-1]
        out.append(cls + x + sep + y + sep)
    return out


class Encoded:
    """Tokenised examples with labels; get(s, n) is the padded batch of training samples s..s+n-1
    (sample s: the example at position s mod n of epoch s // n's seeded permutation)."""

    def __init__(self, ids: list[list[int]], labels: np.ndarray, seed: int, pad_id: int):
        if not ids:
            raise UserError("the task has no examples; check task.train / task.val")
        self.ids, self.labels, self.seed, self.pad_id = ids, labels, seed, pad_id
        self.n = len(ids)
        self._epoch, self._perm = -1, None

    def example(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[i])

    def batch(self, idx) -> dict:
        rows = [self.ids[i] for i in idx]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = True
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(self.labels[list(idx)])}

    def get(self, start: int, count: int, pin: bool = False) -> dict:
        b = self.batch([self.example(s) for s in range(start, start + count)])
        return {k: v.pin_memory() for k, v in b.items()} if pin else b

    def ordered(self, batch: int):
        for start in range(0, self.n, batch):
            yield self.batch(range(start, min(self.n, start + batch)))

    def tokens(self) -> int:
        return sum(len(r) for r in self.ids)


def load_task(cfg, tok, seed: int, encoder: bool) -> Task:
    """The task of the `task` config section, tokenised with the base's tokenizer."""
    if cfg.source == "glue":
        train, val = _glue(cfg)
        name = f"glue/{cfg.name.lower()}"
    elif cfg.source == "local":
        train, val = _local(cfg)
        name = cfg.name or "local"
    else:
        raise UserError("no task: give task=glue/<name> or task=local (or data=... to finetune as a language model)")
    if cfg.get("max_examples"):
        m = cfg.max_examples
        train = Rows(train.text[:m], train.pair[:m] if train.pair else None, train.labels[:m], train.where)
    if train.pair is not None:
        tok.require("eos", why="a sentence-pair task (the separator between the two texts)")
    for rows in (train, val):
        _check_labels(rows)
    kind = _kind(cfg, train)
    from lmtk.finetune.metrics import METRICS, REGRESSION_METRICS

    metrics = list(cfg.metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"task.metrics: unknown metric '{bad[0]}'; choices: {', '.join(METRICS)}")
    if cfg.source == "local":
        if kind == "regression" and any(m not in REGRESSION_METRICS for m in metrics):
            metrics = ["pearson", "spearman"]
        if kind == "classification" and any(m in REGRESSION_METRICS for m in metrics):
            raise UserError(f"task.metrics={metrics}: {', '.join(REGRESSION_METRICS)} are for regression (task.kind=regression)")
    train_y, classes = _encode_labels(train, kind, None)
    val_y, _ = _encode_labels(val, kind, classes if kind == "classification" else None)
    if kind == "classification" and cfg.num_labels is not None:
        if len(classes) > cfg.num_labels:
            raise UserError(f"task.num_labels={cfg.num_labels} but train has {len(classes)} classes ({', '.join(map(str, classes[:10]))})")
        if all(isinstance(c, int) for c in classes) and cfg.num_labels > len(classes):
            classes = list(range(cfg.num_labels))
            train_y, _ = _encode_labels(train, kind, classes)
            val_y, _ = _encode_labels(val, kind, classes)
    if kind == "classification" and len(classes) < 2:
        raise UserError(f"{train.where}: every label is {classes[0]!r}; a classification task needs at least two classes")
    pad = tok.pad_id if tok.pad_id is not None else 0
    return Task(
        name=name, kind=kind, classes=classes, metrics=metrics,
        train=Encoded(encode(train, tok, cfg.max_len, encoder), train_y, seed, pad),
        val=Encoded(encode(val, tok, cfg.max_len, encoder), val_y, seed, pad),
    )

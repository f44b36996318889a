"""Task metrics in plain numpy (GLUE's: accuracy, F1 of the positive class, Matthews correlation,
Pearson and Spearman correlation), no scikit-learn or scipy."""

from __future__ import annotations

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def f1(pred, gold, positive: int = 1) -> float:
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float((pred & gold).sum())
    denom = float(pred.sum() + gold.sum())
    return 2 * tp / denom if denom else 0.0


def matthews(pred, gold) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when a margin is constant."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    idx = {c: i for i, c in enumerate(classes)}
    C = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for p, g in zip(pred, gold):
        C[idx[g], idx[p]] += 1
    t, p = C.sum(1), C.sum(0)  # true and predicted counts per class
    n, c = C.sum(), np.trace(C)
    denom = np.sqrt(n * n - (p * p).sum()) * np.sqrt(n * n - (t * t).sum())
    return float((c * n - (t * p).sum()) / denom) if denom else 0.0


def pearson(pred, gold) -> float:
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(a) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    s = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(pred, gold) -> float:
    return pearson(_ranks(pred), _ranks(gold))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}
REGRESSION_METRICS = ("pearson", "spearman")


def compute(names, pred, gold) -> dict:
    return {n: METRICS[n](pred, gold) for n in names}

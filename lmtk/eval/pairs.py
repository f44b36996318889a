"""pairs: minimal pairs in BLiMP's format; a pair is right when sentence_good scores higher.

Input: `pairs.path`, one .jsonl file or a folder of them (one paradigm per file, BLiMP's
layout), each line {"sentence_good", "sentence_bad", optional "UID", "linguistics_term",
"field"}; or `pairs.hf=true`: every paradigm of nyu-mll/blimp from the Hugging Face hub
(needs internet and `datasets`). `pairs.limit` caps the pairs per paradigm (the first ones).

Scores: a causal reading sums log p(sentence | [SEP]) over the sentence's tokens
(scoring.continuation_logprobs with lmtk's document boundary as the context; no end token);
a masked reading is the pseudo-log-likelihood of [SEP] + sentence, the sentence's positions
each masked in turn, with the checkpoint's masked_shift. `method=auto` takes PLL for masked
models (objective mlm) and the causal reading for the rest (CLM, hybrids; models whose mixer
reads left to right). Ties count as wrong. Accuracy per paradigm (file or UID), per
linguistics_term, and overall: the mean over paradigms (BLiMP's convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmtk.errors import UserError

METHODS = ("auto", "causal", "pll")
HF_NAME = "nyu-mll/blimp"


@dataclass
class Config:
    path: Optional[str] = None  # a .jsonl file or a folder of them
    hf: bool = False  # nyu-mll/blimp from the Hugging Face hub
    limit: Optional[int] = None  # pairs per paradigm (null: all)
    method: str = "auto"  # auto | causal | pll
    batch_size: int = 64  # sentences (or masked copies) per forward


def read_file(path: Path, limit: int | None = None) -> list[dict]:
    """The pairs of one BLiMP-format .jsonl file (each with 'paradigm': UID or the file's stem)."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise UserError(f"cannot read pairs file {path}: {err.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON") from None
        for key in ("sentence_good", "sentence_bad"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise UserError(f"{path}:{n} has no '{key}' (BLiMP format: sentence_good, sentence_bad, optional UID, "
                                "linguistics_term, field)")
        pairs.append({
            "good": row["sentence_good"], "bad": row["sentence_bad"], "paradigm": str(row.get("UID") or path.stem),
            "term": str(row.get("linguistics_term") or "-"), "field": str(row.get("field") or "-"),
        })
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def load_pairs(cfg: Config) -> list[dict]:
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"pairs.limit={cfg.limit} must be at least 1 (null: all)")
    if cfg.hf:
        return _hub(cfg.limit)
    if not cfg.path:
        raise UserError("suite=pairs needs pairs.path=FILE_OR_FOLDER (BLiMP-format .jsonl), or pairs.hf=true for nyu-mll/blimp")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise UserError(f"pairs.path={cfg.path}: no such file or folder")
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"pairs.path={cfg.path} has no .jsonl files (BLiMP format: one paradigm per file)")
    pairs = [x for f in files for x in read_file(f, cfg.limit)]
    if not pairs:
        raise UserError(f"pairs.path={cfg.path} holds no pairs (empty files)")
    return pairs


def _hub(limit: int | None) -> list[dict]:
    """Every paradigm of nyu-mll/blimp (67 configs of 1,000 pairs) from the Hugging Face hub."""
    try:
        import datasets
    except ImportError:
        raise UserError("pairs.hf=true needs the `datasets` package (pip install datasets)") from None
    try:
        names = datasets.get_dataset_config_names(HF_NAME)
        pairs = []
        for name in names:
            split = "train" if limit is None else f"train[:{limit}]"
            for row in datasets.load_dataset(HF_NAME, name, split=split):
                pairs.append({"good": row["sentence_good"], "bad": row["sentence_bad"], "paradigm": str(row.get("UID") or name),
                              "term": str(row.get("linguistics_term") or "-"), "field": str(row.get("field") or "-")})
    except Exception as err:
        raise UserError(f"cannot load {HF_NAME} from the hub: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                        "offline, give pairs.path=FOLDER of BLiMP-format .jsonl files") from None
    return pairs


def sentence_scores(target, sentences: list[str], method: str, batch_size: int = 64) -> list[float]:
    """Log-likelihood (causal) or pseudo-log-likelihood (pll) of each sentence, in nats."""
    from lmtk.eval.scoring import continuation_logprobs, pseudo_log_likelihoods

    tok = target.tokenizer
    ids = [tok.encode(s) or [tok.unk_id] for s in sentences]
    if method == "causal":
        reqs = [([tok.eos_id], x) for x in ids]
        return [s for s, _ in continuation_logprobs(target.model, reqs, batch_size=batch_size, device=target.device,
                                                    dtype=target.dtype)]
    return pseudo_log_likelihoods(target.model, [[tok.eos_id] + x for x in ids], mask_id=tok.mask_id,
                                  shift=target.masked_shift, batch_size=batch_size, device=target.device,
                                  dtype=target.dtype, first=1)


def choose_method(target, method: str) -> str:
    if method not in METHODS:
        from lmtk.errors import suggest

        raise UserError(f"pairs.method={method} is not one of: {', '.join(METHODS)}{suggest(method, METHODS)}")
    if method == "auto":
        return "pll" if target.masked and not target.causal_only else "causal"
    if method == "pll" and target.causal_only:
        raise UserError(f"pairs.method=pll needs a masked (bidirectional) reading, which {target.name} "
                        f"({target.describe_mixer()}) cannot give (it reads left to right); use pairs.method=causal")
    return method


def check(cfg: Config) -> None:
    """Before any model loads: the method's name and that the pairs can be read (not the hub's)."""
    if cfg.method not in METHODS:
        from lmtk.errors import suggest

        raise UserError(f"pairs.method={cfg.method} is not one of: {', '.join(METHODS)}{suggest(cfg.method, METHODS)}")
    if not cfg.hf:
        load_pairs(cfg)


def run(target, cfg: Config) -> dict:
    method = choose_method(target, cfg.method)
    pairs = load_pairs(cfg)
    scores = sentence_scores(target, [p["good"] for p in pairs] + [p["bad"] for p in pairs], method, cfg.batch_size)
    n = len(pairs)
    right = [scores[i] > scores[n + i] for i in range(n)]
    by_paradigm: dict[str, list] = {}
    by_term: dict[str, list] = {}
    terms: dict[str, str] = {}
    for p, r in zip(pairs, right):
        by_paradigm.setdefault(p["paradigm"], []).append(r)
        by_term.setdefault(p["term"], []).append(r)
        terms.setdefault(p["paradigm"], p["term"])
    acc = {k: sum(v) / len(v) for k, v in by_paradigm.items()}
    out = {"accuracy": sum(acc.values()) / len(acc), "accuracy_pairs": sum(right) / n}
    if len(by_term) > 1 or "-" not in by_term:
        out.update({f"term/{k}": sum(v) / len(v) for k, v in sorted(by_term.items())})
    out.update({f"paradigm/{k}": v for k, v in sorted(acc.items())})
    rows = [{"paradigm": k, "accuracy": acc[k], "pairs": len(by_paradigm[k]), "term": terms[k]} for k in sorted(acc)]
    reading = "pseudo-log-likelihood" if method == "pll" else "summed log-probability after [SEP]"
    notes = [f"{n:,} pairs in {len(acc)} paradigms; {reading}; accuracy: mean over paradigms"]
    if method == "pll":
        notes.append(f"masked_shift {target.masked_shift}")
    return {"scores": out, "samples": n, "rows": rows, "notes": notes}

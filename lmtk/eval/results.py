"""Results files and tables of `lmtk eval`.

<run>/eval/<suite>.json (or <checkpoint>/eval/<suite>.json), written atomically:
  suite, target, checkpoint (the directory evaluated), step, scores (name -> float, headline
  first), headline (its name), samples, seed, config (the suite's knobs), notes, rows, device,
  lmtk_version, versions, wall_seconds, created.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

from lmtk.checkpoint import write_atomic


def payload(target, suite: str, result: dict, cfg, seconds: float) -> dict:
    import dataclasses

    import lmtk
    from lmtk.runs import versions

    scores = {k: float(v) for k, v in result["scores"].items()}
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data"} if dataclasses.is_dataclass(cfg) else {}
    if getattr(cfg, "data", None) is not None:
        from omegaconf import OmegaConf

        d = cfg.data
        conf["data"] = OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else d
    return {
        "suite": suite,
        "target": target.name,
        "checkpoint": str(target.checkpoint),
        "step": target.meta.get("step"),
        "scores": scores,
        "headline": next(iter(scores), None),
        "samples": int(result.get("samples", 0)),
        "seed": int(result.get("seed", target.seed)),
        "config": conf,
        "notes": list(result.get("notes", [])),
        "rows": list(result.get("rows", [])),
        "device": f"{target.device} ({str(target.dtype).replace('torch.', '')})",
        "lmtk_version": lmtk.__version__,
        "versions": versions(),
        "wall_seconds": round(seconds, 3),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def write(out_dir: Path, data: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data['suite']}.json"
    write_atomic(path, json.dumps(data, indent=2, default=str))
    return path


def read(out_dir: Path) -> dict[str, dict]:
    """suite -> results of every readable eval/<suite>.json in out_dir."""
    out = {}
    for p in sorted(Path(out_dir).glob("*.json")) if Path(out_dir).is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and "scores" in d:
            out[d.get("suite", p.stem)] = d
    return out


def headline(data: dict) -> tuple[str, float] | None:
    """(score name, value) of a results file's headline: its first score."""
    scores = data.get("scores") or {}
    key = data.get("headline") or next(iter(scores), None)
    return (key, scores[key]) if key in scores else None


def headlines(out_dir: Path) -> dict[str, tuple[str, float]]:
    return {s: h for s, d in read(out_dir).items() if (h := headline(d)) is not None}


def fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def tables(results: list[dict]) -> list:
    """rich Tables for the results of one `lmtk eval` call (payloads, any number of targets x
    suites): per suite, its scores with the targets side by side, then its rows (one target:
    as the suite gave them; several: the rows' first column against each target's first
    number)."""
    from rich.table import Table

    out = []
    for suite in dict.fromkeys(r["suite"] for r in results):
        rs = [r for r in results if r["suite"] == suite]
        names = [r["target"] for r in rs]
        t = Table(title=f"eval {suite}")
        t.add_column("score", style="bold")
        for n in names:
            t.add_column(n, justify="right")
        keys = list(dict.fromkeys(k for r in rs for k in r["scores"]))
        if any(r["rows"] for r in rs):  # the rows table shows the breakdown; the json keeps every score
            keys = [k for k in keys if "/" not in k] or keys
        for k in keys:
            t.add_row(k, *[fmt(r["scores"].get(k, "-")) for r in rs])
        t.add_row("samples", *[fmt(r["samples"]) for r in rs])
        out.append(t)
        from rich.text import Text

        notes = [f"{r['target']}: {n}" for r in rs for n in r["notes"]]
        if notes:
            out.append(Text("\n".join(notes)))
        rows = [r["rows"] for r in rs]
        if not any(rows):
            continue
        if len(rs) == 1:
            cols = list(dict.fromkeys(k for row in rows[0] for k in row))
            d = Table(title=f"{suite}: {names[0]}")
            for c in cols:
                d.add_column(c, justify="left" if c == cols[0] else "right")
            for row in rows[0]:
                d.add_row(*[fmt(row.get(c, "-")) for c in cols])
            out.append(d)
            continue
        # a row is named by its leading columns that are not measurements (floats): e.g. mqar's
        # (seq_len, kv_pairs), passkey's (length, depth); the first float is the value compared
        first = next(r for r in rows if r)[0]
        labels = []
        for k, v in first.items():
            if isinstance(v, float):
                break
            labels.append(k)
        labels = labels or [next(iter(first))]
        values = {}
        value_col = None
        for n, rr in zip(names, rows):
            for row in rr:
                num = [k for k, v in row.items() if k not in labels and isinstance(v, float)]
                if not num:
                    continue
                value_col = value_col or num[0]
                values.setdefault(tuple(row.get(c) for c in labels), {})[n] = row.get(value_col)
        d = Table(title=f"{suite}: {value_col or 'value'} by {', '.join(labels)}")
        for c in labels:
            d.add_column(c)
        for n in names:
            d.add_column(n, justify="right")
        for key, per in values.items():
            d.add_row(*[str(k) for k in key], *[fmt(per.get(n, "-")) for n in names])
        out.append(d)
    return out

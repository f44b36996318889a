#!/usr/bin/env python
"""Training-free ranking at laptop scale: does the hidden-covariance score at initialisation
(`lmtk search`, Serianni & Kalita 2023) order a small grid of candidates the way a short training
run does, and better than ranking by parameter count?

One `lmtk search` (in-process, the command's own code) over d_model 64/128 x n_layers 2/4 x mixer
attention/gla on real English with search.train_steps=N, so every candidate also trains N steps as
an ordinary run; then the Kendall tau between the trained validation losses and each ranking: the
score (per unit, as the table ranks), the paper's unnormalised sum, the mean of the per-layer
scores, and parameter count. The same grid is scored again at other init seeds (scoring only) to
show how much the score moves with the seed alone.

    python bench/search.py                                    # 8 candidates, 300 steps each
    python bench/search.py --steps 100 --seeds 0 search.batches=8
    python bench/search.py --record runs/bench-search-...     # the tables again from a finished search (and its -seedN)

Run with LMTK_CACHE pointing at a cache that already holds the English token cache (the default
recipe's tokenizer), or the first run tokenises 53 MB once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path

from common import parse_with_overrides, table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENGLISH = Path("/work/data/english")
GRID = ["model.d_model=[64,128]", "model.n_layers=[2,4]", "model/mixer=[attention,gla]"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, default=300, help="training steps per candidate")
    p.add_argument("--data", default=str(ENGLISH), help="folder with train.txt and val.txt")
    p.add_argument("--seeds", default="1,2", help="extra init seeds to score (no training); '' for none")
    p.add_argument("--record", help="a finished search's run directory: print its tables (seeds from its -seedN siblings), run nothing")
    args = parse_with_overrides(p, argv)
    os.environ.setdefault("LMTK_RUNS", tempfile.mkdtemp(prefix="lmtk-bench-search-"))
    os.environ.setdefault("LMTK_PLOTS", "0")
    from lmtk.search import RECORD, kendall_tau, run

    d = Path(args.data)
    shared = ["data=text", f"data.train={d / 'train.txt'}", f"data.val={d / 'val.txt'}", "model.d_ff=null", "val.at_start=false",
              *args.overrides]
    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.record:
        rec = json.loads((Path(args.record) / RECORD).read_text())
        args.steps = rec["train_steps"]
        again = {s: Path(f"{args.record}-seed{s}") / RECORD for s in seeds}
        extra = {s: {r["index"]: r["score"] for r in json.loads(f.read_text())["candidates"] if "score" in r}
                 for s, f in again.items() if f.is_file()}
    else:
        rec = run("default", [*shared, *GRID, f"search.train_steps={args.steps}", f"run.name=bench-search-{stamp}"])
        extra = {}
        for seed in seeds:
            again = run("default", [*shared, *GRID, f"seed={seed}", f"run.name=bench-search-{stamp}-seed{seed}"])
            extra[seed] = {r["index"]: r["score"] for r in again["candidates"] if "score" in r}
    rows = sorted((r for r in rec["candidates"] if "score" in r), key=lambda r: r["rank"])
    trained = [r for r in rows if r.get("val_loss") is not None]
    loss_rank = {r["index"]: i for i, r in enumerate(sorted(trained, key=lambda r: r["val_loss"]), 1)}

    head = ["candidate", "params", "score", "score rank", *(f"score seed {s}" for s in extra), f"val loss @{args.steps}", "loss rank",
            "score s"]
    print(table(head, [[r["candidate"], f"{r['params']:,}", f"{r['score']:.4f}", str(r["rank"]),
                        *(f"{extra[s].get(r['index'], float('nan')):.4f}" for s in extra),
                        f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-", str(loss_rank.get(r["index"], "-")),
                        f"{r['seconds']:.2f}"] for r in rows]))
    quality = [-r["val_loss"] for r in trained]
    rankings = {
        "hidden covariance per unit (lmtk search's score)": [r["score"] for r in trained],
        "hidden covariance, the paper's sum over units": [r["score_sum"] for r in trained],
        "hidden covariance, mean over the blocks' outputs": [sum(r["layers"]) / len(r["layers"]) for r in trained],
        **{f"hidden covariance per unit, init seed {s}": [extra[s][r["index"]] for r in trained] for s in extra},
        "parameter count (trivial baseline)": [r["params"] for r in trained],
    }
    print()
    print(table(["ranking", f"Kendall tau vs val loss ({len(trained)} runs)"],
                [[k, f"{kendall_tau(v, quality):+.3f}"] for k, v in rankings.items()]))
    # within one value of an axis: does the score order what varies inside it (e.g. the mixer at one width)?
    groups = []
    for key, values in rec["axes"].items():
        for v in values:
            g = [r for r in trained if r["choices"].get(key) == v]
            if len(g) > 1:
                q = [-r["val_loss"] for r in g]
                taus = [kendall_tau(xs, q) for xs in ([r["score"] for r in g], [sum(r["layers"]) / len(r["layers"]) for r in g],
                                                      [r["params"] for r in g])]
                groups.append([f"{key}={v} ({len(g)} runs)", *("n/a" if t is None else f"{t:+.3f}" for t in taus)])
    print()
    print(table(["within", "tau: score", "tau: blocks' mean", "tau: params"], groups))
    print(f"\nsearch: {args.record or Path(os.environ['LMTK_RUNS']) / rec['name']}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The cramming question at laptop scale: how far below a unigram model does a recipe get
on real English text in a fixed wall-clock budget?

Each variant is one `lmtk train RECIPE data=text ... budget.hours=H` in its own process
(the exact CLI a user runs), with LMTK_RUNS pointed at a bench directory; the summary is
read back from the run's run.json. Target: validation bits/byte at least 20% below the
unigram model's (fit on the same tokens, scored on the same validation tokens).

    python bench/cram.py                                   # default recipe, 90 s
    python bench/cram.py --hours 0.0125 tokenizer.vocab_size=1024
    python bench/cram.py -v base: -v lr3e-3:train.lr=3e-3 -v tri:"schedule=triangle"

Tokenizer training and tokenisation are cached in LMTK_CACHE and happen outside the
training budget; the first run of a new vocabulary pays them once.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from common import parse_with_overrides, table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench" / "data" / "english"
DEFAULT_RUNS = REPO / "bench" / "data" / "runs"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Cramming at laptop scale: train a recipe on real English for a fixed wall-clock budget "
        "and compare its validation bits/byte with a unigram model's.",
        epilog="Extra key=value arguments are passed to `lmtk train` as Hydra overrides (all variants). "
        "Build the corpus first: bash /work/shared/corpora/english.sh bench/data/english",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA), help="directory with train.txt and val.txt (default: %(default)s)")
    p.add_argument("--hours", type=float, default=0.025, help="training budget per run in hours (default: %(default)s = 90 s)")
    p.add_argument("--recipe", default="default", help="lmtk recipe (default: %(default)s)")
    p.add_argument("--runs", default=os.environ.get("LMTK_RUNS_BENCH", str(DEFAULT_RUNS)),
                   help="LMTK_RUNS for the bench runs (default: %(default)s)")
    p.add_argument("--cache", default=None, help="LMTK_CACHE (default: inherited, else ~/.cache/lmtk)")
    p.add_argument("--name", default="cram", help="run-name prefix (default: %(default)s)")
    p.add_argument("--target", type=float, default=20.0, help="target: %% below unigram bpb (default: %(default)s)")
    p.add_argument("-v", "--variant", action="append", default=[], metavar="LABEL:OVERRIDES",
                   help="a variant to run: a label, a colon, then space-separated overrides; repeatable "
                   "(default: one variant with no extra overrides)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the lmtk processes, repeatable (e.g. OMP_WAIT_POLICY=PASSIVE on a shared CPU)")
    p.add_argument("--json", default=None, help="also append one JSON line per run to this file")
    p.add_argument("--quiet", action="store_true", help="hide lmtk's own output (it goes to <run>.log)")
    args = parse_with_overrides(p, argv)
    return args


def variants(args) -> list[tuple[str, list[str]]]:
    if not args.variant:
        return [(args.recipe, [])]
    out = []
    for v in args.variant:
        label, _, ov = v.partition(":")
        out.append((label or "base", shlex.split(ov)))
    return out


def run_one(args, label: str, overrides: list[str], index: int) -> dict:
    data = Path(args.data).resolve()
    train, val = data / "train.txt", data / "val.txt"
    if not train.is_file() or not val.is_file():
        sys.exit(f"error: {data} lacks train.txt/val.txt; build it: bash /work/shared/corpora/english.sh {data}")
    name = f"{args.name}-{index}-{label}".replace("/", "_").replace(" ", "_")
    cmd = [
        sys.executable, "-m", "lmtk", "train", args.recipe,
        "data=text", f"data.train={train}", f"data.val={val}",
        f"budget.hours={args.hours}", f"run.name={name}", "run.overwrite=true",
        *args.overrides, *overrides,
    ]
    env = dict(os.environ, LMTK_RUNS=str(Path(args.runs).resolve()))
    env.update(e.split("=", 1) for e in args.env)
    if args.cache:
        env["LMTK_CACHE"] = str(Path(args.cache).resolve())
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    print(f"\n=== {label}: {' '.join(args.env + ['LMTK_RUNS=' + env['LMTK_RUNS']])} {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    log = Path(args.runs) / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        if args.quiet:
            rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        else:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"{label}: lmtk exited {rc}; see {log}", file=sys.stderr)
        return {"label": label, "overrides": overrides, "rc": rc, "wall_s": wall}
    info = json.loads((Path(args.runs) / name / "run.json").read_text())
    s = info.get("summary") or {}
    row = {
        "label": label,
        "overrides": args.overrides + overrides,
        "rc": rc,
        "wall_s": wall,
        "steps": s.get("steps"),
        "tokens": s.get("tokens"),
        "tok/s": s.get("tok/s"),
        "train_s": s.get("train_seconds"),
        "params": s.get("params"),
        "val_loss": s.get("val/loss"),
        "val_bpb": s.get("val/bpb"),
        "unigram_bpb": s.get("unigram_bpb"),
    }
    if row["val_bpb"] is not None and row["unigram_bpb"]:
        row["below_pct"] = 100 * (1 - row["val_bpb"] / row["unigram_bpb"])
    return row


def table(rows: list[dict], target: float) -> str:
    head = ["recipe", "params", "steps", "tokens", "tok/s", "val loss", "val bpb", "unigram bpb", "% below", "target"]
    lines = []
    for r in rows:
        if r.get("rc"):
            lines.append([r["label"], "-", "-", "-", "-", "-", "-", "-", f"failed rc={r['rc']}", "-"])
            continue
        ok = r.get("below_pct") is not None and r["below_pct"] >= target
        lines.append([
            r["label"],
            f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-",
            f"{r['steps']:,}", f"{r['tokens']:,}", f"{r['tok/s']:,.0f}",
            f"{r['val_loss']:.4f}", f"{r['val_bpb']:.4f}", f"{r['unigram_bpb']:.4f}",
            f"{r['below_pct']:.1f}%", "met" if ok else f"missed by {target - r['below_pct']:.1f} pts",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for i, (label, ov) in enumerate(variants(args)):
        row = run_one(args, label, ov, i)
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "env": args.env, "hours": args.hours, "recipe": args.recipe, "time": time.strftime("%F %T")}) + "\n")
    print(f"\ncram: {args.recipe} on {Path(args.data).resolve()}, budget {args.hours} h "
          f"({args.hours * 3600:.0f} s) per run{', env ' + ' '.join(args.env) if args.env else ''}; target: val bpb >= {args.target:g}% below unigram bpb")
    for r in rows:
        print(f"  {r['label']}: {' '.join(r.get('overrides') or []) or '(recipe as is)'}  [wall {r['wall_s']:.0f} s]")
    print(table(rows, args.target))
    return 0 if all(r.get("rc") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

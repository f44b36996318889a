"""Issue 15 evidence, items 1 and 2: position schemes and KV shifting at equal steps on real
English, and how each scheme's loss holds up past the training context (`lmtk eval suite=length`).

    python bench/positions.py --data /work/data/english --steps 600

Every run is the default recipe (2 layers, d 128, ctx 128, 1k BPE) with one change: positions
rope (the recipe's) / alibi / learned / none, and rope with model.mixer.kv_shift=true. The learned
run has a table of exactly the training context (model.max_seq_len=128, as GPT-2's covers its
context), so the length suite skips its multiples past 1x and says why. Runs already finished in
--runs are reused (delete them to retrain). The budget is in steps, not hours, so every run sees
the same tokens on a shared machine."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

RUNS = {  # name -> overrides on the default recipe
    "rope": [],
    "alibi": ["model.positions=alibi"],
    "learned": ["model.positions=learned", "model.max_seq_len=128"],
    "none": ["model.positions=none"],
    "rope+kv_shift": ["model.mixer.kv_shift=true"],
}
LENGTH = ["rope", "alibi", "none", "learned"]  # runs the length suite reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/data/english", help="directory with train.txt and val.txt")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--runs", default=os.environ.get("LMTK_RUNS") or tempfile.mkdtemp(prefix="lmtk-positions-"))
    ap.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS), help="runs to make (overrides go before it)")
    ap.add_argument("--windows", type=int, default=16, help="length.windows: windows per multiple")
    args = common.parse_with_overrides(ap, sys.argv[1:])
    data = common.text_dir(args.data)

    from lmtk.config import compose
    from lmtk.train.pretrain import run

    base = [*common.steps_on_text(data, args.steps), f"run.root={args.runs}", "logger.every=100", *args.overrides]
    summary = {}
    for name in args.only:
        rdir = Path(args.runs) / f"pos-{name}"
        done = rdir / "run.json"
        if done.is_file() and json.loads(done.read_text()).get("status") == "done":
            summary[name] = json.loads(done.read_text())["summary"]
            continue
        t0 = time.time()
        s = run(compose("default", base + RUNS[name] + [f"run.name=pos-{name}", "run.overwrite=true"]), "default", RUNS[name])
        summary[name] = dict(s, wall=time.time() - t0)

    print(f"\nequal budget: {args.steps} steps of the default recipe (ctx 128) on {data}")
    ref = summary.get("rope", {}).get("val/clm_loss")
    rows = []
    for name, s in summary.items():
        loss = s["val/clm_loss"]
        rows.append([name, f"{loss:.4f}", f"{s['val/clm_bpb']:.4f}", f"{loss - ref:+.4f}" if ref else "-"])
    print(common.table(["run", "val loss", "val bpb", "vs rope"], rows))

    length = {}
    for name in [n for n in LENGTH if n in args.only]:
        env = dict(os.environ, LMTK_RUNS=str(args.runs))
        p = subprocess.run([sys.executable, "-m", "lmtk", "eval", f"pos-{name}", "suite=length", "device=cpu",
                            f"length.windows={args.windows}"], env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr)
        length[name] = json.loads((Path(args.runs) / f"pos-{name}" / "eval" / "length.json").read_text())
    if length:
        first = next(iter(length.values()))
        mults = [r["multiple"] for r in first["rows"]]
        print(f"\nlength suite: loss at the positions each multiple adds ({args.windows} windows per multiple of the val text)")
        head = ["run"] + [f"{r['multiple']} ({r['positions']})" for r in first["rows"]]
        rows = []
        for name, res in length.items():
            cells = {r["multiple"]: r for r in res["rows"]}
            rows.append([name] + [f"{cells[m]['loss']:.3f}" if cells[m].get("loss") is not None else "skipped" for m in mults])
        print(common.table(head, rows))
        for name, res in length.items():
            for n in res["notes"]:
                print(f"  {name}: {n}")


if __name__ == "__main__":
    main()

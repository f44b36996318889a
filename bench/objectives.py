"""Issue 15 evidence (objectives): multi-token prediction against plain next-token prediction, and
random token substitution against masked LM, at equal steps of the default recipe on real English.

    python bench/objectives.py --data /work/data/english --steps 1000

Causal side: clm vs mtp (k = 2, 4) on the default recipe; each run is scored on the causal
validation, which reads the main (next-token) head alone, so the extra heads only count through
what they taught the trunk. Masked side: mlm vs rts (detection alone, the papers' objective, and
with the swapped-token LM loss, lm_weight=1) on the same model trained bidirectionally, scored on
the masked validation (15% masked, 80/10/10). RTS alone never trains the LM head, so its masked
loss measures nothing; its own figure is the detection accuracy. The budget is in steps, so every
run sees the same tokens whatever the load on the machine."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import steps_on_text, table, text_dir

RUNS = {  # name -> overrides of the default recipe
    "clm": [],
    "mtp k=2": ["objective=mtp", "objective.mtp_k=2"],
    "mtp k=4": ["objective=mtp", "objective.mtp_k=4"],
    "mlm": ["objective=mlm"],
    "rts": ["objective=rts"],
    "rts+slm": ["objective=rts", "objective.lm_weight=1"],
}


def last_train_row(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/data/english", help="directory with train.txt and val.txt")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--runs", default=os.environ.get("LMTK_RUNS") or tempfile.mkdtemp(prefix="lmtk-objectives-"))
    ap.add_argument("--only", nargs="*", default=list(RUNS), help=f"runs to make (default all: {', '.join(RUNS)})")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    data = text_dir(args.data)

    from lmtk.config import compose
    from lmtk.train.pretrain import run

    common = [
        *steps_on_text(data, args.steps), f"run.root={args.runs}", "run.overwrite=true", "val.tokens=65536",
        "logger.every=50", "val.every=0", *args.overrides,
    ]
    results = {}
    for name in args.only:
        extra = RUNS[name]
        run_name = "obj-" + name.replace(" ", "").replace("=", "").replace("+", "-")
        t0 = time.time()
        s = run(compose("default", common + extra + [f"run.name={run_name}"]), "default", extra)
        results[name] = dict(s, wall=time.time() - t0, last=last_train_row(Path(args.runs) / run_name))

    print(f"\nequal budget: {args.steps} steps of the default recipe (2 layers, d 128, seq 128, the recipe's batch); {data}")
    causal = [n for n in results if not n.startswith(("mlm", "rts"))]
    if causal:
        base = results.get("clm", {}).get("val/clm_loss")
        rows = []
        for n in causal:
            r = results[n]
            heads = " / ".join(f"{r['last'][k]:.3f}" for k in sorted(r["last"]) if k.startswith("mtp/loss_"))
            d = f"{100 * (r['val/clm_loss'] / base - 1):+.2f}%" if base else "-"
            rows.append([n, f"{r['val/clm_loss']:.4f}", d, f"{r['val/clm_bpb']:.4f}", heads or "-",
                         f"{r['tok/s']:,.0f}", f"{r['wall']:.0f}"])
        print(table(["objective", "val causal loss (main head)", "vs clm", "causal bpb",
                     "train loss per head (last log)", "tok/s", "wall s"], rows))
    masked = [n for n in results if n.startswith(("mlm", "rts"))]
    if masked:
        base = results.get("mlm", {}).get("val/mlm_loss")
        rows = []
        for n in masked:
            r, last = results[n], results[n]["last"]
            d = f"{100 * (r['val/mlm_loss'] / base - 1):+.2f}%" if base else "-"
            acc = f"{last['rts/accuracy']:.3f} / {last['rts/recall']:.3f}" if "rts/accuracy" in last else "-"
            rows.append([n, f"{r['val/mlm_loss']:.4f}", d, f"{r['val/mlm_bpb']:.4f}", acc,
                         f"{r['tok/s']:,.0f}", f"{r['wall']:.0f}"])
        print(table(["objective", "val masked loss", "vs mlm", "masked bpb",
                     "rts accuracy / recall (last log)", "tok/s", "wall s"], rows))


if __name__ == "__main__":
    main()

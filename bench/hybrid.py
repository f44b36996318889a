"""Issue 4 evidence: CLM-only, MLM-only, AntLM and GPT-BERT at equal budget and model size on
real English; every run reports both its causal and its masked validation loss.

    python bench/hybrid.py --data bench/data/english --steps 1000

Build the corpus first: bash ../shared/corpora/english.sh bench/data/english
The budget is in steps (not hours) so the four runs see the same number of tokens even
when the machine is shared."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import steps_on_text, text_dir

RUNS = {  # name -> (recipe, overrides)
    "clm-only": ("default", []),
    "mlm-only": ("default", ["objective=mlm"]),
    "antlm": ("antlm", []),
    "gpt-bert": ("gpt-bert", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bench/data/english", help="directory with train.txt and val.txt")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--runs", default=os.environ.get("LMTK_RUNS") or tempfile.mkdtemp(prefix="lmtk-hybrid-"))
    ap.add_argument("--only", nargs="*", default=list(RUNS))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    data = text_dir(args.data)

    from lmtk.config import compose
    from lmtk.train.pretrain import run

    common = [
        *steps_on_text(data, args.steps), f"run.root={args.runs}", "run.overwrite=true", "val.tokens=65536",
        "logger.every=50", *args.overrides,
    ]
    results = {}
    for name in args.only:
        recipe, extra = RUNS[name]
        t0 = time.time()
        s = run(compose(recipe, common + extra + [f"run.name=hybrid-{name}"]), recipe, extra)
        results[name] = dict(s, wall=time.time() - t0)

    best_c = min(r["val/clm_loss"] for r in results.values())
    best_m = min(r["val/mlm_loss"] for r in results.values())
    print(f"\nequal budget: {args.steps} steps; English corpus {data}")
    print(f"{'run':10} {'causal loss':>12} {'vs best':>8} {'causal bpb':>11} {'masked loss':>12} {'vs best':>8} {'masked bpb':>11} {'tok/s':>8}")
    for name, r in results.items():
        print(
            f"{name:10} {r['val/clm_loss']:12.4f} {100 * (r['val/clm_loss'] / best_c - 1):+7.1f}% {r['val/clm_bpb']:11.4f} "
            f"{r['val/mlm_loss']:12.4f} {100 * (r['val/mlm_loss'] / best_m - 1):+7.1f}% {r['val/mlm_bpb']:11.4f} {r['tok/s']:8.0f}"
        )


if __name__ == "__main__":
    main()

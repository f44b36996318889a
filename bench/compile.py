#!/usr/bin/env python
"""torch.compile on every recipe: does it run, what does it cost, what does it buy.

Each recipe trains twice through the real CLI (`python -m lmtk train RECIPE ...`, a fresh
process each with a fresh Inductor cache, so compilation is cold), once eager and once with
train.compile=true, after an untimed 1-step run that trains the tokenizer and fills the token
cache. The recipe's architecture and objective are kept, shrunk so a CPU finishes: --layers
layers, d --d, vocabulary --vocab, seq --seq, --steps steps of batch --batch. Reported per recipe: wall time of
each run (the difference is mostly compile time: the compiled run also compiles the
evaluation graph and, for gpt-bert, one graph per attention mode), steady-state tok/s (median
of the logged steps after the first quarter), their ratio, and the largest |loss difference|
over the logged steps (compiled kernels reorder float sums, so small, not zero).

    python bench/compile.py                       # all recipes, ~6 min on 2 CPU cores
    python bench/compile.py --only default cramming-bert --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import table

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["default", "cramming-gpt", "cramming-bert", "antlm", "gpt-bert"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=RECIPES, choices=RECIPES)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    return p.parse_args(argv)


def train(recipe: str, compiled: bool, args, env: dict, steps: int | None = None, name: str | None = None) -> dict:
    name = name or f"{recipe}-{'compiled' if compiled else 'eager'}"
    cmd = [
        sys.executable, "-m", "lmtk", "train", recipe, f"run.name={name}", "budget.hours=null", f"budget.steps={steps or args.steps}",
        f"model.n_layers={args.layers}", f"model.d_model={args.d}", f"model.n_heads={max(1, args.d // 64)}",
        f"model.d_ff={4 * args.d}", f"tokenizer.vocab_size={args.vocab}", "data=embedded", "data.max_chars=3000000",
        f"data.seq_len={args.seq}", f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
        "val.every=0", "val.tokens=4096", "checkpoint.every=0", "logger.every=1", "logger=console",
        f"train.compile={str(compiled).lower()}", "device=cpu",
    ]
    # a fresh Inductor cache per run: the on-disk cache would make every compile after the first warm
    env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(Path(env["LMTK_RUNS"]).parent / f"inductor-{name}"))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"name": name, "error": (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"], "wall": wall}
    lines = [json.loads(x) for x in (Path(env["LMTK_RUNS"]) / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in lines if "loss" in m]
    steady = [m["tok/s"] for m in steps[len(steps) // 4 :]]
    return {"name": name, "wall": wall, "tok_s": statistics.median(steady), "loss": {m["step"]: m["loss"] for m in steps}}


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, python "
          f"{platform.python_version()}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    env = dict(os.environ, LMTK_RUNS=str(Path(tmp.name) / "runs"), LMTK_CACHE=os.environ.get("LMTK_CACHE", str(Path(tmp.name) / "cache")))
    rows, ok = [], True
    for recipe in args.only:
        train(recipe, False, args, env, steps=1, name=f"{recipe}-warmup")  # untimed: trains the tokenizer, fills the token cache
        eager = train(recipe, False, args, env)
        comp = train(recipe, True, args, env)
        if "error" in eager or "error" in comp:
            ok = False
            err = (eager.get("error") or comp.get("error"))[0]
            rows.append([recipe, f"{eager['wall']:.0f}", f"{comp['wall']:.0f}", "-", "-", "-", "-", f"FAILED: {err[:80]}"])
        else:
            dl = max(abs(eager["loss"][s] - comp["loss"][s]) for s in eager["loss"] if s in comp["loss"])
            rows.append([recipe, f"{eager['wall']:.0f}", f"{comp['wall']:.0f}", f"{comp['wall'] - eager['wall']:+.0f}",
                         f"{eager['tok_s']:,.0f}", f"{comp['tok_s']:,.0f}", f"{comp['tok_s'] / eager['tok_s']:.2f}x", f"{dl:.1e}"])
        print(f"  {recipe}: done", flush=True)
    print(f"\n{args.layers}L d{args.d} vocab {args.vocab} seq {args.seq} batch {args.batch}, {args.steps} steps, fp32 CPU, "
          "each run a fresh process\n")
    print(table(["recipe", "eager wall s", "compiled wall s", "extra s (compile)", "eager tok/s", "compiled tok/s",
                 "speed-up", "max |d loss|"], rows))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    print("compile " + ("ok" if ok else "FAILED") + " " + " ".join(f"{r[0]}={r[6]}" for r in rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

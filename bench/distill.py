"""Issue 13's evidence: a small Transformer teacher on real English, then subquadratic students
distilled from it (`lmtk distill`) at an equal step budget, strategy by strategy.

  1. the teacher: the default recipe's model (2 layers, d 128, BPE-1k, context 128, batch 8) by
     `lmtk train data=text ... budget.steps=--teacher-steps` (reused when a finished run of the
     same name and overrides exists);
  2. per student mixer (--students), each strategy (--strategies) for --steps steps, same seed:
       train     plain `lmtk train model/mixer=X` (the default recipe: lr 3e-3, CE only) on the same
                 data and steps: what "from scratch" fairly means, the student as a user trains it
       scratch   `lmtk distill distill.init=scratch distill.stages=[kd:1.0]`: fresh student, KD loss
                 (the distill recipe: lr 1e-3, alpha 0.5); what KD alone buys inside lmtk distill
       copy      distill.init=copy, [kd:1.0]: embeddings, norms, MLPs, head from the teacher; mixers fresh
       qkv_copy  distill.shape=attention distill.init=qkv_copy, [kd:1.0]: also q, k, v, o into the mixer
       staged    qkv_copy and stages [mixer:0.1, hidden:0.1, kd:0.8] (MOHAWK's three stages, alpha 0.5)
     optional (name them in --strategies):
       copy_attn copy at distill.shape=attention: the qkv_copy student's shape without q, k, v, o
                 (separates qkv_copy's weights from its shape)
       scratch3  scratch at train.lr=3e-3 (the train row's rate)
       mohawk    `lmtk distill mohawk` (mamba2 only: staged with alpha 0)
       lolcats   `lmtk distill lolcats` (student `linear`: Hedgehog feature maps, attention transfer, LoRA)
  3. each run's run.json summary -> one table per student: val loss, val bpb, the share of the
     teacher's gain over unigram recovered ((unigram - student) / (unigram - teacher)), train seconds.

    python bench/distill.py --data /work/data/english [--teacher-steps 2500] [--steps 300]
                            [--students gla mamba2 gdn] [--strategies train scratch copy qkv_copy staged]
                            [--seed 0] [--quiet] [key=value ...  (overrides for every student run)]

Losses at a fixed step budget do not depend on the machine's load; seconds do. The last line:
`distill: best strategy per student: gla=<s> mamba2=<s> gdn=<s>` (lowest val loss).
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
DEFAULT_RUNS = REPO / "bench" / "data" / "distill" / "runs"
DEFAULT_CACHE = REPO / "bench" / "data" / "distill" / "cache"

KD = ["distill.stages=[kd:1.0]"]
# strategy -> (lmtk command + recipe, overrides, the mixers it applies to or None for all)
STRATEGIES = {
    "train": (["train"], [], None),
    "scratch": (["distill"], ["distill.init=scratch", *KD], None),
    "scratch3": (["distill"], ["distill.init=scratch", *KD, "train.lr=3e-3"], None),
    "copy": (["distill"], ["distill.init=copy", *KD], None),
    "copy_attn": (["distill"], ["distill.shape=attention", "distill.init=copy", *KD], None),
    "qkv_copy": (["distill"], ["distill.shape=attention", "distill.init=qkv_copy", *KD], None),
    "staged": (["distill"], ["distill.shape=attention", "distill.init=qkv_copy", "distill.stages=[mixer:0.1,hidden:0.1,kd:0.8]"], None),
    "mohawk": (["distill", "mohawk"], [], {"mamba2"}),
    "lolcats": (["distill", "lolcats"], [], {"linear"}),
}
RECIPE_MIXER = {"mohawk": "mamba2", "lolcats": "linear"}  # the recipe sets the mixer itself


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Issue 13: a Transformer teacher on English, then students distilled from it, strategy by strategy, at an equal step budget.", epilog="Build the corpus first: "
                                "bash /work/shared/corpora/english.sh DIR; extra key=value arguments go to every student run.")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="directory with train.txt and val.txt (default: %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=2500, help="the teacher's optimizer steps (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="every student's optimizer steps (default: %(default)s)")
    p.add_argument("--students", nargs="+", default=["gla", "mamba2", "gdn"])
    p.add_argument("--strategies", nargs="+", default=["train", "scratch", "copy", "qkv_copy", "staged"],
                   choices=list(STRATEGIES))
    p.add_argument("--seed", type=int, default=0, help="the students' seed (default: %(default)s)")
    p.add_argument("--teacher-seed", type=int, default=0, help="the teacher's seed (default: %(default)s)")
    p.add_argument("--teacher", default=None, help="teacher run name (default: distill-teacher-<steps>-seed<teacher seed>)")
    p.add_argument("--runs", default=str(DEFAULT_RUNS), help="LMTK_RUNS (default: %(default)s)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="LMTK_CACHE (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="rerun student runs that already finished (the teacher is always reused)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the lmtk processes, repeatable")
    p.add_argument("--json", default=None, help="also append one JSON line per row to this file")
    p.add_argument("--quiet", action="store_true", help="lmtk's output only to <runs>/<run>.log")
    return parse_with_overrides(p, argv)


def finished(runs: Path, name: str, recipe: str, overrides: list[str]) -> dict | None:
    """The summary of a finished run of this name run with these overrides, else None."""
    d = runs / name
    try:
        info = json.loads((d / "run.json").read_text())
        saved = (d / "overrides.yaml").read_text()
    except (OSError, ValueError):
        return None
    from omegaconf import OmegaConf

    o = OmegaConf.create(saved)
    strip = lambda xs: [x for x in xs if not x.startswith(("run.overwrite=",))]
    if info.get("status") != "done" or o.get("recipe") != recipe or strip(list(o.get("overrides") or [])) != strip(overrides):
        return None
    return info.get("summary") or None


def lmtk(args, label: str, cmd: list[str], overrides: list[str], name: str, reuse: bool) -> dict | None:
    runs = Path(args.runs).resolve()
    recipe = next((c for c in cmd[1:]), "default" if cmd[0] == "train" else "distill")
    full = [*overrides, f"run.name={name}", "run.overwrite=true"]
    if reuse:
        s = finished(runs, name, recipe, full)
        if s is not None:
            print(f"=== {label}: reusing {runs / name} (val loss {s.get('val/loss', float('nan')):.4f})", flush=True)
            return s
    env = dict(os.environ, LMTK_RUNS=str(runs), LMTK_CACHE=str(Path(args.cache).resolve()))
    env.update(e.split("=", 1) for e in args.env)
    runs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "lmtk", *cmd, *full]
    print(f"=== {label}: LMTK_RUNS={runs} lmtk {' '.join(shlex.quote(c) for c in argv[3:])}", flush=True)
    log = runs / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        if args.quiet:
            rc = subprocess.run(argv, check=False, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        else:
            proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        print(f"{label}: lmtk exited {rc} after {wall:.0f} s: {' '.join(tail)} (log: {log})", file=sys.stderr, flush=True)
        return None
    s = json.loads((runs / name / "run.json").read_text()).get("summary") or {}
    print(f"    done in {wall:.0f} s wall: val loss {s.get('val/loss', float('nan')):.4f}", flush=True)
    return s


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data).resolve()
    train, val = data / "train.txt", data / "val.txt"
    if not train.is_file() or not val.is_file():
        sys.exit(f"error: {data} lacks train.txt/val.txt; build it: bash /work/shared/corpora/english.sh {data}")
    data_ov = ["data=text", f"data.train={train}", f"data.val={val}"]
    steps_ov = lambda n, seed=args.seed: ["budget.hours=null", f"budget.steps={n}", f"seed={seed}"]

    teacher = args.teacher or f"distill-teacher-{args.teacher_steps}-seed{args.teacher_seed}"
    t = lmtk(args, "teacher", ["train"], [*data_ov, *steps_ov(args.teacher_steps, args.teacher_seed)], teacher, reuse=True)
    if t is None:
        return 1
    t_loss, uni = t["val/loss"], t["unigram_loss"]
    gap = lambda s: (uni - s["val/loss"]) / (uni - t_loss) if s and "val/loss" in s else None

    results: dict[str, dict[str, dict | None]] = {}
    for mixer in args.students:
        results[mixer] = {}
        for strat in args.strategies:
            cmd, ov, only = STRATEGIES[strat]
            if only is not None and mixer not in only:
                continue
            mix = [] if strat in RECIPE_MIXER else [f"model/mixer={mixer}"]
            if cmd[0] == "train":
                extra = [*data_ov, *mix, *ov]
            else:
                extra = [f"teacher={teacher}", *mix, *ov]  # the data: the teacher's (lmtk distill's default)
            name = f"distill-{mixer}-{strat}-{args.steps}-seed{args.seed}"
            results[mixer][strat] = lmtk(args, f"{mixer} {strat}", cmd, [*extra, *steps_ov(args.steps), "val.at_start=false", *args.overrides],
                                         name, reuse=not args.fresh)

    print(f"\ndistill: teacher {teacher} (attention, default recipe, {args.teacher_steps} steps, seed {args.teacher_seed}) on {data}: "
          f"val loss {t_loss:.4f}, val bpb {t['val/bpb']:.4f}; unigram val loss {uni:.4f}, bpb {t['unigram_bpb']:.4f}; "
          f"students {args.steps} steps, seed {args.seed}{', ' + ' '.join(args.overrides) if args.overrides else ''}")
    best = {}
    head = ["strategy", "init", "stages", "lr", "params", "val loss", "val bpb", "vs train", "gap recovered", "train s"]
    for mixer, rows in results.items():
        lines = []
        base = (rows.get("train") or {}).get("val/loss")
        for strat, s in rows.items():
            if s is None:
                lines.append([strat, *["-"] * 4, "failed", *["-"] * 4])
                continue
            cmd, ov, _ = STRATEGIES[strat]
            stages = "CE" if cmd[0] == "train" else ",".join(f"{a}:{b:g}" for a, b in s.get("stages", []))
            lr = "3e-3" if cmd[0] == "train" or "train.lr=3e-3" in ov else "1e-3"
            g = gap(s)
            lines.append([strat, s.get("init", "-") if cmd[0] != "train" else "random", stages, lr,
                          fmt(s.get("params") and s["params"] / 1e3, ",.0f") + "k",
                          fmt(s.get("val/loss"), ".4f"), fmt(s.get("val/bpb"), ".4f"),
                          fmt(None if base is None else s["val/loss"] - base, "+.4f"),
                          fmt(None if g is None else 100 * g, ".1f") + ("%" if g is not None else ""),
                          fmt(s.get("train_seconds"), ".0f")])
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"student": mixer, "strategy": strat, "teacher": teacher, "teacher_loss": t_loss,
                                        "unigram_loss": uni, "steps": args.steps, "seed": args.seed, "gap_recovered": g,
                                        "summary": s, "time": time.strftime("%F %T")}) + "\n")
        ok = {k: v["val/loss"] for k, v in rows.items() if v and "val/loss" in v}
        if ok:
            best[mixer] = min(ok, key=ok.get)
        print(f"\n## student {mixer}: {args.steps} steps (teacher: val loss {t_loss:.4f}; unigram {uni:.4f})\n")
        print(table(head, lines))

    # side by side: val loss per strategy and student
    strats = [s for s in args.strategies if any(s in r for r in results.values())]
    if len(results) > 1:
        lines = [[s, *(fmt((results[m].get(s) or {}).get("val/loss"), ".4f") if s in results[m] else "" for m in results)]
                 for s in strats]
        print(f"\n## val loss, {args.steps} steps (teacher {t_loss:.4f}, unigram {uni:.4f})\n")
        print(table(["strategy", *results], lines))
    print("\ndistill: best strategy per student: " + " ".join(f"{m}={b}" for m, b in best.items()))
    return 0 if all(v is not None for r in results.values() for v in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

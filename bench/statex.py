#!/usr/bin/env python
"""StateX (issue 15): does widening a trained recurrent model's state, then training it briefly,
buy recall (MQAR) and language-modelling loss that the same extra steps without widening do not?

MQAR part (in process, on the pieces `lmtk eval RUN suite=mqar` trains with: MQARData, the
Labelled objective, train.loop.fit, mqar.accuracy): a small recurrent model is trained on one MQAR
cell (`--base-steps`), then two arms continue from its weights for `--extra-steps` on the same
fresh data stream and schedule: `same` (the model as it is) and `xF` (lmtk.finetune.expand's
expand_state, what `lmtk finetune model.mixer.state_expand=F` runs). Accuracy (greedy, held-out
queries) before and after, and the widened model's accuracy at step 0 (the output is unchanged,
so it must equal the base's).

English part (the CLI, as a user runs it): `lmtk train default model/mixer=gla data=text ...`
for `--lm-steps`, then `lmtk finetune base=<it> data=text budget.steps=N` with and without
`model.mixer.state_expand=F` (peft=full, the finetune recipe's lr overridden to the base's);
validation loss of each.

    python bench/statex.py --part mqar --factors 4                  # the d 64 gla rows (~5 min, 1 thread)
    python bench/statex.py --part mqar --factors 4 --mixer mamba2   # the d 64 mamba2 rows
    python bench/statex.py --part english --factors 2               # the English rows (the CLI; ~15 min shared)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import table

REPO = Path(__file__).resolve().parents[1]


def mqar_part(a) -> list[list[str]]:
    import torch

    from lmtk.data.synthetic import MQARData, mqar
    from lmtk.eval.mqar import Config as MQARConfig, accuracy, train_config
    from lmtk.finetune.expand import expand_state, state_size
    from lmtk.log import null_sinks
    from lmtk.models import ModelConfig, build_model
    from lmtk.objectives import Labelled
    from lmtk.train.loop import Job, fit

    L, kv, vocab = a.seq_len, a.kv, a.vocab
    knobs = {"name": "gla", "expand_k": a.expand_k} if a.mixer == "gla" else {"name": "mamba2", "d_state": a.d_state}
    mcfg = ModelConfig(vocab_size=vocab, d_model=a.d_model, n_layers=2, n_heads=a.heads, positions="none", max_seq_len=L,
                       mixer=knobs)
    objective = Labelled(kv, L)
    data = dict(seq_len=L, kv_pairs=kv, vocab_size=vocab, power_a=0.01, random_filler=False)
    test_in, test_t = mqar(a.test, seed=a.seed * 1_000_003 + 2**45, **data)
    dev = torch.device("cpu")

    def train(model, steps, seed, lr, warmup):
        cfg = train_config(MQARConfig(lr=lr, warmup=warmup, batch_size=a.batch), L, steps, seed)
        t0 = time.perf_counter()
        fit(Job(cfg=cfg, model=model, objective=objective, train_data=MQARData(seed=seed, **data), val_data=None,
                val_objectives={}, run=None, sinks=null_sinks(), device=dev, dtype=torch.float32, checkpoints=False))
        return time.perf_counter() - t0

    def acc(model):
        return accuracy(model, objective, test_in, test_t, dev, torch.float32)

    torch.manual_seed(a.seed)
    base = build_model(mcfg)
    secs = train(base, a.base_steps, a.seed, a.lr, 0.5)
    acc0 = acc(base)
    print(f"mqar base: {a.mixer} state {state_size(base):,}, {a.base_steps} steps ({secs:.0f} s): accuracy {acc0:.3f}", flush=True)
    rows = [[f"base ({a.base_steps} steps)", f"{state_size(base):,}", f"{sum(p.numel() for p in base.parameters()):,}", "-",
             f"{acc0:.3f}"]]
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    for f in [1, *a.factors]:
        base.load_state_dict(snapshot)
        model = base if f == 1 else expand_state(base, f, a.seed).train()
        at0 = acc(model)
        secs = train(model, a.extra_steps, a.seed + 1, a.extra_lr, 0.1)  # a data stream the base never saw
        acc1 = acc(model)
        label = f"+{a.extra_steps} steps, same state" if f == 1 else f"+{a.extra_steps} steps, state x{f}"
        print(f"mqar {label}: accuracy at step 0 {at0:.3f}, after {acc1:.3f} ({secs:.0f} s)", flush=True)
        rows.append([label, f"{state_size(model):,}", f"{sum(p.numel() for p in model.parameters()):,}", f"{at0:.3f}", f"{acc1:.3f}"])
    return rows


def lmtk(*args, env) -> None:
    cmd = [sys.executable, "-m", "lmtk", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def val_loss(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["val/loss"] for r in rows if "val/loss" in r][-1]


def english_part(a) -> list[list[str]]:
    env = {**os.environ, "LMTK_RUNS": a.runs, "PYTHONPATH": str(REPO)}
    data = [f"data=text", f"data.train={a.data}/train.txt", f"data.val={a.data}/val.txt", "val.tokens=32768"]
    base = Path(a.runs) / "statex-base"
    mixer = ["model/mixer=gla"] if a.lm_mixer == "gla" else ["model/mixer=mamba2"]
    lmtk("train", "default", *mixer, *data, f"budget.steps={a.lm_steps}", "budget.hours=null", "run.name=statex-base",
         "run.overwrite=true", env=env)
    rows = [[f"base ({a.lm_steps} steps)", f"{val_loss(base):.4f}"]]
    print(f"english base: val loss {val_loss(base):.4f}", flush=True)
    ft = ["finetune", f"base={base}", *data, "peft=full", f"budget.steps={a.ft_steps}", "budget.epochs=null", "train.lr=1e-3",
          "train.batch_size=8", "train.micro_batch_size=8", "data.seq_len=128", "val.at_start=true", "run.overwrite=true"]
    for f in [1, *a.factors]:
        name = f"statex-x{f}"
        lmtk(*ft, f"run.name={name}", *([f"model.mixer.state_expand={f}"] if f > 1 else []), env=env)
        rows_ = [json.loads(x) for x in (Path(a.runs) / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        vals = [r["val/loss"] for r in rows_ if "val/loss" in r]
        label = f"+{a.ft_steps} steps, same state" if f == 1 else f"+{a.ft_steps} steps, state x{f}"
        rows.append([label, f"{vals[0]:.4f} -> {vals[-1]:.4f}"])
        print(f"english {label}: val loss {vals[0]:.4f} -> {vals[-1]:.4f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["mqar", "english", "both"], default="both")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4], help="state_expand factors (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("mqar")
    g.add_argument("--mixer", choices=["gla", "mamba2"], default="gla")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--expand-k", type=float, default=0.125, help="gla key width / d_model (small: a small state)")
    g.add_argument("--d-state", type=int, default=2, help="mamba2 N")
    g.add_argument("--seq-len", type=int, default=32)
    g.add_argument("--kv", type=int, default=4)
    g.add_argument("--batch", type=int, default=64, help="sequences per step")
    g.add_argument("--vocab", type=int, default=32)
    g.add_argument("--base-steps", type=int, default=400)
    g.add_argument("--extra-steps", type=int, default=200)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--extra-lr", type=float, default=2e-3)
    g.add_argument("--test", type=int, default=256, help="held-out sequences")
    g = p.add_argument_group("english")
    g.add_argument("--data", default="/work/data/english", help="directory with train.txt and val.txt")
    g.add_argument("--runs", default="/tmp/statex-bench/runs")
    g.add_argument("--lm-mixer", choices=["gla", "mamba2"], default="gla")
    g.add_argument("--lm-steps", type=int, default=500)
    g.add_argument("--ft-steps", type=int, default=150)
    g.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s: far faster on a shared CPU; 0: torch's own)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.part in ("mqar", "both"):
        rows = mqar_part(a)
        print(f"\nMQAR ({a.mixer}, d {a.d_model}, seq {a.seq_len}, {a.kv} pairs, vocab {a.vocab}, batch {a.batch}; chance per query "
              f"{1 / (a.vocab - a.vocab // 2):.3f})\n")
        print(table(["model", "state", "params", "acc at step 0", "accuracy"], rows))
    if a.part in ("english", "both"):
        rows = english_part(a)
        print(f"\nEnglish ({a.lm_mixer}, default recipe, val loss on 32,768 tokens)\n")
        print(table(["model", "val loss"], rows))


if __name__ == "__main__":
    main()

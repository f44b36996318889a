#!/usr/bin/env python
"""muP at laptop scale: does the best learning rate stay put as the model widens?

Two parts, on real English (the default recipe otherwise: 2 layers, SwiGLU, RoPE, its batch:
8 x 128 when bench/RESULTS.md's figures were taken, 16 x 128 since 2026-12-03):

  sweep   `lmtk train default ... budget.steps=N` at widths 64, 128, 256 (model.n_heads fixed at 4,
          so the head dimension grows 16 -> 64 and muP's 1/d_head attention scale matters;
          model.d_ff = 2.5 x d_model, the default's ratio) for a grid of train.lr spaced x2, under
          model.parametrization=standard and =mup with model.mup_base_width=64. At width 64 the two
          are the same model (muP's multipliers are all 1 at its base width), so it runs once.
          Table: final validation loss per (parametrisation, width, lr), and each row's best lr.
  coord   the coordinate check (Yang et al., Tensor Programs V): models at widths 32, 64, 128
          (base 32) trained a few Adam steps at one lr in-process, then mean |x| of the embedding
          output, each block's output and the logits on a fixed batch. Under muP these stay
          roughly constant across widths; under SP Adam's updates, of a size set by the lr and
          not by the fan-in, make the hidden activations grow with the width.

    python bench/mup.py                       # both
    python bench/mup.py sweep --steps 200 --lrs 2e-3,4e-3,8e-3,1.6e-2,3.2e-2
    python bench/mup.py coord
    python bench/mup.py sweep --run mup:256:8e-3,standard:256:4e-3   # only these cells (PARAM:WIDTH:LR)
    python bench/mup.py sweep --run ''                                # no runs: the table of what is in --json
Runs go under LMTK_RUNS_BENCH (default bench/data/runs); sweep results are appended, one JSON
line per run, to --json (default: <runs>/mup.jsonl) and reused when that file already has them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import steps_on_text, table

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/data/english")
DEFAULT_RUNS = REPO / "bench" / "data" / "runs"
HEADS = 4


def width_overrides(width: int, param: str, base: int) -> list[str]:
    ov = [f"model.d_model={width}", f"model.d_ff={int(2.5 * width)}", f"model.n_heads={HEADS}"]
    if param == "mup":
        ov += ["model.parametrization=mup", f"model.mup_base_width={base}"]
    return ov


def run_one(args, param: str, width: int, lr: float) -> dict:
    name = f"mup-{param}-w{width}-lr{lr:g}-s{args.steps}"
    cmd = [sys.executable, "-m", "lmtk", "train", "default", *steps_on_text(args.data, args.steps), f"train.lr={lr}", f"run.name={name}",
           "run.overwrite=true", *width_overrides(width, param, args.base), *args.overrides]
    env = dict(os.environ, LMTK_RUNS=str(Path(args.runs).resolve()))
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    log, info = Path(args.runs) / f"{name}.log", Path(args.runs) / name / "run.json"
    prior = json.loads(info.read_text()) if info.is_file() else {}
    if prior.get("status") == "done" and (prior.get("summary") or {}).get("steps") == args.steps:
        rc = 0  # finished by an earlier (interrupted) sweep
    else:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"param": param, "width": width, "lr": lr, "steps": args.steps, "rc": rc}
    if rc == 0:
        s = json.loads(info.read_text()).get("summary") or {}
        row.update(val_loss=s.get("val/loss"), train_s=s.get("train_seconds"), steps_run=s.get("steps"))
    print(json.dumps(row), flush=True)
    return row


def sweep(args) -> None:
    lrs = [float(x) for x in args.lrs.split(",")]
    path = Path(args.json or Path(args.runs) / "mup.jsonl")
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["param"], r["width"], r["lr"], r["steps"])] = r
    rows = {}
    for width in args.widths:
        for param in ("standard", "mup"):
            for lr in lrs:
                if width == args.base and param == "mup":  # the same model as standard at its base width
                    rows[(param, width, lr)] = rows.get(("standard", width, lr), {})
                    continue
                key = (param, width, lr, args.steps)
                if param not in args.params or args.run is not None and (param, width, lr) not in args.run:
                    rows[(param, width, lr)] = done.get(key, {})
                    continue
                if key not in done:
                    done[key] = run_one(args, param, width, lr)
                    with open(path, "a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                rows[(param, width, lr)] = done[key]
    head = ["parametrisation", "width", *[f"lr {lr:g}" for lr in lrs], "best lr"]
    out = []
    for param in ("standard", "mup"):
        for width in args.widths:
            losses = [rows[(param, width, lr)].get("val_loss") for lr in lrs]
            ok = [(v, lr) for v, lr in zip(losses, lrs) if v is not None and v == v]
            best = min(ok)[1] if ok else None
            out.append([param if width == args.widths[0] else "", str(width),
                        *[("-" if v is None else f"{v:.3f}") for v in losses], "-" if best is None else f"{best:g}"])
    print(f"\nfinal validation loss after {args.steps} steps (muP base width {args.base}, n_heads {HEADS}):")
    print(table(head, out))


def coord(args) -> None:
    """Mean |x| per layer after a few Adam steps, widths 32/64/128 (base 32), SP vs muP."""
    import torch

    sys.path.insert(0, str(REPO))
    from lmtk.data.tokenizer import Tokenizer
    from lmtk.models import LanguageModel, ModelConfig, padded_vocab
    from lmtk.train.optim import build_optimizer

    tok_path = next(Path(args.runs).glob("mup-*/tokenizer.json"), None)
    if tok_path is None:
        sys.exit("coord reads the sweep's tokenizer: run the sweep (or one run of it) first")
    tok = Tokenizer.from_file(tok_path)
    text = (Path(args.data) / "train.txt").read_text()[: 400_000]
    ids = torch.tensor(tok.encode(text) if hasattr(tok, "encode") else tok.tk.encode(text).ids)
    gen = torch.Generator().manual_seed(0)
    B, T = 8, 128

    def batch():
        s = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        return torch.stack([ids[i:i + T + 1] for i in s.tolist()])

    probe = batch()
    widths = [32, 64, 128]
    results = {}
    for param in ("standard", "mup"):
        for width in widths:
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=padded_vocab(tok.vocab_size), d_model=width, n_layers=2, n_heads=HEADS,
                              d_ff=int(2.5 * width), positions="rope", rope_layout="half", norm="rmsnorm",
                              mlp="swiglu", bias=False, parametrization=param, mup_base_width=widths[0])
            model = LanguageModel(cfg)
            opt = build_optimizer(model, argparse.Namespace(weight_decay=0.0, betas=[0.9, 0.98], eps=1e-8),
                                  args.coord_lr, torch.device("cpu"))
            gen.manual_seed(1)
            for _ in range(args.coord_steps):
                x = batch()
                loss = model.head_loss(model.hidden(x[:, :-1]), x[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                trace = []
                h = model.hidden(probe[:, :-1], trace=trace)
                row = {"embed": trace[0]["block_in"].abs().mean().item()}
                row.update({f"block {i}": t["block_out"].abs().mean().item() for i, t in enumerate(trace)})
                row["logits"] = model.logits(h).abs().mean().item()
            results[(param, width)] = row
    layers = list(results[("standard", widths[0])])
    head = ["parametrisation", "layer", *[f"w {w}" for w in widths], f"w {widths[-1]} / w {widths[0]}"]
    out = []
    for param in ("standard", "mup"):
        for i, layer in enumerate(layers):
            v = [results[(param, w)][layer] for w in widths]
            out.append([param if i == 0 else "", layer, *[f"{x:.3f}" for x in v], f"{v[-1] / v[0]:.2f}"])
    print(f"\ncoordinate check: mean |x| on a fixed batch after {args.coord_steps} Adam steps at lr {args.coord_lr:g} "
          f"(muP base width {widths[0]}):")
    print(table(head, out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="muP vs standard parametrisation: lr sweep across widths, coordinate check")
    p.add_argument("part", nargs="?", default="all", choices=["all", "sweep", "coord"])
    p.add_argument("--data", default=str(DATA), help="directory with train.txt and val.txt (default: %(default)s)")
    p.add_argument("--runs", default=os.environ.get("LMTK_RUNS_BENCH", str(DEFAULT_RUNS)))
    p.add_argument("--json", default=None, help="sweep results, one JSON line per run (default: <runs>/mup.jsonl)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per sweep run (default: %(default)s)")
    p.add_argument("--lrs", default="2e-3,4e-3,8e-3,1.6e-2,3.2e-2", help="comma-separated train.lr grid")
    p.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256])
    p.add_argument("--params", type=lambda s: s.split(","), default=["standard", "mup"], help="parametrisations to run")
    p.add_argument("--run", type=lambda s: {(p, int(w), float(lr)) for p, w, lr in (x.split(":") for x in s.split(",") if x)},
                   default=None, help="run only these PARAM:WIDTH:LR cells (the table shows every cell already run)")
    p.add_argument("--base", type=int, default=64, help="model.mup_base_width (default: %(default)s)")
    p.add_argument("--coord-steps", type=int, default=10)
    p.add_argument("--coord-lr", type=float, default=1e-2)
    args, extra = p.parse_known_args(argv)
    args.overrides = extra
    if args.part in ("all", "sweep"):
        sweep(args)
    if args.part in ("all", "coord"):
        coord(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

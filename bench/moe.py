"""Issue 15 evidence: the default recipe's dense SwiGLU MLP vs model.mlp=moe at equal steps on
real English, at equal active parameters (d_expert = d_ff / top_k): validation loss, parameters
total / active, training FLOPs per token, CPU tokens/s and the experts' usage at the end.

    python bench/moe.py --data /work/data/english --steps 600
    python bench/moe.py --step          # one training step of each model, CPU time, alternating rounds

The budget is in steps, so every run sees the same tokens whatever the machine's load;
tokens/s is the loop's own and moves with the load (the machine is shared)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common

RUNS = {  # name -> overrides of the default recipe
    "dense swiglu 320": [],
    "moe 4x320 top-1 softmax": ["model.mlp=moe", "model.moe.experts=4", "model.moe.top_k=1", "model.moe.router=softmax"],
    "moe 8x320 top-1 softmax": ["model.mlp=moe", "model.moe.experts=8", "model.moe.top_k=1", "model.moe.router=softmax"],
    "moe 8x160 top-2 softmax": ["model.mlp=moe", "model.moe.experts=8", "model.moe.top_k=2", "model.moe.router=softmax"],
    "moe 8x160 top-2 sigmoid": ["model.mlp=moe", "model.moe.experts=8", "model.moe.top_k=2", "model.moe.router=sigmoid"],
    "moe 16x80 top-4 sigmoid": ["model.mlp=moe", "model.moe.experts=16", "model.moe.top_k=4", "model.moe.router=sigmoid"],
}


def step_times(names: list[str], rounds: int, steps: int) -> None:
    """CPU time of one training step (forward, backward, AdamW) of each model at the default
    recipe's shape as measured (batch 8 x 128, vocab 1024), one thread, thread CPU time, alternating rounds:
    steady on a shared machine where wall-clock tok/s is not."""
    import time

    import torch

    from lmtk.config import compose
    from lmtk.models import LanguageModel, model_config
    from lmtk.models.auxloss import collect

    torch.set_num_threads(1)
    models = {}
    for name in names:
        cfg = compose("default", RUNS[name])
        torch.manual_seed(0)
        model = LanguageModel(model_config(cfg.model, 1024)).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
    batch = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    ms = {n: [] for n in names}
    for _ in range(rounds):
        for name, (model, opt) in models.items():
            for i in range(steps + 1):
                t = time.thread_time()
                with collect(model) as aux:
                    loss = model.head_loss(model.hidden(batch)[:, :-1], batch[:, 1:])
                (loss if aux.total() is None else loss + aux.total()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step of a round warms the caches
                    ms[name].append(1e3 * (time.thread_time() - t))
    base = sorted(ms[names[0]])[len(ms[names[0]]) // 2]
    rows = [[n, f"{sorted(v)[len(v) // 2]:.1f}", f"{sorted(v)[len(v) // 2] / base:.2f}x"] for n, v in ms.items()]
    print(common.table(["model", "ms/step (median, 1 thread CPU time)", f"vs {names[0]}"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/data/english", help="directory with train.txt and val.txt")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--runs", default=None, help="runs directory (default: a temporary one)")
    ap.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS), metavar="RUN")
    ap.add_argument("--step", action="store_true", help="time one training step of each model instead (no training runs)")
    ap.add_argument("--rounds", type=int, default=5)
    args = common.parse_with_overrides(ap, sys.argv[1:])
    if args.step:
        return step_times(args.only, args.rounds, 5)
    data = common.text_dir(args.data)
    root = Path(args.runs or tempfile.mkdtemp(prefix="lmtk-moe-"))

    import torch

    from lmtk.config import compose
    from lmtk.models import LanguageModel, model_config
    from lmtk.train.pretrain import run

    common_args = [
        *common.steps_on_text(data, args.steps), f"run.root={root}", "run.overwrite=true", "logger.every=50", *args.overrides,
    ]
    rows = []
    for i, name in enumerate(args.only):
        over = common_args + RUNS[name] + [f"run.name=moe-{i}"]
        cfg = compose("default", over)
        s = run(cfg, "default", over)
        mcfg = model_config(cfg.model, cfg.tokenizer.vocab_size)
        with torch.device("meta"):
            model = LanguageModel(mcfg)
        last = [json.loads(line) for line in (root / f"moe-{i}" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
        rows.append([
            name, f"{s['val/clm_loss']:.4f}", f"{s['val/clm_bpb']:.4f}", f"{model.num_params() / 1e3:.0f}k",
            f"{model.num_params(active=True) / 1e3:.0f}k", f"{model.flops_per_token(cfg.data.seq_len) / 1e6:.2f}M",
            f"{s['tok/s']:,.0f}", f"{last['moe/usage']:.2f}" if "moe/usage" in last else "-",
            f"{last['moe/balance']:.3f}" if "moe/balance" in last else "-",
        ])
        print(common.table(["run", "val loss", "val bpb", "params", "active", "FLOPs/token", "tok/s", "usage", "balance"], rows),
              flush=True)


if __name__ == "__main__":
    main()

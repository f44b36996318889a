#!/usr/bin/env python
"""lmtk's default recipe against nanoGPT's train.py at the same size, on the same text, for the
same wall-clock training budget (issue 16): tok/s and validation bits-per-byte, as ratios.

    python bench/vs_nanogpt.py --nanogpt ~/src/nanoGPT            # 90 s each on bench/data/english
    python bench/vs_nanogpt.py --nanogpt PATH --seconds 30 --data /tmp/english
    python bench/vs_nanogpt.py --nanogpt PATH --step [--threads 1]   # one step each, alternating rounds

PATH is a nanoGPT checkout you fetched yourself (git clone https://github.com/karpathy/nanoGPT);
this script downloads nothing. Without one it says so in one line and exits 2.

What it does:
1. `lmtk train default data=text data.train=DATA/train.txt data.val=DATA/val.txt budget.hours=S/3600`
   in a subprocess (the command a user runs; tokenizer training and tokenising are cached and
   outside the budget). Steps, tok/s and val bits/byte come from the run's run.json.
2. nanoGPT gets the same tokens: lmtk's token cache of that run (its BPE tokenizer, so the
   vocabularies match) written as nanoGPT's data format (train.bin / val.bin, uint16, and
   meta.pkl with the vocabulary, lmtk's padded size) in a temporary dataset directory.
3. nanoGPT's train.py runs with the default recipe's shape and optimisation: n_layer, n_head,
   n_embd, block_size = seq_len, batch_size, lr, AdamW betas, weight decay, grad clip, warmup
   5% and cosine decay to 10% of the peak (lmtk's cosine schedule), fp32, no compile, on the CPU.
   Its loop counts iterations, not seconds: a short calibration run times its step, and the
   real run gets max_iters = lr_decay_iters = the steps that fill the budget (run once more,
   rescaled, if its training time misses the budget by more than 15%). Its training time
   is the sum of its own per-iteration times (its first and last iteration, which hold the
   evaluations and the checkpoint, are left out and counted at the median).
4. nanoGPT's final checkpoint is scored by lmtk's validation (lmtk.eval.lm.lm_metrics on the
   same val windows, each predicted token charged its UTF-8 bytes), so both bits/byte are
   measured the same way.

The lmtk and nanoGPT runs are sequential, not interleaved: on a shared machine, run it twice
(or check `uptime`) before trusting a ratio within ~10%.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parse_with_overrides, table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench" / "data" / "english"
ITER = re.compile(r"^iter (\d+): loss ([0-9.naif]+), time ([0-9.]+)ms")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="lmtk's default recipe vs nanoGPT's train.py: tok/s and val bits/byte.",
                                epilog="Extra key=value arguments go to `lmtk train` (and set nanoGPT's shape where they name one).")
    p.add_argument("--nanogpt", default=None, help="path of a nanoGPT checkout (train.py, model.py)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="directory with train.txt and val.txt (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=90.0, help="training budget of each (default: %(default)s)")
    p.add_argument("--recipe", default="default", help="lmtk recipe (default: %(default)s)")
    p.add_argument("--calibrate", type=int, default=40, help="nanoGPT iterations of the calibration run (default: %(default)s)")
    p.add_argument("--step", action="store_true",
                   help="instead: time one training step of each in one process, alternating rounds (no data needed)")
    p.add_argument("--rounds", type=int, default=9, help="--step: alternating rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="--step: torch threads; 1: CPU time of the thread")
    p.add_argument("--work", default=None, help="directory for runs and nanoGPT data (default: a temporary one)")
    return parse_with_overrides(p, argv)


def nanogpt_missing(path) -> str | None:
    if not path:
        return "vs_nanogpt: no nanoGPT checkout given; pass --nanogpt PATH (git clone https://github.com/karpathy/nanoGPT); nothing was run"
    p = Path(path).expanduser()
    if not (p / "train.py").is_file() or not (p / "model.py").is_file() or not (p / "configurator.py").is_file():
        return f"vs_nanogpt: {p} is not a nanoGPT checkout (no train.py/model.py/configurator.py there); nothing was run"
    return None


def run_lmtk(args, work: Path, env: dict) -> dict:
    data = Path(args.data).resolve()
    cmd = [sys.executable, "-m", "lmtk", "train", args.recipe, "data=text", f"data.train={data / 'train.txt'}",
           f"data.val={data / 'val.txt'}", f"budget.hours={args.seconds / 3600}", "run.name=lmtk", "run.overwrite=true",
           *args.overrides]
    print("[lmtk] " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    (work / "lmtk.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        sys.exit(f"lmtk train exited {r.returncode}; see {work / 'lmtk.log'}\n{r.stderr[-1500:]}")
    s = json.loads((work / "runs" / "lmtk" / "run.json").read_text())["summary"]
    print(f"[lmtk] {s['steps']} steps in {s['train_seconds']:.1f} s of training ({time.perf_counter() - t0:.0f} s wall): "
          f"{s['tok/s']:,.0f} tok/s, val bpb {s['val/bpb']:.4f}", flush=True)
    return s


def prepare_nanogpt_data(cfg, work: Path):
    """lmtk's token cache of this data + tokenizer as nanoGPT's train.bin / val.bin / meta.pkl."""
    from lmtk.models import model_config
    from lmtk.train.pretrain import prepare_data

    tok, cache = prepare_data(cfg, work / "runs")
    if tok.vocab_size >= 65536:
        sys.exit("vs_nanogpt: nanoGPT's loader reads uint16 tokens; use a vocabulary below 65,536")
    out = work / "nanogpt-data"
    out.mkdir(parents=True, exist_ok=True)
    np.asarray(cache.train, dtype=np.uint16).tofile(out / "train.bin")
    np.asarray(cache.val, dtype=np.uint16).tofile(out / "val.bin")
    vocab = model_config(cfg.model, tok.vocab_size).vocab_size
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)
    return out, cache, vocab, tok


def nanogpt_args(cfg, data_dir: Path, out_dir: Path, iters: int) -> list[str]:
    m, t, o, sch = cfg.model, cfg.train, cfg.optim, cfg.schedule
    lr = t.lr
    return [
        f"--dataset={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32", "--compile=False",
        f"--n_layer={m.n_layers}", f"--n_head={m.n_heads}", f"--n_embd={m.d_model}", f"--block_size={cfg.data.seq_len}",
        f"--batch_size={t.micro_batch_size}", f"--gradient_accumulation_steps={t.batch_size // t.micro_batch_size}",
        "--bias=False", "--dropout=0.0", f"--learning_rate={lr}", f"--min_lr={lr * sch.get('final', 0.1)}",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--warmup_iters={max(1, round(sch.get('warmup', 0.05) * iters))}",
        f"--weight_decay={o.weight_decay}", f"--beta1={o.betas[0]}", f"--beta2={o.betas[1]}", f"--grad_clip={t.grad_clip}",
        f"--eval_interval={iters}", "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=True",
    ]


def run_nanogpt(path: Path, argv: list[str], log: Path) -> list[tuple[int, float, float]]:
    """(iter, loss, ms) per iteration of nanoGPT's train.py."""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "train.py", *argv], cwd=path, env=env, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        sys.exit(f"nanoGPT's train.py exited {r.returncode}; see {log}\n{r.stderr[-1500:]}")
    return [(int(m[1]), float(m[2]), float(m[3])) for m in map(ITER.match, r.stdout.splitlines()) if m]


class _NanoAdapter:
    """nanoGPT's GPT as lmtk's objectives see a model: hidden() (its embeddings, blocks, ln_f)
    and logits() (its lm_head), so lmtk's validation scores it on the same windows and bytes."""

    def __init__(self, gpt):
        self.gpt = gpt

    def hidden(self, idx, causal: bool = True):
        import torch

        t = self.gpt.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in t.h:
            x = block(x)
        return t.ln_f(x)

    def logits(self, h):
        return self.gpt.lm_head(h)

    @property
    def training(self):
        return self.gpt.training

    def eval(self):
        self.gpt.eval()

    def train(self, mode=True):
        self.gpt.train(mode)


def nanogpt_val(path: Path, out_dir: Path, cfg, cache, tok) -> dict:
    import torch

    from lmtk.data.packing import Batches
    from lmtk.eval.lm import lm_metrics
    from lmtk.objectives import CLM
    from lmtk.train.loop import val_seed

    sys.path.insert(0, str(path))
    try:
        from model import GPT, GPTConfig  # nanoGPT's
    finally:
        sys.path.pop(0)
    ck = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)  # written by the run above
    gpt = GPT(GPTConfig(**ck["model_args"]))
    gpt.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
    val = Batches(cache.val, cfg.data.seq_len, cfg.seed, nbytes=cache.val_bytes)
    with torch.no_grad():
        m = lm_metrics(_NanoAdapter(gpt), {"clm": CLM(cfg.objective, tok)}, val, tokens=cfg.val.tokens,
                       batch_size=cfg.train.micro_batch_size, device=torch.device("cpu"), dtype=torch.float32,
                       seed=val_seed(cfg))
    return {"iter": ck["iter_num"], "val_loss": m["clm_loss"], "val_bpb": m["clm_bpb"],
            "params": sum(p.numel() for p in gpt.parameters())}


def step_compare(args, nano: Path) -> int:
    """One step (fwd + bwd + clip + AdamW) of nanoGPT's GPT (its own configure_optimizers) and of
    lmtk's default recipe (bench/step.py builds it as `lmtk train` does), alternating rounds."""
    import torch

    import step as lstep

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    lm = lstep.build(list(args.overrides))
    cfg = lm["cfg"]
    sys.path.insert(0, str(nano))
    try:
        from model import GPT, GPTConfig  # nanoGPT's
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=cfg.data.seq_len, vocab_size=lm["model"].cfg.vocab_size, n_layer=cfg.model.n_layers,
                        n_head=cfg.model.n_heads, n_embd=cfg.model.d_model, dropout=0.0, bias=False))
    gopt = gpt.configure_optimizers(cfg.optim.weight_decay, cfg.train.lr, tuple(cfg.optim.betas), "cpu")
    B, L = cfg.train.micro_batch_size, cfg.data.seq_len
    xs = [torch.randint(5, lm["model"].cfg.vocab_size, (B, L + 1)) for _ in range(4)]
    it = [0]

    def nano_step():  # as nanoGPT's train.py: forward with targets, backward, clip, step, zero_grad
        x = xs[it[0] % 4]
        it[0] += 1
        _, loss = gpt(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), cfg.train.grad_clip)
        gopt.step()
        gopt.zero_grad(set_to_none=True)

    fns = {"nanoGPT": nano_step, "lmtk": lambda: lstep.step(lm)}
    for f in fns.values():
        for _ in range(3):
            f()
    ms = {k: [] for k in fns}
    for r in range(args.rounds):
        for k, f in fns.items():
            t0 = clock()
            for _ in range(8):
                f()
            ms[k].append(1000 * (clock() - t0) / 8)
    med = {k: statistics.median(v) for k, v in ms.items()}
    tok = B * L
    print(f"one step, {cfg.model.n_layers}L d{cfg.model.d_model}, {B}x{L}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} alternating rounds of 8 steps; load {os.getloadavg()[0]:.1f}")
    print(table(["", "ms/step (median)", "range", "tok/s"],
                [[k, f"{med[k]:.1f}", f"{min(ms[k]):.1f}-{max(ms[k]):.1f}", f"{tok / med[k] * 1000:,.0f}"] for k in fns]))
    print(f"\nratio lmtk/nanoGPT tok/s: {med['nanoGPT'] / med['lmtk']:.3f}x (rounds: "
          + " ".join(f"{a / b:.2f}" for a, b in zip(ms["nanoGPT"], ms["lmtk"])) + ")")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = nanogpt_missing(args.nanogpt)
    if missing:
        print(missing)
        return 2
    if args.step:
        return step_compare(args, Path(args.nanogpt).expanduser().resolve())
    nano = Path(args.nanogpt).expanduser().resolve()
    data = Path(args.data).resolve()
    if not (data / "train.txt").is_file() or not (data / "val.txt").is_file():
        print(f"vs_nanogpt: {data} lacks train.txt/val.txt; build it: bash /work/shared/corpora/english.sh {data}")
        return 2
    import torch

    from lmtk.config import compose

    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LMTK_RUNS=str(work / "runs"))
    os.environ["LMTK_RUNS"] = env["LMTK_RUNS"]
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}; load {os.getloadavg()[0]:.1f}; nanoGPT {nano}", flush=True)
    cfg = compose(args.recipe, ["data=text", f"data.train={data / 'train.txt'}", f"data.val={data / 'val.txt'}", *args.overrides])

    # the cache first (tokenizer + tokens, outside both budgets), then nanoGPT (calibration, run), then lmtk
    data_dir, cache, vocab, tok = prepare_nanogpt_data(cfg, work)
    cal = run_nanogpt(nano, nanogpt_args(cfg, data_dir, work / "nanogpt-cal", args.calibrate), work / "nanogpt-cal.log")
    cal_ms = statistics.median(ms for i, _, ms in cal if i >= 5)
    iters = max(10, int(args.seconds * 1000 / cal_ms))
    print(f"[nanoGPT] calibration: {cal_ms:.1f} ms/iter -> max_iters {iters} for {args.seconds:g} s", flush=True)
    for attempt in range(2):  # a shared machine's load can change between calibration and run: one correction
        t0 = time.perf_counter()
        rows = run_nanogpt(nano, nanogpt_args(cfg, data_dir, work / "nanogpt", iters), work / "nanogpt.log")
        wall = time.perf_counter() - t0
        inner = [ms for i, _, ms in rows if 0 < i < iters]
        med = statistics.median(inner)
        n_secs = (sum(inner) + 2 * med) / 1000
        if attempt or abs(n_secs / args.seconds - 1) <= 0.15:
            break
        print(f"[nanoGPT] {iters + 1} iterations took {n_secs:.1f} s of training, not {args.seconds:g}: "
              f"again with max_iters {round(iters * args.seconds / n_secs)}", flush=True)
        iters = max(10, round(iters * args.seconds / n_secs))
    tok_iter = cfg.train.batch_size * cfg.data.seq_len
    nv = nanogpt_val(nano, work / "nanogpt", cfg, cache, tok)
    n_tok_s = (iters + 1) * tok_iter / n_secs
    print(f"[nanoGPT] {iters + 1} iterations in {n_secs:.1f} s of training ({wall:.0f} s wall): {n_tok_s:,.0f} tok/s, "
          f"val bpb {nv['val_bpb']:.4f}", flush=True)

    s = run_lmtk(args, work, env)
    rows_out = [
        ["nanoGPT train.py", f"{nv['params'] / 1e6:.2f}M", f"{iters + 1:,}", f"{n_secs:.1f}", f"{n_tok_s:,.0f}", f"{nv['val_loss']:.4f}", f"{nv['val_bpb']:.4f}"],
        [f"lmtk train {args.recipe}", f"{s['params'] / 1e6:.2f}M" if s.get("params") else "-", f"{s['steps']:,}", f"{s['train_seconds']:.1f}",
         f"{s['tok/s']:,.0f}", f"{s['val/loss']:.4f}", f"{s['val/bpb']:.4f}"],
    ]
    m = cfg.model
    print(f"\n{m.n_layers}L d{m.d_model} h{m.n_heads}, vocab {vocab}, seq {cfg.data.seq_len}, batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr}; {args.seconds:g} s of training each on {data}; load {os.getloadavg()[0]:.1f} at the end")
    print(table(["", "params", "steps", "train s", "tok/s", "val loss (nats/token)", "val bits/byte"], rows_out))
    print(f"\nratio lmtk/nanoGPT: tok/s {s['tok/s'] / n_tok_s:.3f}x, val bits/byte {s['val/bpb'] / nv['val_bpb']:.3f}x "
          f"(below 1: lmtk's is lower)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

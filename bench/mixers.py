"""Issue 10's mixer benchmark: every registered mixer beside softmax attention (SDPA) at the
same width, on this machine.

  1. one layer's forward+backward time at L = 512, 2048, 8192 (alternating rounds, medians);
  2. decoding ms/token after a context of 1K, 4K, 16K tokens (flat for recurrent mixers,
     growing for attention), one layer;
  3. decoding state size per sequence against attention's KV cache at those contexts;
  4. (--train-seconds > 0) val bits-per-byte of a 2-layer model of each mixer after the same
     wall-clock budget, on real English (--data: ../shared/corpora's train.txt/val.txt) or
     the embedded corpus.

    python bench/mixers.py [--d 128] [--heads 4] [--lengths 512 2048 8192] [--contexts 1024 4096 16384]
                           [--train-seconds 0] [--data DIR] [--mixers gla retnet ...] [--threads N]
                           [--clock wall|thread]

--clock thread times fwd+bwd by this thread's CPU time (time.thread_time; use it with --threads 1):
on a shared, loaded machine wall-clock ratios swing with the load, CPU time of one thread does not.

The last line: `L=4096 fwd+bwd time vs attention: linear=<x> retnet=<x> ...` (ratios, this run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import table
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.mixers import MIXERS


def one_layer(name: str, d: int, heads: int, max_len: int) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=64, d_model=d, n_layers=1, n_heads=heads, max_seq_len=max_len, positions="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, mixer={"name": name})
    return LanguageModel(cfg).blocks[0].mixer


def fwd_bwd_ms(mixers: dict, L: int, d: int, rounds: int, clock=time.perf_counter) -> dict:
    x = torch.randn(1, L, d)
    times = {n: [] for n in mixers}
    for _ in range(rounds):  # alternating: load on a shared machine hits every mixer alike
        for n, m in mixers.items():
            xi = x.clone().requires_grad_()
            t0 = clock()
            y, _ = m(xi, causal=True)
            y.sum().backward()
            times[n].append(1000 * (clock() - t0))
    return {n: statistics.median(t) for n, t in times.items()}


@torch.no_grad()
def decode_ms(m, context: int, d: int, steps: int = 16) -> tuple[float, int]:
    """(ms per decoded token after `context` tokens, bytes of the state then)."""
    state, _ = None, None
    for start in range(0, context, 2048):  # prefill in chunks
        x = torch.randn(1, min(2048, context - start), d)
        _, state = m(x, causal=True, state=state, offset=start, decode=True)
    t0 = time.perf_counter()
    for i in range(steps):
        _, state = m(torch.randn(1, 1, d), causal=True, state=state, offset=context + i, decode=True)
    ms = 1000 * (time.perf_counter() - t0) / steps
    return ms, state_bytes(state)


def state_bytes(state) -> int:
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(s) for s in state)
    return 0


def train_bpb(name: str, seconds: float, data: str | None) -> float | None:
    """val bits-per-byte of the default recipe's model with this mixer after `seconds` of training."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "lmtk", "train", f"model/mixer={name}", f"budget.hours={seconds / 3600}",
                "run.name=b", "val.at_start=false"]
        if data:
            args += ["data=text", f"data.train={data}/train.txt", f"data.val={data}/val.txt"]
        env = dict(os.environ, LMTK_RUNS=tmp)
        p = subprocess.run(args, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{name}: training failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        return json.loads((Path(tmp) / "b" / "run.json").read_text())["summary"].get("val/bpb")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mixers", nargs="+", default=None, help="default: every registered mixer")
    p.add_argument("--train-seconds", type=float, default=0.0, help="per mixer (the default recipe's is 144)")
    p.add_argument("--data", default=None, help="a folder with train.txt and val.txt (../shared/corpora/english.sh)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="fwd+bwd timer: wall clock, or this thread's CPU time (with --threads 1; steady under load)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.mixers or list(MIXERS)
    if "attention" not in names:
        names = ["attention", *names]
    max_len = max(a.lengths + a.contexts) + 64
    mixers = {n: one_layer(n, a.d, a.heads, max_len) for n in names}
    print(f"# mixers, one layer d={a.d} heads={a.heads}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.clock} clock")

    rows, ratios = [], {}
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    by_len = {L: fwd_bwd_ms(mixers, L, a.d, a.rounds, clock) for L in a.lengths}
    for n in names:
        rows.append([n, *(f"{by_len[L][n]:.1f} ({by_len[L][n] / by_len[L]['attention']:.2f}x)" for L in a.lengths)])
    print(f"\n## fwd+bwd ms, {a.clock} clock (ratio to attention)\n")
    print(table(["mixer", *(f"L={L}" for L in a.lengths)], rows))
    ref_len = 4096 if 4096 in by_len else a.lengths[-1]
    ratios = {n: by_len[ref_len][n] / by_len[ref_len]["attention"] for n in names if n != "attention"}

    rows = []
    for n in names:
        cells = []
        for c in a.contexts:
            ms, nbytes = decode_ms(mixers[n], c, a.d)
            cells += [f"{ms:.2f}", f"{nbytes / 2**10:,.0f}"]
        rows.append([n, *cells])
    print("\n## decoding: ms/token and state KiB after a context of C tokens\n")
    print(table(["mixer", *(h for c in a.contexts for h in (f"ms C={c}", f"KiB C={c}"))], rows))

    if a.train_seconds > 0:
        rows = []
        for n in names:
            bpb = train_bpb(n, a.train_seconds, a.data)
            rows.append([n, f"{bpb:.3f}" if bpb is not None else "failed"])
        print(f"\n## val bits/byte after {a.train_seconds:.0f} s of training ({a.data or 'embedded corpus'})\n")
        print(table(["mixer", "val bpb"], rows))

    print(f"\nL={ref_len} fwd+bwd time vs attention: " + " ".join(f"{n}={r:.2f}" for n, r in ratios.items()))


if __name__ == "__main__":
    main()

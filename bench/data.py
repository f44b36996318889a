#!/usr/bin/env python
"""Data-pipeline throughput of lmtk: tokenise + pack MB/s, and the data loader's share of a step.

1. Train a byte-level BPE tokenizer with lmtk.data.tokenizer.train_tokenizer (the default
   recipe's tokenizer settings, trained on --train-mb of the corpus), then time
   lmtk.data.packing.tokenize_to_file over --mb of documents (read into memory first: the
   figure is tokenise + pack + write, not disk reads) with one worker process per core and
   with one process, alternating with the baseline: `tokenizers`' encode_batch_fast (threaded
   in Rust) packed and written the same way, which is how lmtk encoded before its word cache
   (lmtk/data/wordcache.py). The three files must hold identical ids. Each lmtk run starts
   with a cold word cache. Target: >= 5 MB/s wall clock on 2 cores.
2. Data-loader share of step time: Batches.get(start, micro_batch) on the packed memmap vs one
   full training step of the default recipe (compose("default"): model, objective and
   optimizer built as `lmtk train` builds them; forward + backward + clip + AdamW, fp32 on
   CPU). The loop calls get() synchronously, so its time adds to every step. Target: < 5%.

    python bench/data.py                  # ~2 min on 2 cores
    python bench/data.py --text bench/data/english/train.txt   # English (../shared/corpora)
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import table

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20.0, help="MB (UTF-8) of documents to tokenise (default: %(default)s)")
    p.add_argument("--train-mb", type=float, default=3.0, help="MB of text to train the tokenizer on (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (default: the default recipe's)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds, median reported (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="training steps per round for the loader share (default: %(default)s)")
    p.add_argument("--gets", type=int, default=200, help="Batches.get calls per round (default: %(default)s)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to tokenise instead of the embedded corpus "
                   "(documents split at blank lines), e.g. bench/data/english/train.txt")
    p.add_argument("--device", default="cpu", help="device of the training step (default: %(default)s)")
    return p.parse_args(argv)




def docs_until(source, limit_chars: int) -> list[str]:
    """Train documents of `source`, cycled if the corpus is smaller than the limit."""
    out, seen = [], 0
    for _ in itertools.count():
        n = 0
        for d in source.documents("train"):
            if seen >= limit_chars:
                return out
            d = d[: limit_chars - seen]
            seen += len(d)
            out.append(d)
            n += 1
        if n == 0:
            return out


# ---- the baseline: `tokenizers` alone, as lmtk encoded before its word cache ------------------


def tokenizers_to_file(docs, tok, path, dtype) -> int:
    """encode_batch_fast on 512-document batches (the Rust side runs one thread per core), packed
    with [SEP] after each document and written: the same work as tokenize_to_file, without lmtk."""
    eos, n = [tok.eos_id], 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), 512):
            encs = tok.tk.encode_batch_fast(docs[i : i + 512], add_special_tokens=False)
            flat = np.fromiter(itertools.chain.from_iterable(e.ids + eos for e in encs), dtype=dtype)
            f.write(flat.tobytes())
            n += len(flat)
    return n


def main(argv=None) -> int:
    args = parse_args(argv)
    from omegaconf import OmegaConf

    from lmtk.config import compose
    from lmtk.data import packing
    from lmtk.data.packing import Batches, tokenize_to_file
    from lmtk.data.sources import Source
    from lmtk.data.tokenizer import train_tokenizer

    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores ({torch.backends.cpu.get_cpu_capability()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}; "
          f"load average at start {os.getloadavg()[0]:.1f} (shared machine)", flush=True)
    t_all = time.perf_counter()
    cfg = compose("default")
    source = Source(cfg.data)

    # ---- corpus ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    if args.text:
        raw = Path(args.text).read_text(encoding="utf-8")[: int(args.mb * 1e6)]
        docs = [d for d in raw.split("\n\n") if d.strip()]
        args.corpus_name = Path(args.text).name
    else:
        docs = docs_until(source, int(args.mb * 1e6))
        args.corpus_name = "the embedded corpus"
    t_read = time.perf_counter() - t0
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"[data] {len(docs):,} documents, {mb:.1f} MB read in {t_read:.1f}s (outside the timers)", flush=True)

    # ---- tokenizer ---------------------------------------------------------------------------
    tcfg = OmegaConf.create(dict(OmegaConf.to_container(cfg.tokenizer), train_chars=int(args.train_mb * 1e6)))
    if args.vocab:
        tcfg.vocab_size = args.vocab
    t0 = time.perf_counter()
    tok = train_tokenizer(tcfg, iter(docs))
    t_train = time.perf_counter() - t0
    print(f"[data] trained BPE vocab {tok.vocab_size} on {args.train_mb:g} MB in {t_train:.1f}s", flush=True)
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32

    # ---- tokenise + pack, alternating lmtk (all cores / one process) with the baseline -----------
    workers = packing.encode_workers()
    stages = {f"lmtk ({workers} processes)": workers, "lmtk (1 process)": 1, "tokenizers encode_batch_fast": 0}
    times = {k: [] for k in stages}
    cpu = {k: [] for k in stages}  # CPU seconds of this process alone (workers not counted)
    tmp = tempfile.TemporaryDirectory()
    paths = {k: Path(tmp.name) / f"{i}.bin" for i, k in enumerate(stages)}
    n_tok = 0
    for r in range(args.rounds):
        for stage in list(stages) if r % 2 == 0 else list(stages)[::-1]:
            tok._words = None  # a cold word cache every time: one pass over a corpus is the real use
            t0, c0 = time.perf_counter(), time.process_time()
            if stages[stage]:
                n_tok, _ = tokenize_to_file(docs, tok, paths[stage], dtype, workers=stages[stage])
            else:
                tokenizers_to_file(docs, tok, paths[stage], dtype)
            times[stage].append(time.perf_counter() - t0)
            cpu[stage].append(time.process_time() - c0)
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {mb / v[-1]:.2f} MB/s" for k, v in times.items()), flush=True)
    contents = {k: np.fromfile(p, dtype=dtype) for k, p in paths.items()}
    base = contents.pop("tokenizers encode_batch_fast")
    same = all(np.array_equal(c, base) for c in contents.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    target_mbs = 5.0
    lmtk_key = next(iter(stages))
    tf = mb / med[lmtk_key]
    rows = [["train BPE tokenizer (train_tokenizer)", f"{args.train_mb:g} MB, vocab {tok.vocab_size}", f"{t_train:.2f}",
             f"{args.train_mb / t_train:.2f}", "-", "1 run"]]
    base_t = med["tokenizers encode_batch_fast"]
    for k in stages:
        note = f"{base_t / med[k]:.2f}x tokenizers" if stages[k] else "baseline (lmtk before the word cache)"
        if k == lmtk_key:
            note += "; " + ("met (>= 5 MB/s)" if tf >= target_mbs else f"missed: {tf:.2f} vs 5 MB/s ({100 * (tf / target_mbs - 1):+.0f}%)")
        rows.append([f"tokenise + pack + write: {k}", f"{mb:.1f} MB -> {n_tok / 1e6:.2f}M tokens", f"{med[k]:.2f}",
                     f"{mb / med[k]:.2f}", f"{statistics.median(cpu[k]):.2f}", note])
    out = [f"tokenise + pack ({mb:.1f} MB of {args.corpus_name}, {len(docs):,} documents, {os.cpu_count()} cores; "
           f"median of {args.rounds} alternating rounds; ids " + ("identical in all three" if same else "DIFFER") + ")\n"
           + table(["stage", "amount", "seconds", "MB/s", "CPU-s (this process)", "note"], rows)]
    path = paths[lmtk_key]

    # ---- data-loader share of a training step ---------------------------------------------------
    from lmtk.models import build_model, model_config
    from lmtk.objectives import build_objective
    from lmtk.train.loop import step_seed
    from lmtk.train.optim import build_optimizer, step_unless

    device = torch.device(args.device)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    L, mbs = cfg.data.seq_len, cfg.train.micro_batch_size
    batches = Batches(tokens, L, cfg.seed)
    torch.manual_seed(0)
    mcfg = model_config(cfg.model, tok.vocab_size)
    model = build_model(mcfg).to(device).train()
    objective = build_objective(cfg.objective, tok)
    opt = build_optimizer(model, cfg.optim, cfg.train.lr, device)
    pin = device.type == "cuda"

    def train_step(s: int, batch: torch.Tensor) -> None:
        gen = torch.Generator(device).manual_seed(step_seed(cfg.seed, s, 0))
        loss, _ = objective.loss(model, batch.to(device, non_blocking=True), gen, 0.0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        step_unless(opt, (~torch.isfinite(loss.detach().float() + gnorm)))  # as the loop: skip on device
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fixed = batches.get(0, mbs)
    for s in range(2):  # warm-up
        train_step(s, fixed)
    get_t, step_t = [], []
    sample = 0
    for r in range(args.rounds):
        for part in ("get", "step") if r % 2 == 0 else ("step", "get"):
            if part == "get":
                t0 = time.perf_counter()
                for _ in range(args.gets):
                    batches.get(sample, mbs, pin=pin)
                    sample += mbs
                get_t.append((time.perf_counter() - t0) / args.gets)
            else:
                t0 = time.perf_counter()
                for s in range(args.steps):
                    train_step(s, fixed)
                step_t.append((time.perf_counter() - t0) / args.steps)
        print(f"  round {r + 1}/{args.rounds}: Batches.get {1e6 * get_t[-1]:.0f} us, step {1e3 * step_t[-1]:.0f} ms", flush=True)
    g, st = statistics.median(get_t), statistics.median(step_t)
    # first get of an epoch also draws the window permutation: time it separately
    t0 = time.perf_counter()
    Batches(tokens, L, cfg.seed + 1).get(0, mbs)
    first = time.perf_counter() - t0
    share = g / (g + st)
    m = cfg.model
    rows = [
        [f"Batches.get({mbs} x {L}) from the memmap", f"{1e3 * g:.3f}", f"{mbs * L / g / 1e6:.1f}M tok/s", "page cache warm"],
        ["  first get of an epoch (draws the permutation)", f"{1e3 * first:.3f}", f"{batches.n:,} windows", "once per epoch"],
        [f"training step (default recipe: {m.n_layers}L d{m.d_model} {m.mlp}, V{mcfg.vocab_size}, {objective.name}, fp32 {device.type})",
         f"{1e3 * st:.1f}", f"{mbs * L / st:,.0f} tok/s", "fwd + bwd + clip + AdamW"],
        ["data-loader share of step time", f"{100 * share:.3f}%", "-",
         "met (< 5%)" if share < 0.05 else f"missed: {100 * share:.1f}% vs < 5%"],
    ]
    out.append(f"data-loader share (median of {args.rounds} alternating rounds: {args.gets} gets / {args.steps} steps each)\n"
               + table(["what", "ms", "rate", "note"], rows))
    del tokens
    tmp.cleanup()
    print("\n" + "\n\n".join(out))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load average at end {os.getloadavg()[0]:.1f}")
    print(f"data tokenize_mb_s={tf:.2f} loader_share_pct={100 * share:.3f} ids_identical={str(same).lower()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

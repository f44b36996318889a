#!/usr/bin/env python
"""Data-pipeline throughput of lmtk: tokenise + pack MB/s, and the data loader's share of a step.

1. Train a byte-level BPE tokenizer with lmtk.data.tokenizer.train_tokenizer (an OmegaConf
   config: the default recipe's tokenizer settings, trained on --train-mb of the embedded
   corpus), then time lmtk.data.packing.tokenize_to_file over --mb of embedded-corpus
   documents (read into memory first: the figure is tokenise + pack + write, not disk reads).
   Rounds alternate with a breakdown of where the time goes: tokenizer.encode_batch alone,
   `tokenizers`' encode_batch_fast alone (no offsets; lmtk does not use it), and the packing
   step alone (lmtk's np.fromiter over Python ints vs a np.concatenate alternative), each over
   the same 512-document batches. Target: tokenize_to_file >= 5 MB/s (wall clock). "MB per CPU-s"
   divides by the CPU time this process got (all threads), a figure less swayed by other load.
2. Data-loader share of step time: Batches.get(start, micro_batch) on the packed memmap vs one
   full training step of the default recipe (compose("default"): model, objective and
   optimizer built as `lmtk train` builds them; forward + backward + clip + AdamW, fp32 on
   CPU). The loop calls get() synchronously, so its time adds to every step. Target: < 5%.

    python bench/data.py                  # ~1-2 min on 2 cores
    python bench/data.py --mb 40 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
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


# ---- breakdown helpers (same batching as lmtk.data.packing.tokenize_to_file) -----------------


def _batches(docs, n):
    return [docs[i : i + n] for i in range(0, len(docs), n)]


def encode_only(tok, docs, bs, fast: bool) -> int:
    """The tokenizer call of tokenize_to_file alone (ids converted to Python lists, then dropped)."""
    enc = tok.tk.encode_batch_fast if fast else tok.tk.encode_batch
    n = 0
    for b in _batches(docs, bs):
        n += sum(len(e.ids) for e in enc(b, add_special_tokens=False))
    return n


def collect_ids(tok, docs, bs, fast: bool) -> list[list[list[int]]]:
    """All ids, kept (untimed, GC paused: keeping millions of lists alive makes the collector crawl)."""
    enc = tok.tk.encode_batch_fast if fast else tok.tk.encode_batch
    gc.disable()
    try:
        return [[e.ids for e in enc(b, add_special_tokens=False)] for b in _batches(docs, bs)]
    finally:
        gc.enable()


def pack_fromiter(all_ids, eos, dtype) -> int:
    """lmtk's packing step (tokenize_to_file), without the tokenizer and the file write."""
    n = 0
    for ids in all_ids:
        flat = np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=dtype, count=sum(len(s) + 1 for s in ids))
        n += len(flat.tobytes())
    return n


def pack_concat(all_ids, eos, dtype) -> int:
    """Alternative packing: one np.array per document, joined with np.concatenate (no per-token generator)."""
    n = 0
    e = np.array([eos], dtype=dtype)
    for ids in all_ids:
        flat = np.concatenate([a for seq in ids for a in (np.array(seq, dtype=dtype), e)])
        n += len(flat.tobytes())
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
    docs = docs_until(source, int(args.mb * 1e6))
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
    bs = packing.BATCH_DOCS

    # ---- tokenise + pack, alternating with the breakdown --------------------------------------
    stage_names = ("tokenize_to_file", "encode_batch", "encode_batch_fast", "pack_fromiter", "pack_concat")
    times = {k: [] for k in stage_names}
    cpu = {k: [] for k in stage_names}  # CPU seconds of this process (all threads): load-independent-ish
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "train.bin"
    n_tok = 0
    # ids for the packing-only rows (untimed); identity check of encode_batch_fast on the way
    ids = collect_ids(tok, docs, bs, fast=False)
    ids_fast_same = ids == collect_ids(tok, docs, bs, fast=True)
    gc.freeze()  # the kept ids would otherwise be rescanned by every full collection during packing
    for r in range(args.rounds):
        stages = ["tokenize_to_file", "encode_batch", "encode_batch_fast"]
        for stage in stages if r % 2 == 0 else stages[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            if stage == "tokenize_to_file":
                n_tok, _ = tokenize_to_file(docs, tok, path, dtype)
            else:
                encode_only(tok, docs, bs, fast=stage == "encode_batch_fast")
            times[stage].append(time.perf_counter() - t0)
            cpu[stage].append(time.process_time() - c0)
        for stage in ("pack_fromiter", "pack_concat") if r % 2 == 0 else ("pack_concat", "pack_fromiter"):
            t0, c0 = time.perf_counter(), time.process_time()
            (pack_fromiter if stage == "pack_fromiter" else pack_concat)(ids, tok.eos_id, dtype)
            times[stage].append(time.perf_counter() - t0)
            cpu[stage].append(time.process_time() - c0)
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {mb / v[-1]:.2f} MB/s" for k, v in times.items()), flush=True)
    del ids
    gc.unfreeze()
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    target_mbs = 5.0
    tf = mb / med["tokenize_to_file"]
    par = mcpu["tokenize_to_file"] / med["tokenize_to_file"]
    rows = [
        ["train BPE tokenizer (train_tokenizer)", f"{args.train_mb:g} MB, vocab {tok.vocab_size}", f"{t_train:.2f}",
         f"{args.train_mb / t_train:.2f}", "-", "1 run"],
        ["tokenise + pack + write (tokenize_to_file)", f"{mb:.1f} MB -> {n_tok / 1e6:.2f}M tokens", f"{med['tokenize_to_file']:.2f}",
         f"{tf:.2f}", f"{mb / mcpu['tokenize_to_file']:.2f}",
         ("met (>= 5 MB/s)" if tf >= target_mbs else f"missed: {tf:.2f} vs 5 MB/s ({100 * (tf / target_mbs - 1):+.0f}%)")
         + f"; got {par:.2f} of {os.cpu_count()} cores"],
        ["  of which: encode_batch (as lmtk calls it)", f"{mb:.1f} MB", f"{med['encode_batch']:.2f}", f"{mb / med['encode_batch']:.2f}",
         f"{mb / mcpu['encode_batch']:.2f}", f"{100 * med['encode_batch'] / med['tokenize_to_file']:.0f}% of tokenize_to_file"],
        ["  of which: packing (lmtk's np.fromiter)", f"{n_tok / 1e6:.2f}M tokens", f"{med['pack_fromiter']:.2f}",
         f"{mb / med['pack_fromiter']:.1f}", f"{mb / mcpu['pack_fromiter']:.1f}",
         f"{100 * med['pack_fromiter'] / med['tokenize_to_file']:.0f}% of tokenize_to_file"],
        ["  alternative: encode_batch_fast (no offsets)", f"{mb:.1f} MB", f"{med['encode_batch_fast']:.2f}",
         f"{mb / med['encode_batch_fast']:.2f}", f"{mb / mcpu['encode_batch_fast']:.2f}",
         f"{med['encode_batch'] / med['encode_batch_fast']:.2f}x encode_batch, " + ("identical ids" if ids_fast_same else "ids DIFFER")],
        ["  alternative: packing with np.concatenate", f"{n_tok / 1e6:.2f}M tokens", f"{med['pack_concat']:.2f}",
         f"{mb / med['pack_concat']:.1f}", f"{mb / mcpu['pack_concat']:.1f}", f"{med['pack_fromiter'] / med['pack_concat']:.2f}x lmtk's packing"],
    ]
    out = [f"tokenise + pack ({mb:.1f} MB of the embedded corpus, {len(docs):,} documents, {os.cpu_count()} cores; "
           f"median of {args.rounds} alternating rounds)\n" + table(["stage", "amount", "seconds", "MB/s", "MB per CPU-s", "note"], rows)]

    # ---- data-loader share of a training step ---------------------------------------------------
    from lmtk.models import build_model, model_config
    from lmtk.objectives import build_objective
    from lmtk.train.loop import step_seed
    from lmtk.train.optim import build_optimizer

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
        opt.found_inf = (~torch.isfinite(loss.detach().float() + gnorm)).float()  # as the loop: skip on device
        opt.step()
        del opt.found_inf
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
    print(f"data tokenize_mb_s={tf:.2f} loader_share_pct={100 * share:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training and data-pipeline throughput on this machine (fp32; the CPU unless --device).

1. train tok/s: the model, objective and optimizer are built in-process from lmtk
   (lmtk.models, lmtk.objectives, lmtk.train.optim) exactly as `lmtk train` builds them;
   each timed step is forward + backward + grad clip + AdamW step (fused on GPU, foreach on CPU) on one micro-batch of
   synthetic token ids (throughput does not depend on the ids), after warm-up steps.
     - default: the model/objective/seq_len/micro-batch of recipes/default.yaml
     - bert:    Cramming's BERT (conf/model/crammed-bert.yaml: 16 layers, d768), MLM with
                sparse prediction, seq 128, a 32768 vocabulary, a small micro-batch
2. data MB/s: read the embedded corpus (Python stdlib), train the default recipe's BPE
   tokenizer, then tokenise + pack ~20 MB into a flat token file with
   lmtk.data.packing.tokenize_to_file, and cut training windows with Batches.

    python bench/throughput.py                       # everything, ~2-4 min on 2 cores
    python bench/throughput.py --only train model.d_model=256 data.seq_len=256
Extra key=value arguments override the default recipe for the "default" row.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import parse_with_overrides, stub_tokenizer, table

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train tok/s (fp32) and data-pipeline MB/s of lmtk on this machine.",
                                epilog="Extra key=value arguments override the default recipe for the 'default' row.")
    p.add_argument("--only", choices=["train", "data"], default=None, help="run one section only")
    p.add_argument("--steps", type=int, default=8, help="timed steps, default model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default: %(default)s)")
    p.add_argument("--bert-steps", type=int, default=3, help="timed steps, BERT model (default: %(default)s)")
    p.add_argument("--bert-micro-batch", type=int, default=2, help="BERT micro-batch (default: %(default)s)")
    p.add_argument("--bert-vocab", type=int, default=32768, help="BERT vocabulary (default: %(default)s, as Cramming)")
    p.add_argument("--no-bert", action="store_true", help="skip the BERT row")
    p.add_argument("--data-mb", type=float, default=20.0, help="MB of embedded corpus to tokenise (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; precision stays fp32")
    args = parse_with_overrides(p, argv)
    return args




# ---------------------------------------------------------------------------------------
# 1. training throughput
# ---------------------------------------------------------------------------------------




def train_throughput(label: str, cfg, vocab: int, micro_batch: int, steps: int, warmup: int, device: torch.device) -> list[str]:
    from lmtk.models import build_model, model_config
    from lmtk.objectives import build_objective
    from lmtk.train.loop import step_seed
    from lmtk.train.optim import build_optimizer, step_unless

    torch.manual_seed(0)
    mcfg = model_config(cfg.model, vocab)
    model = build_model(mcfg).to(device).train()
    tok = stub_tokenizer(vocab)
    objective = build_objective(cfg.objective, tok)
    opt = build_optimizer(model, cfg.optim, cfg.train.lr, device)
    L = cfg.data.seq_len
    gen_data = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, vocab, (micro_batch, L), generator=gen_data) for _ in range(4)]

    def step(i: int) -> float:
        batch = batches[i % len(batches)].to(device)
        gen = torch.Generator(device).manual_seed(step_seed(0, i, 0))
        loss, _ = objective.loss(model, batch, gen, 0.0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        # as lmtk.train.loop.fit: a non-finite step is skipped (on the device by fused AdamW on a GPU)
        step_unless(opt, (~torch.isfinite(loss.detach() + gnorm)))
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        loss = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), "non-finite loss"
    times = np.array(times)
    tok_step = micro_batch * L
    med = float(np.median(times))
    flops = model.flops_per_token(L) * tok_step
    if objective.name == "mlm":  # sparse prediction: the head runs on mask_rate of the positions only
        k = max(1, round(cfg.objective.mask_rate * L))
        flops -= 6 * mcfg.vocab_size * mcfg.d_model * micro_batch * (L - k)
    m = cfg.model
    shape = f"{m.n_layers}L d{m.d_model} h{m.n_heads} V{mcfg.vocab_size}"
    return [
        label, shape, objective.name, f"{model.num_params() / 1e6:.2f}M", f"{micro_batch}x{L}",
        f"{steps}", f"{1000 * med:,.0f}", f"{tok_step / med:,.0f}", f"{tok_step * steps / times.sum():,.0f}",
        f"{flops / med / 1e9:,.1f}",
    ]


def train_section(args) -> str:
    from lmtk.config import compose

    device = torch.device(args.device)
    rows = []
    cfg = compose("default", args.overrides)
    vocab = cfg.tokenizer.vocab_size
    print(f"[train] default: {cfg.model.n_layers} layers d{cfg.model.d_model}, seq {cfg.data.seq_len}, "
          f"micro-batch {cfg.train.micro_batch_size}, vocab {vocab} ...", flush=True)
    rows.append(train_throughput("default", cfg, vocab, cfg.train.micro_batch_size, args.steps, args.warmup, device))
    print(table(HEAD, rows[-1:]), flush=True)
    if not args.no_bert:
        bcfg = compose("default", ["model=crammed-bert", "objective=mlm", "data.seq_len=128"])
        print(f"[train] bert: 16 layers d768, MLM, seq 128, micro-batch {args.bert_micro_batch}, vocab {args.bert_vocab} ...", flush=True)
        rows.append(train_throughput("bert (cramming)", bcfg, args.bert_vocab, args.bert_micro_batch, args.bert_steps, 1, device))
        print(table(HEAD, rows[-1:]), flush=True)
    return table(HEAD, rows)


HEAD = ["config", "shape", "obj", "params", "micro-batch", "steps", "ms/step (median)", "tok/s (median)", "tok/s (mean)", "GFLOP/s"]


# ---------------------------------------------------------------------------------------
# 2. data pipeline
# ---------------------------------------------------------------------------------------


def _docs_until(source, limit_chars: int):
    """Train documents of `source`, cycled until `limit_chars` (the embedded corpus may be smaller)."""
    seen = 0
    for epoch in itertools.count():
        n = 0
        for d in source.documents("train"):
            if seen >= limit_chars:
                return
            d = d[: limit_chars - seen]
            seen += len(d)
            n += 1
            yield d
        if n == 0:
            return


def data_section(args) -> str:
    from lmtk.config import compose
    from lmtk.data.packing import Batches, tokenize_to_file
    from lmtk.data.sources import Source
    from lmtk.data.tokenizer import train_tokenizer

    cfg = compose("default")
    source = Source(cfg.data)
    limit = int(args.data_mb * 1e6)
    rows = []

    t0 = time.perf_counter()
    n_chars = n_bytes = n_docs = 0
    for d in source.documents("train"):
        n_chars += len(d)
        n_bytes += len(d.encode("utf-8"))
        n_docs += 1
    dt = time.perf_counter() - t0
    corpus_mb = n_bytes / 1e6
    rows.append(["read embedded corpus (train split)", f"{n_docs:,} files", f"{n_bytes / 1e6:.1f}", f"{dt:.1f}", f"{n_bytes / 1e6 / dt:,.1f}", "-"])
    print(f"[data] embedded corpus: {n_docs} files, {n_bytes / 1e6:.1f} MB (train split)", flush=True)

    t0 = time.perf_counter()
    tok = train_tokenizer(cfg.tokenizer, source.documents("train"))
    dt = time.perf_counter() - t0
    tc = min(cfg.tokenizer.train_chars, n_chars)
    rows.append([f"train BPE tokenizer (vocab {cfg.tokenizer.vocab_size})", f"{tc / 1e6:.1f}M chars", f"{tc / 1e6:.1f}", f"{dt:.1f}", f"{tc / 1e6 / dt:,.1f}", "-"])
    print(f"[data] trained tokenizer in {dt:.1f}s", flush=True)

    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        docs = list(_docs_until(source, limit))  # read outside the timer: the row measures tokenise + pack
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        t0 = time.perf_counter()
        n_tok, n_ch = tokenize_to_file(docs, tok, path, dtype)
        dt = time.perf_counter() - t0
        note = f"{mb / corpus_mb:.1f}x corpus" if mb > corpus_mb * 1.01 else "-"
        rows.append(["tokenise + pack (tokenize_to_file)", f"{n_tok / 1e6:.2f}M tokens", f"{mb:.1f}", f"{dt:.1f}", f"{mb / dt:,.2f}", note])
        print(f"[data] tokenised {mb:.1f} MB into {n_tok:,} tokens in {dt:.1f}s ({n_ch / n_tok:.2f} chars/token)", flush=True)

        tokens = np.memmap(path, dtype=dtype, mode="r")
        b = Batches(tokens, cfg.data.seq_len, 0)
        mbs = cfg.train.micro_batch_size
        n = min(b.n, 20_000)
        t0 = time.perf_counter()
        for s in range(0, n, mbs):
            b.get(s, mbs)
        dt = time.perf_counter() - t0
        mb_cut = n * cfg.data.seq_len * np.dtype(dtype).itemsize / 1e6
        rows.append([f"cut windows (Batches.get, {mbs}x{cfg.data.seq_len})", f"{n:,} windows", f"{mb_cut:.1f} (tokens)", f"{dt:.2f}",
                     f"{mb_cut / dt:,.1f}", f"{n * cfg.data.seq_len / dt / 1e6:,.1f}M tok/s"])
        del tokens
    return table(["stage", "amount", "MB", "seconds", "MB/s", "note"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}, fp32, python {platform.python_version()}", flush=True)
    out = []
    t0 = time.perf_counter()
    if args.only in (None, "train"):
        out.append("train throughput (fp32; forward + backward + clip + AdamW step on one micro-batch, after warm-up)\n" + train_section(args))
    if args.only in (None, "data"):
        out.append(f"data pipeline (embedded corpus, default recipe's tokenizer; ~{args.data_mb:g} MB)\n" + data_section(args))
    print("\n" + "\n\n".join(out))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPU training throughput and MFU of lmtk models (bf16 autocast, fused AdamW).

  gpt:  GPT-124M, conf/model/gpt2.yaml (12 layers, d768, 12 heads, learned positions,
        LayerNorm, GELU, biases, tied head), vocab 50304, seq 1024, CLM
  bert: crammed BERT, conf/model/crammed-bert.yaml (16 layers, d768, gated GELU, no biases),
        vocab 32768, seq 128, MLM with sparse prediction (15% of the positions)

Each step is what `lmtk train` does per optimizer step with one micro-batch: forward +
backward under bf16 autocast, grad-norm clip, the on-device finiteness check (found_inf), fused AdamW step.
The model, objective and optimizer come from lmtk (lmtk.models, lmtk.objectives,
lmtk.train.optim). --compile compiles each block as train.compile=true does (model.compile_blocks())
and reports the compile time (first steps minus steady-state steps).

    MFU = model.flops_per_token(seq) x tok/s / peak        (peak: --peak-tflops, default 989 = H100 bf16 dense)

For MLM, flops_per_token counts the LM head on every position; sparse prediction runs it on
15% of them, so the table also gives the MFU of the FLOPs actually executed.
Targets (one H100): GPT-124M >= 500k tok/s and >= 45% MFU; crammed BERT >= 50% MFU.

    python bench/mfu.py                       # both models, eager
    python bench/mfu.py --compile --only gpt --batch 32
Without CUDA it runs a tiny CPU smoke version (2 layers, a few steps): the figures are not meaningful.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import stub_tokenizer, table

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "gpt": dict(yaml="gpt2.yaml", objective="clm", layers=12, d_model=768, heads=12, seq=1024, vocab=50304, batch=16),
    "bert": dict(yaml="crammed-bert.yaml", objective="mlm", layers=16, d_model=768, heads=12, seq=128, vocab=32768, batch=256),
}
SMOKE = dict(layers=2, d_model=128, heads=4, batch=2)  # CPU smoke run: seq min(seq, 128)
TARGETS = {"gpt": {"tok_s": 500e3, "mfu": 0.45}, "bert": {"mfu": 0.50}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(MODELS), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (as train.compile=true)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: gpt 16, bert 256)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: gpt 1024, bert 128)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 5 eager, 10 with --compile; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default: 20; smoke 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, median reported (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak, TFLOP/s (default: %(default)s, H100 bf16 dense)")
    p.add_argument("--mask-rate", type=float, default=0.15)
    p.add_argument("--device", default=None, help="default: cuda when available, else a CPU smoke run")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.smoke = not args.device.startswith("cuda")
    if args.warmup is None:
        args.warmup = 1 if args.smoke else (10 if args.compile else 5)
    if args.steps is None:
        args.steps = 2 if args.smoke else 20
    return args






def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, args, device: torch.device) -> list[str]:
    from omegaconf import OmegaConf

    from lmtk.models import ModelConfig, build_model
    from lmtk.objectives import CLM, MLM
    from lmtk.train.loop import step_seed
    from lmtk.train.optim import build_optimizer, step_unless

    spec = dict(MODELS[name])
    if args.smoke:
        spec.update(SMOKE, seq=min(spec["seq"], 128))
    if args.batch:
        spec["batch"] = args.batch
    if args.seq:
        spec["seq"] = args.seq
    d = SimpleNamespace(**spec)

    m = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / d.yaml))
    m.update(n_layers=d.layers, d_model=d.d_model, n_heads=d.heads, vocab_size=d.vocab, max_seq_len=max(d.seq, m["max_seq_len"]))
    if m.get("d_ff") is not None:
        m["d_ff"] = 4 * d.d_model
    mcfg = ModelConfig.from_dict(m)
    torch.manual_seed(0)
    model = build_model(mcfg).to(device).train()
    tok = stub_tokenizer(d.vocab)
    if d.objective == "mlm":
        ocfg = OmegaConf.load(REPO / "conf" / "objective" / "mlm.yaml")
        ocfg.mask_rate = args.mask_rate
        objective = MLM(ocfg, tok)
    else:
        objective = CLM(None, tok)
    optim_cfg = OmegaConf.load(REPO / "conf" / "optim" / "adamw.yaml")
    opt = build_optimizer(model, optim_cfg, 1e-4, device)
    fused = bool(opt.defaults.get("fused"))
    compile_setup = 0.0
    if args.compile:
        t0 = time.perf_counter()
        model.compile_blocks()  # as lmtk.train.loop.fit does for train.compile=true
        compile_setup = time.perf_counter() - t0
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(device.type, enabled=False)
    gen_data = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, d.vocab, (d.batch, d.seq), generator=gen_data).to(device) for _ in range(4)]

    def step(i: int) -> None:
        gen = torch.Generator(device).manual_seed(step_seed(0, i, 0))
        with amp:
            loss, _ = objective.loss(model, batches[i % len(batches)], gen, 0.0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # as lmtk.train.loop.fit: a non-finite step is skipped on the device (fused AdamW reads
        # found_inf), no host sync per step
        step_unless(opt, (~torch.isfinite(loss.detach().float() + gnorm)))
        opt.zero_grad(set_to_none=True)

    print(f"[{name}] {d.layers} layers d{d.d_model} {mcfg.mlp}, vocab {d.vocab}, {d.batch}x{d.seq}, {d.objective}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW fused={fused}, compile={args.compile}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    rounds = []
    i = args.warmup
    for r in range(args.rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(i)
            i += 1
        sync(device)
        rounds.append((time.perf_counter() - t0) / args.steps)
        print(f"  round {r + 1}/{args.rounds}: {1e3 * rounds[-1]:.1f} ms/step, {d.batch * d.seq / rounds[-1]:,.0f} tok/s", flush=True)
    step_s = statistics.median(rounds)
    tok_s = d.batch * d.seq / step_s
    fpt = model.flops_per_token(d.seq)
    mfu = fpt * tok_s / (args.peak_tflops * 1e12)
    if d.objective == "mlm":  # head only on the k selected positions per sequence
        k = max(1, round(args.mask_rate * d.seq))
        fpt_exec = fpt - 6 * d.vocab * d.d_model * (d.seq - k) / d.seq
    else:
        fpt_exec = fpt
    mfu_exec = fpt_exec * tok_s / (args.peak_tflops * 1e12)
    compile_s = compile_setup + max(0.0, warm_s - args.warmup * step_s) if args.compile else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    tgt = TARGETS[name]
    status = []
    if "tok_s" in tgt:
        status.append("tok/s met" if tok_s >= tgt["tok_s"] else f"tok/s {tok_s / tgt['tok_s']:.0%} of {tgt['tok_s'] / 1e3:.0f}k")
    status.append("MFU met" if mfu >= tgt["mfu"] else f"MFU {100 * mfu:.1f}% vs {100 * tgt['mfu']:.0f}%")
    if args.smoke:
        status = ["smoke run: not meaningful"]
    target = " & ".join(([f">= {tgt['tok_s'] / 1e3:.0f}k tok/s"] if "tok_s" in tgt else []) + [f">= {100 * tgt['mfu']:.0f}% MFU"])
    return [
        name, f"{model.num_params() / 1e6:.1f}M", f"{d.batch}x{d.seq}", "yes" if args.compile else "no",
        "-" if compile_s is None else f"{compile_s:.1f}", f"{1e3 * step_s:.1f}", f"{tok_s:,.0f}",
        f"{fpt / 1e6:.0f}M", f"{fpt * tok_s / 1e12:.1f}", f"{100 * mfu:.1f}%",
        f"{100 * mfu_exec:.1f}%" if d.objective == "mlm" else "same",
        "-" if mem is None else f"{mem:.1f}", target, "; ".join(status),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.smoke:
        print("no GPU here: smoke run only (2 layers, d128, a few fp32 CPU steps); the figures below are not meaningful")
    else:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, peak {args.peak_tflops:g} TFLOP/s "
              f"(--peak-tflops), {args.warmup} warm-up steps, {args.rounds} rounds x {args.steps} steps, median", flush=True)
    names = [args.only] if args.only else list(MODELS)
    rows = []
    t0 = time.perf_counter()
    for name in names:
        rows.append(bench_model(name, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    head = ["model", "params", "batch x seq", "compile", "compile s", "ms/step", "tok/s", "FLOP/token", "TFLOP/s",
            "MFU", "MFU (executed)", "peak GiB", "target", "status"]
    print("\n" + ("SMOKE RUN (no GPU): " if args.smoke else "") +
          "lmtk training throughput (fwd + bwd under bf16 autocast + clip + fused AdamW; MFU = flops_per_token x tok/s / peak)")
    print(table(head, rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.smoke:
        print("no GPU here: smoke run only")
    return 0


if __name__ == "__main__":
    sys.exit(main())

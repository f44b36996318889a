#!/usr/bin/env python
"""The default recipe's training step, formulation by formulation (issue 16), and where a
step of the real loop spends its time outside the model.

1. step (default): forward + backward + clip + AdamW (as `lmtk train` builds it) of one batch at the default
   recipe's shape (2L d128 h4, BPE-1k, its batch x 128), built in-process as bench/throughput.py
   does, for variants run in alternating rounds in one process (A, B, C, A, B, C, ...), so a
   shared machine's load hits them alike; medians and ratios to the first variant:
     gpt2-style      learned positions, LayerNorm, GELU, biases (nanoGPT's block), before / after
     before          the default recipe as of issue 16: interleaved RoPE, F.rms_norm, fused head,
                     fused AdamW
     +half-rope      rotary in the half-split layout (model.rope_layout=half)
     +rmsnorm-fn     and RMSNorm with the hand-written backward (lmtk.models.layers.rms_norm)
     +foreach-adamw  and foreach AdamW (CPU)
     after           the default recipe now (the head dispatch included: fused at this shape)
     after, plain    ... with objective.fused_head=false
2. --profile: `lmtk train` itself (default recipe, budget.steps) under torch.profiler, with
   the loop's pieces labelled (forward/backward, clip, optimizer step, guard, meter, schedule,
   logging/progress, data): the share of a step each takes.

    python bench/step.py                      # ~2 min on 2 cores
    python bench/step.py --threads 1          # CPU time of one thread: steadier on a loaded machine
    python bench/step.py --profile --steps 60
    python bench/step.py --micro --threads 1  # each formulation alone (rotary, norms, fused/plain head)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import stub_tokenizer, table

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "gpt2-style, before": ["model.positions=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true", "+fused_adamw=1"],
    "before": ["model.rope_layout=interleaved", "+old_rms=1", "+force_fused=1", "+fused_adamw=1"],
    "+half-rope": ["+old_rms=1", "+force_fused=1", "+fused_adamw=1"],
    "+rmsnorm-fn": ["+force_fused=1", "+fused_adamw=1"],
    "+foreach-adamw": ["+force_fused=1"],
    "after": [],
    "after, plain head": ["objective.fused_head=false"],
    "gpt2-style, after": ["model.positions=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The default recipe's step by formulation, and the loop's profile.")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="steps per round and variant, or --profile's steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1: time CPU time of the thread")
    p.add_argument("--only", default=None, help="comma-separated variant labels")
    p.add_argument("--profile", action="store_true", help="profile `lmtk train` (default recipe) instead")
    p.add_argument("--micro", action="store_true", help="time each formulation alone (rotary, norms, head) instead")
    return p.parse_args(argv)


def build(overrides: list[str]):
    from lmtk.config import compose
    from lmtk.models import build_model, model_config
    from lmtk.objectives import build_objective
    from lmtk.train.optim import build_optimizer, step_unless

    extra = {o.split("=")[0][1:] for o in overrides if o.startswith("+")}
    cfg = compose("default", [o for o in overrides if not o.startswith("+")])
    vocab = cfg.tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model, vocab)).train()
    obj = build_objective(cfg.objective, stub_tokenizer(vocab))
    if "force_fused" in extra:
        obj.head_dispatch = False  # the fused head at every shape, as before issue 16
    opt = build_optimizer(model, cfg.optim, cfg.train.lr, torch.device("cpu"))
    if "fused_adamw" in extra:  # before issue 16: the fused AdamW kernel on CPU too
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, vocab, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=gen) for _ in range(4)]
    return dict(cfg=cfg, model=model, obj=obj, opt=opt, batches=batches, old_rms="old_rms" in extra, i=0)


def _old_rms(self, x):  # RMSNorm.forward before issue 16
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def step(v) -> None:
    from lmtk.models import layers
    from lmtk.train.optim import step_unless

    new_rms = layers.RMSNorm.forward
    if v["old_rms"]:
        layers.RMSNorm.forward = _old_rms
    try:
        model, opt, cfg = v["model"], v["opt"], v["cfg"]
        batch = v["batches"][v["i"] % 4]
        v["i"] += 1
        loss, _ = v["obj"].loss(model, batch, torch.Generator().manual_seed(v["i"]), 0.0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        step_unless(opt, (~torch.isfinite(loss.detach() + gnorm)))
        opt.zero_grad(set_to_none=True)
    finally:
        layers.RMSNorm.forward = new_rms


def step_section(args) -> str:
    labels = args.only.split(",") if args.only else list(VARIANTS)
    vs = {k: build(VARIANTS[k]) for k in labels}
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for v in vs.values():
        for _ in range(2):
            step(v)
    ms = {k: [] for k in vs}
    for r in range(args.rounds):
        for k, v in vs.items():
            t0 = clock()
            for _ in range(args.steps):
                step(v)
            ms[k].append(1000 * (clock() - t0) / args.steps)
        print(f"round {r + 1}: " + "  ".join(f"{k} {ms[k][-1]:.1f}" for k in vs), flush=True)
    tok = vs[labels[0]]["cfg"].train.micro_batch_size * vs[labels[0]]["cfg"].data.seq_len
    base = statistics.median(ms[labels[0]])
    rows = []
    for k in vs:
        med = statistics.median(ms[k])
        rows.append([k, " ".join(VARIANTS[k]) or "(recipe as is)", f"{med:.1f}", f"{min(ms[k]):.1f}-{max(ms[k]):.1f}",
                     f"{tok / med * 1000:,.0f}", f"{med / base:.2f}"])
    return table(["variant", "overrides", "ms/step (median)", "range", "tok/s", f"vs {labels[0]}"], rows)


# ---------------------------------------------------------------------------------------


def _timeit(fns: dict, clock, reps: int = 10, rounds: int = 15) -> dict:
    """Median microseconds per call of each function, in alternating rounds."""
    us = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t0 = clock()
            for _ in range(reps):
                f()
            us[k].append(1e6 * (clock() - t0) / reps)
    return {k: statistics.median(v) for k, v in us.items()}


def micro_section(args) -> str:
    """fwd+bwd of each formulation alone at the default recipe's shape (B 8, T 128, d 128, 4 heads)."""
    import torch.nn.functional as F

    from lmtk.models import layers
    from lmtk.models.fused_ce import linear_cross_entropy

    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    torch.manual_seed(0)
    B, T, H, Dh = 8, 128, 4, 32
    D = H * Dh
    rows = []
    # rotary on q and k out of the qkv projection (the projection's own cost included in both)
    rots = {k: layers.Rotary(Dh, 10000.0, T, k) for k in ("interleaved", "half")}
    cos, sin = rots["half"].cos_sin(T, torch.float32)
    W = torch.randn(3 * D, D) * 0.02
    x = torch.randn(B, T, D, requires_grad=True)

    def qkv_rotated(layout):  # as Attention.forward: one op on the qkv view (_RotaryQKV)
        def f():
            qk, v = rots[layout].rotate_qkv(F.linear(x, W).view(B, T, 3, H, Dh), cos, sin)
            (qk[:, :, 0].transpose(1, 2).sum() + qk[:, :, 1].transpose(1, 2).sum() * 0.5 + v.transpose(1, 2).sum()).backward()
        return f

    def stacked():  # the interleaved layout before issue 16: strided slices, re-stacked, per tensor
        q, k, v = F.linear(x, W).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
        q, k = layers._rotate_pairs_plain(q, cos, sin), layers._rotate_pairs_plain(k, cos, sin)
        (q.sum() + k.sum() * 0.5 + v.sum()).backward()

    def half_sliced():  # the half layout's first version: q and k sliced out, rotated, v sliced (autograd sums)
        qkv = F.linear(x, W).view(B, T, 3, H, Dh)
        q, k = (t.transpose(1, 2) for t in layers._Rotate.apply(qkv[:, :, :2], cos[:, None, None], sin[:, None, None], False).unbind(2))
        (q.sum() + k.sum() * 0.5 + qkv[:, :, 2].transpose(1, 2).sum()).backward()

    def no_rope():
        q, k, v = F.linear(x, W).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
        (q.sum() + k.sum() * 0.5 + v.sum()).backward()

    fns = {"interleaved, stacked (before)": stacked, "half, sliced (before)": half_sliced,
           "interleaved, complex qkv op (after)": qkv_rotated("interleaved"), "half, qkv op": qkv_rotated("half"), "none": no_rope}
    r = _timeit(fns, clock)
    for k in fns:
        if k != "none":
            rows.append([f"rotary q,k: {k}", f"{r[k]:,.0f}", f"{r[k] - r['none']:,.0f}"])
    # norms
    xn = torch.randn(B, T, D, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D)).requires_grad_()
    g = torch.randn(B, T, D)
    norms = {
        "F.rms_norm (before)": lambda: F.rms_norm(xn, (D,), w, 1e-6).backward(g),
        "x * rsqrt(mean(x^2) + eps) * w": lambda: (xn * torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-6) * w).backward(g),
        "lmtk rms_norm (after)": lambda: layers.rms_norm(xn, w, 1e-6).backward(g),
        "F.layer_norm (no bias), for scale": lambda: F.layer_norm(xn, (D,), w, None, 1e-5).backward(g),
        "LayerNorm of [x, -x] (exact RMSNorm)": lambda: (F.layer_norm(torch.cat((xn, -xn), -1), (2 * D,), None, None, 1e-6)[..., :D] * w).backward(g),
    }
    r = _timeit(norms, clock)
    rows += [[f"norm: {k}", f"{v:,.0f}", "-"] for k, v in r.items()]
    # head: fused vs plain, rows x vocab x d
    for n, v, d in [(127, 1024, 128), (254, 512, 64), (1016, 256, 128), (508, 1024, 128), (1016, 1024, 128), (1016, 4096, 128)]:
        h = torch.randn(n, d, requires_grad=True)
        wv = (torch.randn(v, d) * 0.02).requires_grad_()
        t = torch.randint(0, v, (n,))
        r = _timeit({"fused": lambda: linear_cross_entropy(h, wv, t, dispatch=False).backward(),
                     "plain": lambda: F.cross_entropy(F.linear(h, wv), t).backward()}, clock, reps=5, rounds=9)
        rows.append([f"head {n} rows x {v} vocab x d{d}: fused / plain", f"{r['fused']:,.0f} / {r['plain']:,.0f}",
                     f"{r['fused'] / r['plain']:.2f}x"])
    return table(["formulation (fwd+bwd)", "us (median)", "over none / ratio"], rows)


def profile_section(args) -> str:
    """`lmtk train` under torch.profiler, the loop's pieces wrapped in record_function."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    import lmtk.train.loop as loop
    from lmtk import log
    from lmtk.cli import app
    from typer.testing import CliRunner

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def wrapped(*a, **kw):
            with record_function(label):
                return fn(*a, **kw)
        setattr(owner, name, wrapped)

    wrap(loop, "_forward_backward", "1 forward+backward (model, loss, data)")
    wrap(loop, "_optimizer_step", "3 optimizer step (AdamW, zero_grad)")
    wrap(torch.nn.utils, "clip_grad_norm_", "2 clip_grad_norm_")
    wrap(loop._Guard, "update", "4 guard.update")
    wrap(loop._Guard, "check", "4 guard.check (sync)")
    wrap(loop._Meter, "add", "5 meter.add")
    wrap(loop._Meter, "read", "5 meter.read (sync)")
    wrap(loop, "lr_factor", "6 schedule (lr_factor)")
    wrap(loop, "micro_steps", "6 batch ramp (micro_steps)")
    wrap(loop, "_agree", "7 agree (single process: no-op)")
    wrap(log.Sinks, "log", "8 sinks.log (metrics.jsonl)")
    import lmtk.data.packing as packing
    wrap(packing.Batches, "get", "9 data: Batches.get")
    # the progress bar / console line
    wrap(log.ConsoleSink, "progress_update", "8 console.progress_update")
    wrap(loop, "step_seed", "9 per-micro-batch seed")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMTK_RUNS"] = tmp
        argv = ["train", "default", f"budget.steps={args.steps}", "budget.hours=null", "val.at_start=false",
                "val.every=0", "checkpoint.every=0", "run.name=profile"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("0 fit (training loop)"):
                res = CliRunner().invoke(app, argv)
        if res.exit_code:
            raise SystemExit(f"lmtk train failed: {res.output[-2000:]}\n{res.exception!r}")
    ev = {e.key: e for e in prof.key_averages() if e.key[:2] in {f"{i} " for i in range(10)}}
    fit_ms = next((e.cpu_time_total / 1000 for k, e in ev.items() if k.startswith("0 fit")), None)
    train = [e for k, e in ev.items() if k.startswith(("1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 ", "8 "))]
    loop_ms = sum(e.cpu_time_total for e in train) / 1000
    rows = []
    for k in sorted(ev):
        if k.startswith("0 "):
            continue
        e = ev[k]
        rows.append([k[2:], f"{e.count:,}", f"{e.cpu_time_total / 1000:,.1f}", f"{e.cpu_time_total / 1000 / args.steps:.3f}",
                     f"{100 * e.cpu_time_total / 1000 / loop_ms:.1f}%"])
    return (f"`lmtk train default budget.steps={args.steps}` (fit incl. data prep, validation and final checkpoint: "
            f"{fit_ms / 1000:.1f} s; the labelled step pieces: {loop_ms / 1000:.2f} s)\n"
            + table(["piece", "calls", "total ms", "ms/step", "share of labelled"], rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), fp32, python {platform.python_version()}", flush=True)
    out = profile_section(args) if args.profile else micro_section(args) if args.micro else step_section(args)
    print("\n" + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

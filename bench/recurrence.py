"""Timing check (not a test): chunked recurrences, fwd+bwd, against causal softmax attention of the
same shape (F.scaled_dot_product_attention, is_causal=True), in alternating rounds so that load on
the shared machine hits both alike. Issue 10's target: every recurrent mixer <= 0.5x attention at
L=4096 on CPU.

    python bench/recurrence.py [--T 4096] [--chunks 32 64 128] [--rounds 5] [--threads 1]

On a shared machine whose cores are busy, use --threads 1: with 2 OpenMP threads and a busy
second core every small op (the per-chunk matmuls) can stall at the OpenMP barrier for ~10 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmtk.models.mixers import delta, recurrence


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--D", type=int, default=32)
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument(
        "--kinds", nargs="+", default=["none", "head", "scalar", "channel", "channel_halved", "channel_exact", "delta", "gated_delta"]
    )
    a = p.parse_args()
    B, H, T, D = a.B, a.H, a.T, a.D
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    leaf = lambda *s: torch.randn(*s).requires_grad_()
    q, k, v = leaf(B, H, T, D), leaf(B, H, T, D), leaf(B, H, T, D)
    kn = F.normalize(k.detach(), dim=-1).requires_grad_()
    g_head = (-torch.rand(H)).requires_grad_()
    g_scalar = (-torch.rand(B, H, T)).requires_grad_()
    g_chan = (-torch.rand(B, H, T, D)).requires_grad_()  # mean -0.5: the one-matmul fast path at C <= 64
    g_strong = (-4 * torch.rand(B, H, T, D)).requires_grad_()  # mean -2: fast path at a halved chunk
    g_extreme = (-20 * torch.rand(B, H, T, D)).requires_grad_()  # mean -10: the exact sub-chunked path
    beta = torch.rand(B, H, T).requires_grad_()

    def run(fn):
        def go():
            out = fn()
            out.pow(2).mean().backward()
        return go

    cases = {"attention": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    g_of = dict(none=None, head=g_head, scalar=g_scalar, channel=g_chan, channel_halved=g_strong, channel_exact=g_extreme)
    for kind in a.kinds:
        for C in a.chunks:
            if kind in g_of:
                g = g_of[kind]
                cases[f"{kind} C={C}"] = run(lambda g=g, C=C: recurrence.chunked(q, k, v, g, chunk=C, scale=D**-0.5)[0])
            else:
                g = g_scalar if kind == "gated_delta" else None
                fn = lambda g=g, C=C: delta.chunked(q, kn, v, beta, g, chunk=C, scale=D**-0.5)[0]
                cases[f"{kind} C={C}"] = run(fn)

    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(a.rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    att = statistics.median(times["attention"])
    print(f"B={B} H={H} T={T} D={D} fp32, threads={torch.get_num_threads()}, median of {a.rounds} rounds, fwd+bwd")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med * 1e3:8.1f} ms  {med / att:5.2f}x attention")


if __name__ == "__main__":
    main()

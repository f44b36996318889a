"""suite=length: causal loss by position at 1x, 2x, 4x, 8x the training context (length generalisation).

Windows of m x ctx tokens (ctx: the run's data.seq_len) are cut from the run's own val split,
spread evenly over it and the same text for every multiple (each starts on a slot of the
longest window's length), and scored
left to right in one forward each. Each multiple's row reports the loss at the positions it adds:
for 1, 2, 4, 8 the power-of-two buckets [ctx/2, ctx), [ctx, 2 ctx), [2 ctx, 4 ctx), [4 ctx, 8 ctx)
(in general [previous multiple, m) x ctx, and [m/2, m) x ctx for the first), beside the loss over
the whole window. Within the context a token's loss falls with the context it has; past it, a
scheme that generalises (ALiBi; often NoPE, recurrent mixers) stays flat or keeps falling, one
that does not (RoPE, learned positions seen only up to ctx) rises. The 1x bucket's second half
of the context is the reference: it has ample context too.

A model runs past its training length wherever its scheme allows: rope, alibi, none and
recurrent mixers at any length, sinusoidal positions computed past their table; learned
positions have no embedding past model.max_seq_len, so those multiples are rows saying so, not
scored. Masked-only runs (objective=mlm) have no causal reading to score: a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from lmtk.errors import UserError


@dataclass
class Config:
    multiples: List[int] = field(default_factory=lambda: [1, 2, 4, 8])  # window lengths, in training contexts
    windows: int = 16  # windows scored per multiple (the same text for every multiple)
    batch_size: int = 4  # windows per forward

    def __post_init__(self):
        for key in ("windows", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"length.{key}={getattr(self, key)} must be at least 1")
        if not self.multiples or any(m < 1 for m in self.multiples):
            raise UserError(f"length.multiples={list(self.multiples)}: give whole multiples of the training context, "
                            "each at least 1 (e.g. [1,2,4,8])")
        self.multiples = sorted(set(int(m) for m in self.multiples))


def buckets(multiples: list[int], ctx: int) -> list[tuple[int, int]]:
    """[lo, hi): the positions (where a prediction is made) each multiple adds: from the previous multiple's
    end, the first multiple from its half."""
    out, prev = [], None
    for m in multiples:
        hi = m * ctx
        out.append((hi // 2 if prev is None else prev, hi))
        prev = hi
    return out


def why_not(model_cfg, length: int) -> tuple[str, str] | None:
    """(short, full) reason the model cannot run `length` tokens, or None: it can."""
    if model_cfg.positions == "learned" and length > model_cfg.max_seq_len:
        return ("skipped",
                f"learned positions have no embedding past max_seq_len={model_cfg.max_seq_len} "
                f"(positions {model_cfg.max_seq_len}..{length - 1} would need one)")
    return None


def window_starts(n_tokens: int, longest: int, windows: int) -> list[int]:
    """Start offsets of up to `windows` windows spread evenly over the val split (its texts differ),
    on slots of the longest window, so every multiple reads the same text: min(windows, slots)
    distinct slots; a split too short for one longest window: slot 0 only."""
    slots = max(1, (n_tokens - 1) // longest)
    n = min(windows, slots)
    return [(k * slots // n) * longest for k in range(n)]


def check_causal(target) -> None:
    from lmtk.objectives import ENCODER_OBJECTIVES  # trained without a causal reading (mlm, rts)

    if target.objective in ENCODER_OBJECTIVES:
        raise UserError(f"suite=length scores left-to-right loss by position, but run {target.name} was trained with "
                        f"objective={target.objective} (an encoder: no causal reading); evaluate a clm, hybrid or gpt-bert run")


@torch.no_grad()
def position_nll(model, ids: np.ndarray, device, dtype, batch_size: int, progress=None) -> np.ndarray:
    """[N, L - 1] nats of token p + 1 given tokens 0..p (the prediction at position p), for each window (row) of ids [N, L]; the
    head runs on one window's positions at a time (no [B, L, vocab] tensor)."""
    from lmtk.device import autocast

    out = []
    for i in range(0, len(ids), batch_size):
        x = torch.as_tensor(np.asarray(ids[i:i + batch_size], dtype=np.int64), device=device)
        with autocast(device, dtype):
            h = model.hidden(x[:, :-1], causal=True)
        for b in range(len(x)):
            logits = model.logits(h[b]).float()
            out.append(F.cross_entropy(logits, x[b, 1:], reduction="none").cpu().numpy())
        if progress is not None:
            progress(len(x))
    return np.stack(out)


def run(target, cfg: Config) -> dict:
    from lmtk.data.packing import TokenCache
    from lmtk.data.sources import Source
    from lmtk.log import Progress

    check_causal(target)
    rc = target.run_cfg
    if rc is None:
        raise UserError(f"{target.checkpoint} has no config.yaml, so its training context and val data are unknown; "
                        "evaluate the run (or a checkpoint inside it)")
    ctx = int(rc.data.seq_len)
    val = TokenCache(Source(rc.data), target.tokenizer, ctx).val
    longest = max(cfg.multiples) * ctx
    starts_all = window_starts(len(val), longest, cfg.windows)
    model = target.model
    model.eval()
    rows, scored, skipped, n_tokens = [], {}, [], 0
    ref = None
    for m, (lo, hi) in zip(cfg.multiples, buckets(cfg.multiples, ctx)):
        L = m * ctx
        row = {"multiple": f"{m}x", "length": L, "positions": f"{lo}-{hi - 1}"}
        reason = why_not(target.model_cfg, L)
        starts = [s for s in starts_all if s + L + 1 <= len(val)]
        if reason is None and not starts:
            reason = ("skipped", f"the val split ({len(val):,} tokens) holds no window of {L + 1} tokens")
        if reason is not None:
            rows.append({**row, "loss": None, "vs 1x": None, "window loss": None, "windows": 0, "note": reason[0]})
            skipped.append((m, reason[1]))
            continue
        ids = np.stack([np.asarray(val[s:s + L + 1]) for s in starts])  # L + 1 tokens: L predictions
        with Progress(f"length {m}x ({L} tokens)", len(ids), "windows") as progress:
            nll = position_nll(model, ids, target.device, target.dtype or torch.float32, cfg.batch_size, progress)
        # column p: the prediction made at position p (of the token at p + 1), p = 0..L-1
        loss = float(nll[:, lo:hi].mean())
        ref = loss if ref is None else ref
        rows.append({**row, "loss": loss, "vs 1x": loss - ref, "window loss": float(nll.mean()), "windows": len(ids),
                     "note": "" if L <= ctx else "extrapolated"})
        scored[m] = loss
        n_tokens += nll.size
    if not scored:
        raise UserError(f"suite=length scored nothing for {target.name}: " + "; ".join(f"{m}x: {r}" for m, r in skipped))
    top = max(scored)
    scores = {f"loss_{top}x": scored[top], **{f"loss_{m}x": v for m, v in scored.items() if m != top}}
    notes = [f"windows of m x {ctx} tokens (the training context) spread over the run's val split, up to {cfg.windows} per "
             f"multiple, the same text for every multiple; loss at the positions each multiple adds, and over the whole window"]
    if skipped:
        notes.append("not scored: " + "; ".join(f"{m}x: {r}" for m, r in skipped))
    return {"scores": scores, "samples": n_tokens, "rows": rows, "notes": notes}

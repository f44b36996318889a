"""Scoring texts with a trained model: the log-likelihood primitives every eval suite (and the
lm-evaluation-harness adapter) builds on.

- continuation_logprobs: log p(continuation | context) and whether it is the greedy reading
  (multiple choice, BLiMP pairs, lm-eval's `loglikelihood`);
- rolling_logprob(s): a whole text's log-likelihood with a sliding window (perplexity of long
  documents, lm-eval's `loglikelihood_rolling`);
- pseudo_log_likelihoods: masked models' PLL (one position masked at a time).

Texts of unequal length are scored in batches padded on the right with an attention_mask
(True at real tokens; `LanguageModel.hidden(..., attention_mask=)`), sorted by length so a
batch wastes little on padding; every real token's output equals the unpadded text's
(tests/test_padding.py). The head runs only on the positions that are scored, CHUNK_ROWS of
them at a time: memory for the logits is one [CHUNK_ROWS, vocab] float32 buffer, never a
[B, T, vocab] tensor.

"BOS" in lmtk: lmtk's tokenizers have no beginning-of-text token; training streams put [SEP]
(`tok.eos_id`) after every document, so in training a document always starts right after a
[SEP]. Scorers that need a context for a text's first token use [SEP] for it (the caller
passes it: `[tok.eos_id]` as the context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtk.device import autocast
from lmtk.log import Progress

CHUNK_ROWS = 512  # scored positions per head call: one [CHUNK_ROWS, vocab] float32 buffer


def _where(model, device, dtype) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return torch.device(device) if device is not None else p.device, dtype or torch.float32


def _head_logprobs(model, h: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N] float64, target is the argmax [N] bool) for hidden rows h [N, d], the
    head run `chunk` rows at a time in float32."""
    chunk = chunk or CHUNK_ROWS
    wdtype = next(model.parameters()).dtype  # h may be autocast's bf16/fp16: the head runs in the weights' dtype
    logp, greedy = [], []
    for s in range(0, h.shape[0], chunk):
        logits = model.logits(h[s : s + chunk].to(wdtype)).float()
        t = targets[s : s + chunk]
        lp = F.log_softmax(logits, dim=-1)
        logp.append(lp.gather(-1, t[:, None]).squeeze(-1).double())
        greedy.append(logits.argmax(-1) == t)
        del logits, lp
    if not logp:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logp).cpu(), torch.cat(greedy).cpu()


def _padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _causal_scores(model, seqs: list[list[int]], starts: list[int], batch_size: int, device, dtype) -> list[tuple[float, bool, int]]:
    """For each sequence s and start j >= 1: (sum over t in j..len(s)-1 of log p(s[t] | s[:t]),
    every such s[t] the argmax, how many were scored), in one causal pass per padded batch."""
    dev, dt = _where(model, device, dtype)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list = [None] * len(seqs)
    with Progress("scoring (causal)", len(seqs), "sequences") as progress:
        for b in range(0, len(order), batch_size):
            _causal_batch(model, seqs, starts, order[b : b + batch_size], out, dev, dt)
            progress(len(order[b : b + batch_size]))
    return out


def _causal_batch(model, seqs, starts, idx: list[int], out: list, dev, dt) -> None:
    """One padded batch of _causal_scores: out[i] for each i in idx."""
    batch = [seqs[i] for i in idx]
    ids, mask = _padded(batch, dev)
    with autocast(dev, dt):
        h = model.hidden(ids, causal=True, attention_mask=mask)
    rows, cols, tgt, owner = [], [], [], []
    for r, i in enumerate(idx):
        n = len(seqs[i])
        for t in range(starts[i], n):  # the output at t - 1 predicts token t
            rows.append(r)
            cols.append(t - 1)
            tgt.append(seqs[i][t])
            owner.append(i)
    sel = h[torch.tensor(rows, device=dev, dtype=torch.long), torch.tensor(cols, device=dev, dtype=torch.long)]
    logp, greedy = _head_logprobs(model, sel, torch.tensor(tgt, device=dev, dtype=torch.long))
    acc = {i: [0.0, True, 0] for i in idx}
    for k, i in enumerate(owner):
        a = acc[i]
        a[0] += float(logp[k])
        a[1] = a[1] and bool(greedy[k])
        a[2] += 1
    for i in idx:
        out[i] = tuple(acc[i])


def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16, device=None,
                          dtype=None, max_len: int | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context) in nats,
    whether every continuation token is the model's argmax given what precedes it).

    The context must not be empty (the first continuation token needs something before it: pass
    `[tok.eos_id]`, lmtk's document boundary, for "no context"). A context longer than the model
    can see is cut from the left: context + continuation keeps its last `max_len` tokens
    (default model.cfg.max_seq_len), so the continuation is scored with as much of the context
    as fits. A continuation that does not fit max_len - 1 tokens is an error. Requests are
    batched by length, right-padded with an attention_mask; the result is in request order.
    `dtype` is the autocast dtype (None: float32); the head is always float32."""
    max_len = max_len or model.cfg.max_seq_len
    seqs, starts = [], []
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("continuation_logprobs needs a non-empty context (use [tok.eos_id] for none)")
        if len(cont) > max_len - 1:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_len={max_len} with a context token")
        full = (list(ctx) + list(cont))[-max_len:]
        seqs.append(full)
        starts.append(len(full) - len(cont))
    if not seqs:
        return []
    return [(s, g) for s, g, _ in _causal_scores(model, seqs, starts, batch_size, device, dtype)]


def rolling_windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(window start a, window end m, first scored position e) covering tokens 1..n-1 of a text of
    n tokens: window ids[a:m] scores positions e..m-1, each position exactly once. The first
    window is ids[0:max_len]; each later one scores the next `stride` positions, the first of
    them with at least max_len - stride tokens of context."""
    if n < 2:
        return []
    m = min(n, max_len)
    out = [(0, m, 1)]
    while m < n:
        e, m = m, min(n, m + stride)
        out.append((max(0, m - max_len), m, e))
    return out


def rolling_logprob(model, ids: list[int], *, stride: int | None = None, batch_size: int = 16, device=None,
                    dtype=None, max_len: int | None = None) -> tuple[float, int]:
    """(sum of log p(ids[t] | ids[:t]) over t = 1..len(ids)-1 in nats, number of tokens scored).

    ids[0] is context only (pass [SEP] first: `[tok.eos_id] + ids`). A text longer than
    `max_len` (default model.cfg.max_seq_len) is read with a sliding window: the first window
    scores tokens 1..max_len-1, each later window the next `stride` tokens (default max_len // 2)
    with the max_len - stride (or more) tokens before them as context; every token is scored
    once, with up to max_len - 1 tokens of context. stride = max_len - 1 is disjoint windows
    (cheapest; the first token of each has one token of context)."""
    return rolling_logprobs(model, [ids], stride=stride, batch_size=batch_size, device=device, dtype=dtype,
                            max_len=max_len)[0]


def rolling_logprobs(model, texts: list[list[int]], *, stride: int | None = None, batch_size: int = 16, device=None,
                     dtype=None, max_len: int | None = None) -> list[tuple[float, int]]:
    """rolling_logprob of each text, the windows of all texts batched together."""
    max_len = max_len or model.cfg.max_seq_len
    stride = stride or max(1, max_len // 2)
    if not 1 <= stride <= max_len - 1:
        raise ValueError(f"stride={stride} must be in 1..max_len-1={max_len - 1}")
    seqs, starts, owner = [], [], []
    for i, ids in enumerate(texts):
        for a, m, e in rolling_windows(len(ids), max_len, stride):
            seqs.append(list(ids[a:m]))
            starts.append(e - a)
            owner.append(i)
    out = [[0.0, 0] for _ in texts]
    if seqs:
        for i, (s, _, n) in zip(owner, _causal_scores(model, seqs, starts, batch_size, device, dtype)):
            out[i][0] += s
            out[i][1] += n
    return [(s, n) for s, n in out]


@torch.no_grad()
def pseudo_log_likelihoods(model, seqs: list[list[int]], *, mask_id: int, shift: int = 0, batch_size: int = 64,
                           device=None, dtype=None, first: int = 0) -> list[float]:
    """Pseudo-log-likelihood of each sequence (Salazar et al. 2020): the sum over positions p of
    log p(x_p | the sequence with x_p replaced by mask_id), from a bidirectional pass in which
    the output at p - shift predicts token p (`shift`: checkpoint.masked_shift; 0 BERT's MLM,
    1 GPT-BERT). Positions p >= max(shift, first) are scored (`first` skips a leading [SEP]).

    One row per (sequence, masked position), batched across positions and sequences (rows of
    similar length together), right-padded with an attention_mask; the head runs on the masked
    rows only. Equals the one-at-a-time reference (tests/test_scoring.py)."""
    dev, dt = _where(model, device, dtype)
    start = max(shift, first)
    items = [(i, p) for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])) for p in range(start, len(seqs[i]))]
    totals = [0.0] * len(seqs)
    with Progress("scoring (pseudo-log-likelihood)", len(items), "masked positions") as progress:
        for b in range(0, len(items), batch_size):
            _pll_batch(model, seqs, items[b : b + batch_size], totals, mask_id, shift, dev, dt)
            progress(len(items[b : b + batch_size]))
    return totals


def _pll_batch(model, seqs, chunk: list, totals: list, mask_id: int, shift: int, dev, dt) -> None:
    """One batch of pseudo_log_likelihoods' (sequence, masked position) rows, added into totals."""
    rows = []
    for i, p in chunk:
        x = list(seqs[i])
        x[p] = mask_id
        rows.append(x)
    ids, mask = _padded(rows, dev)
    with autocast(dev, dt):
        h = model.hidden(ids, causal=False, attention_mask=mask)
    r = torch.arange(len(chunk), device=dev)
    pos = torch.tensor([p - shift for _, p in chunk], device=dev, dtype=torch.long)
    tgt = torch.tensor([seqs[i][p] for i, p in chunk], device=dev, dtype=torch.long)
    logp, _ = _head_logprobs(model, h[r, pos], tgt)
    for k, (i, _) in enumerate(chunk):
        totals[i] += float(logp[k])

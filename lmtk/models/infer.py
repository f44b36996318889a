"""Using a trained model both ways: as a causal LM (log-probs, generation) and as a masked
LM (fill-mask, pseudo-log-likelihood). `shift` is the masked-prediction convention of the
objective it was trained with: 0 for BERT-style MLM, 1 for GPT-BERT's masked next-token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def causal_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1, shape [B, T-1]."""
    logp = F.log_softmax(model(ids, causal=True)[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           gen: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B, 1] from last-position logits [B, V]: greedy at temperature 0, else from
    the softmax at `temperature`, kept to the top_k most likely and to the smallest set whose
    probability reaches top_p (nucleus sampling)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens whose predecessors already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=gen)


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new: int, temperature: float = 1.0, top_k: int | None = None,
             gen: torch.Generator | None = None, max_len: int | None = None, top_p: float | None = None,
             stop=None) -> torch.Tensor:
    """Sample max_new tokens after ids ([B, T]) with incremental decoding: the prompt is one
    forward (prefill) that fills the model's cache (KV cache / recurrent state), then each new
    token is one step on it. Past max_len tokens the model sees the last max_len (a sliding
    window: the cache is rebuilt from them every step). `stop(ids) -> bool`, called after each
    new token with the ids so far, ends generation early when it returns True (every row done:
    stop strings, end of text); the result is then shorter than T + max_new."""
    max_len = max_len or model.cfg.max_seq_len
    cache = model.new_cache()
    logits = model(ids[:, -max_len:], causal=True, cache=cache)[:, -1]
    for _ in range(max_new):
        nxt = sample(logits, temperature, top_k, top_p, gen)
        ids = torch.cat([ids, nxt], dim=1)
        if stop is not None and stop(ids):
            break
        if cache.offset + 1 <= max_len:
            logits = model(nxt, causal=True, cache=cache)[:, -1]
        else:
            cache = model.new_cache()
            logits = model(ids[:, -max_len:], causal=True, cache=cache)[:, -1]
    return ids


@torch.no_grad()
def masked_logits(model, ids: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Logits predicting the token at every position p from a bidirectional pass: [B, T, V].
    With shift=1, position 0 has no prediction and gets -inf."""
    logits = model(ids, causal=False).float()
    if shift:
        pad = torch.full_like(logits[:, :shift], float("-inf"))
        logits = torch.cat([pad, logits[:, :-shift]], dim=1)
    return logits


@torch.no_grad()
def fill_mask(model, ids: torch.Tensor, mask_id: int, shift: int = 0) -> torch.Tensor:
    """ids with every mask_id replaced by the model's most likely token."""
    pred = masked_logits(model, ids, shift).argmax(-1)
    return torch.where(ids == mask_id, pred, ids)


def pseudo_log_likelihood(model, ids: torch.Tensor, mask_id: int, shift: int = 0, batch: int = 64) -> torch.Tensor:
    """Sum over positions of log p(x_p | x_without_p) (Salazar et al. 2020), one row per sequence [B].
    Positions that cannot be predicted under the convention (p < shift) are skipped. Batched
    across positions and sequences by lmtk.eval.scoring.pseudo_log_likelihoods."""
    from lmtk.eval.scoring import pseudo_log_likelihoods

    return torch.tensor(pseudo_log_likelihoods(model, ids.tolist(), mask_id=mask_id, shift=shift, batch_size=batch,
                                               device=ids.device), dtype=torch.float32)

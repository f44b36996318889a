"""ppl: token loss, perplexity and bits-per-byte on held-out text, at a fixed token budget.

Bits-per-byte is total NLL / (ln 2 x the real UTF-8 bytes of the text scored), whatever the
tokenizer (each token charged the bytes from the end of the previous one to its own end:
Tokenizer.encode_stream(with_bytes=True)), so runs with different tokenizers compare.

Two sources of text:

- default, the run's own val split: the run's data and tokenizer cache are rebuilt from its
  config.yaml (as `lmtk train` builds them: the same TokenCache), and lmtk.eval.lm.validate
  scores the first `tokens` tokens in windows of data.seq_len, with the run's batch size and
  validation seed: exactly the val/* numbers training logged for that checkpoint (one code
  path; tests/test_eval.py). Both readings, causal (clm_*) and masked (mlm_*), as validation.
- data=text data.val=FILE (or data=hf ...): the file's documents, tokenised with the run's
  tokenizer, each followed by [SEP] as in training streams, up to `tokens` tokens. Causal
  models are scored per document with a sliding window (each token once, after the [SEP]
  before it, with up to `window` - 1 tokens of context, `stride` new tokens per window): the
  headline. Validation's reading (packed windows of `window` tokens, documents back to back,
  the first token of each window unscored and windows without context from the one before) is
  reported beside it as clm_* / mlm_*, so a file's numbers compare with a run's val/*; the
  sliding window gives every token more context, so its loss is a little lower.

Masked models (objective mlm) headline their masked reading (val.mask_rate of the tokens
masked, at a fixed seed); `pll=true` adds the pseudo-log-likelihood of the first `pll_tokens`
tokens' windows (every position masked in turn). Models whose mixer reads left to right only
report the causal reading and say so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lmtk.errors import UserError

FILE_TOKENS = 65536  # token budget for a checkpoint without a run config (no val.tokens to copy)


@dataclass
class Config:
    tokens: Optional[int] = None  # token budget; null: the run's val.tokens
    batch_size: Optional[int] = None  # windows per forward; null: the run's train.micro_batch_size
    window: Optional[int] = None  # context of the sliding window over file documents; null: the run's data.seq_len
    stride: Optional[int] = None  # new tokens per sliding window; null: half the window
    pll: bool = False  # also pseudo-log-likelihood (masked readings)
    pll_tokens: int = 2048  # token budget of the PLL reading
    data: Optional[Any] = None  # set from the command's data group (data=text data.val=FILE)


def _score_rows(m: dict) -> list[dict]:
    rows = []
    for name, label in (("clm", "causal (packed windows)"), ("mlm", "masked (packed windows)")):
        if f"val/{name}_loss" in m:
            loss = m[f"val/{name}_loss"]
            rows.append({"reading": label, "loss": loss, "ppl": math.exp(min(loss, 700)),
                         "bpb": m.get(f"val/{name}_bpb", float("nan"))})
    return rows


def run(target, cfg: Config) -> dict:
    from lmtk.eval.lm import readings, val_seed, validate
    from lmtk.objectives import build_objective

    rc, tok, model = target.run_cfg, target.tokenizer, target.model
    if cfg.pll and target.causal_only:
        raise UserError(f"ppl.pll=true needs a masked (bidirectional) reading, which {target.name} "
                        f"({target.describe_mixer()}) cannot give (it reads left to right); drop ppl.pll")
    if cfg.data is None and rc is None:
        raise UserError(f"{target.checkpoint} has no config.yaml, so its val data is unknown; "
                        "score a file instead: data=text data.val=FILE")
    notes = []
    obj_cfg = rc.objective if rc is not None else {"name": target.objective or "clm"}
    mask_rate = rc.val.mask_rate if rc is not None else 0.15
    objective = build_objective(_ns(obj_cfg), tok)
    objs, note = readings(objective, mask_rate, model)
    if note:
        notes.append(note)
    batch_size = cfg.batch_size or (rc.train.micro_batch_size if rc is not None else 16)
    if cfg.data is None:
        from lmtk.data.packing import Batches, TokenCache
        from lmtk.data.sources import Source

        seq_len = rc.data.seq_len
        cache = TokenCache(Source(rc.data), tok, seq_len)
        data = Batches(cache.val, seq_len, rc.seed, nbytes=cache.val_bytes)
        tokens = cfg.tokens or rc.val.tokens
        seed = val_seed(rc)
        m = validate(model, objs, data, main=objective.val_key, tokens=tokens, batch_size=batch_size,
                     device=target.device, dtype=target.dtype, seed=seed)
        n_win = max(1, min(data.n, tokens // seq_len))
        scores = {"bpb": m["val/bpb"], "loss": m["val/loss"], "ppl": math.exp(min(m["val/loss"], 700))}
        scores.update({k[4:]: v for k, v in m.items() if k not in ("val/loss", "val/bpb")})
        notes.append(f"the run's val split: {n_win} windows of {seq_len} tokens, validation's seed {seed}")
        samples, rows = n_win * seq_len, _score_rows(m)
    else:
        data, scores, samples, rows, seed = _file(target, cfg, objs, objective, batch_size, notes)
    if cfg.pll:
        scores.update(_pll(target, data, cfg, notes))
    return {"scores": scores, "samples": samples, "rows": rows, "notes": notes, "seed": seed}


def check(cfg: Config) -> None:
    """Before any model loads: a data=... source that cannot be read."""
    if cfg.data is not None:
        _documents(None, cfg)  # the Source checks its files (missing, no match) when it is built


def _ns(d):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    if OmegaConf.is_config(d):
        return d
    base = {"mask_rate": 0.15, "mask_token_frac": 0.8, "random_token_frac": 0.1, "fused_head": False}
    return SimpleNamespace(**{**base, **dict(d)})  # a checkpoint without config.yaml: the objective's name only


def _documents(target, cfg: Config):
    from omegaconf import OmegaConf

    from lmtk.data.sources import Source

    d = OmegaConf.to_container(cfg.data, resolve=False) if OmegaConf.is_config(cfg.data) else dict(cfg.data)
    if d.get("source") == "text":
        if d.get("val") in (None, "???"):
            raise UserError("data=text needs data.val=FILE: the text to score (a file, glob or directory)")
        d["train"] = d["val"]  # the source's train split is never read here
    if d.get("source") == "hf" and not d.get("val_split"):
        d["val_split"] = d.get("split") or "train"
    if d.get("train") == "???":
        d["train"] = None
    return Source(OmegaConf.create(d)).documents("val")


def _file(target, cfg, objs, objective, batch_size, notes):
    from lmtk.data.packing import Batches
    from lmtk.eval.lm import validate
    from lmtk.eval.scoring import rolling_logprobs

    rc, tok, model = target.run_cfg, target.tokenizer, target.model
    budget = cfg.tokens or (rc.val.tokens if rc is not None else FILE_TOKENS)
    window = min(cfg.window or (rc.data.seq_len if rc is not None else model.cfg.max_seq_len), model.cfg.max_seq_len)
    docs_ids, docs_bytes, total = [], [], 0
    for doc in _documents(target, cfg):
        ids, nb = tok.encode_stream([doc], with_bytes=True)  # the document, then [SEP] (its trailing bytes)
        take = min(len(ids), budget - total)
        docs_ids.append(np.asarray(ids[:take], dtype=np.int64))
        docs_bytes.append(np.asarray(nb[:take], dtype=np.int64))
        total += take
        if total >= budget:
            break
    if total < 2:
        raise UserError("the data to score is empty (no text after reading); check data.val")
    stream, nbytes = np.concatenate(docs_ids), np.concatenate(docs_bytes)
    L = min(window, len(stream))
    packed = Batches(stream, L, target.seed, nbytes=nbytes)
    m = validate(model, objs, packed, main=objective.val_key, tokens=len(stream), batch_size=batch_size,
                 device=target.device, dtype=target.dtype, seed=target.seed)
    rows = _score_rows(m)
    scores = {}
    if not target.masked:
        texts = [[tok.eos_id] + ids.tolist() for ids in docs_ids]
        per_doc = rolling_logprobs(model, texts, stride=cfg.stride, batch_size=batch_size, device=target.device,
                                   dtype=target.dtype, max_len=max(2, window))
        nats = -sum(s for s, _ in per_doc)
        n = sum(k for _, k in per_doc)
        nb = int(nbytes.sum())
        loss, bpb = nats / max(1, n), nats / math.log(2) / max(1, nb)
        scores = {"bpb": bpb, "loss": loss, "ppl": math.exp(min(loss, 700))}
        rows.insert(0, {"reading": "causal (documents, sliding window)", "loss": loss, "ppl": scores["ppl"], "bpb": bpb})
        notes.append(f"{len(docs_ids)} documents, {n:,} tokens, {nb:,} bytes; sliding window of {window} tokens, "
                     f"stride {cfg.stride or max(1, window // 2)}")
        samples = n
    else:
        main = objective.val_key
        scores = {"bpb": m[f"val/{main}_bpb"], "loss": m[f"val/{main}_loss"], "ppl": math.exp(min(m[f"val/{main}_loss"], 700))}
        notes.append(f"masked model: the headline is the masked reading of {len(stream):,} tokens at seed {target.seed}")
        samples = packed.n * L
    scores.update({k[4:]: v for k, v in m.items() if k not in ("val/loss", "val/bpb")})
    return packed, scores, samples, rows, target.seed


def _pll(target, data, cfg, notes) -> dict:
    """pll_loss / pll_bpb: pseudo-log-likelihood of the first windows of `data` (Batches)."""
    from lmtk.eval.scoring import pseudo_log_likelihoods

    shift, tok = target.masked_shift, target.tokenizer
    nats, n, nb = 0.0, 0, 0
    for ids, nbytes in itertools.islice(data.ordered(cfg.pll_tokens, 1), max(1, cfg.pll_tokens // data.seq_len)):
        seqs = ids.tolist()
        nats -= sum(pseudo_log_likelihoods(target.model, seqs, mask_id=tok.mask_id, shift=shift, batch_size=64,
                                           device=target.device, dtype=target.dtype))
        n += sum(len(s) - shift for s in seqs)
        if nbytes is not None:
            nb += int(nbytes[:, shift:].sum())
    notes.append(f"pll: {n:,} tokens, each masked in turn (masked_shift {shift})")
    return {"pll_loss": nats / max(1, n), "pll_bpb": nats / math.log(2) / max(1, nb)}

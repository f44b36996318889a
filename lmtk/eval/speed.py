"""suite=speed: what a run's model costs on this machine.

Training tokens/s and (on CUDA) MFU come from the one training loop itself: a copy of the
model trains through train.loop.fit on random tokens (no run directory, no checkpoints) for
2 x train_steps steps, and the loop's own meter reads the second half (the first is warm-up:
allocation, autotuning). FLOPs per token are the model's (LanguageModel.flops_per_token: 6 x
matmul parameters plus each mixer's flops_per_token) and MFU the loop's formula against
lmtk.device.PEAK_TFLOPS. Inference tokens/s is a full causal forward (prefill) of a batch;
decoding ms/token is one cached step (models.infer's cache) after a context of C tokens.
Peak memory is the loop's reading (CUDA: max allocated; CPU: the process's peak RSS).
Contexts past the model's max_seq_len are reported as such, not measured. Nothing is
asserted about the figures: they describe this machine, now.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lmtk.errors import UserError


@dataclass
class Config:
    seq_len: Optional[int] = None  # training and prefill length (null: the model's max_seq_len, at most 1024)
    batch_size: int = 8  # sequences per training step and per prefill
    train_steps: int = 10  # timed training steps (as many again warm up first)
    prefill_repeats: int = 3  # timed prefill forwards (after one warm-up)
    contexts: List[int] = field(default_factory=lambda: [128, 512, 1024])  # decoding: ms/token after this many tokens
    decode_tokens: int = 16  # timed decoding steps per context
    lr: float = 1e-4  # of the throw-away training copy (the numbers do not depend on it)

    def __post_init__(self):
        for key in ("batch_size", "train_steps", "prefill_repeats", "decode_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"speed.{key}={getattr(self, key)} must be at least 1")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"speed.seq_len={self.seq_len} must be at least 2")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Capture:
    """A sink keeping the loop's log rows."""

    def __init__(self):
        self.rows = []

    def log(self, metrics: dict, step: int) -> None:
        self.rows.append(dict(metrics))

    def close(self) -> None:
        pass


def train_speed(target, cfg: Config, seq_len: int) -> dict:
    """{train_tok_s, mfu (when the GPU's peak is known), peak_mem_gib} from fit() on a copy of the model."""
    from omegaconf import OmegaConf

    from lmtk.data.synthetic import RandomTokens
    from lmtk.log import Sinks, null_sinks
    from lmtk.objectives import CLM
    from lmtk.schema import Config as Schema
    from lmtk.train.loop import Job, fit

    c = OmegaConf.structured(Schema)
    c.seed = target.seed
    c.data.seq_len = seq_len
    c.budget.steps = 2 * cfg.train_steps
    c.train.batch_size = c.train.micro_batch_size = cfg.batch_size
    c.train.lr = cfg.lr
    c.val.at_start, c.val.every = False, 0
    c.checkpoint.every = 0
    c.logger.every = cfg.train_steps  # two rows: warm-up, then the timed steps
    model = copy.deepcopy(target.model)
    capture = _Capture()
    sinks = Sinks([capture], null_sinks().console)
    if target.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target.device)
    job = Job(cfg=c, model=model, objective=CLM(None, target.tokenizer), train_data=RandomTokens(target.model_cfg.vocab_size, seq_len, target.seed),
              val_data=None, val_objectives={}, run=None, sinks=sinks, device=target.device,
              dtype=target.dtype or torch.float32, checkpoints=False)
    summary = fit(job)
    timed = capture.rows[-1]
    out = {"train_tok_s": timed["tok/s"], "peak_mem_gib": summary["peak_mem_gib"]}
    if "mfu" in timed:
        out["mfu"] = timed["mfu"]
    del model, job
    return out


@torch.no_grad()
def prefill_speed(target, cfg: Config, seq_len: int) -> float:
    """Tokens/s of a causal forward of batch_size x seq_len (logits included)."""
    from lmtk.device import autocast

    model, dev = target.model, target.device
    ids = torch.randint(5, target.model_cfg.vocab_size, (cfg.batch_size, seq_len), device=dev)
    with autocast(dev, target.dtype or torch.float32):
        model(ids)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(cfg.prefill_repeats):
            model(ids)
        _sync(dev)
    return cfg.batch_size * seq_len * cfg.prefill_repeats / (time.perf_counter() - t0)


@torch.no_grad()
def decode_ms(target, context: int, steps: int) -> float:
    """ms per generated token (batch 1) after a prefilled context of `context` tokens."""
    from lmtk.device import autocast

    model, dev = target.model, target.device
    ids = torch.randint(5, target.model_cfg.vocab_size, (1, context), device=dev)
    nxt = ids[:, -1:]
    with autocast(dev, target.dtype or torch.float32):
        cache = model.new_cache()
        model(ids, cache=cache)
        model(nxt, cache=cache)  # one untimed step
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(nxt, cache=cache)
            nxt = logits[:, -1:].argmax(-1)
        _sync(dev)
    return 1000 * (time.perf_counter() - t0) / steps


def run(target, cfg: Config) -> dict:
    model, mc = target.model, target.model_cfg
    seq_len = cfg.seq_len or min(mc.max_seq_len, 1024)
    if seq_len > mc.max_seq_len:
        raise UserError(f"speed.seq_len={seq_len} is past the model's context (max_seq_len {mc.max_seq_len}); "
                        f"use at most {mc.max_seq_len}")
    model.eval()
    flops = model.flops_per_token(seq_len)
    scores = train_speed(target, cfg, seq_len)
    scores = {"train_tok_s": scores.pop("train_tok_s"), "infer_tok_s": prefill_speed(target, cfg, seq_len), **scores}
    rows, past = [], []
    for C in cfg.contexts:
        if C + 1 + cfg.decode_tokens > mc.max_seq_len:
            past.append(C)
            rows.append({"context": C, "decode_ms_per_token": None, "note": f"past the context ({mc.max_seq_len}): not measured"})
            continue
        ms = decode_ms(target, C, cfg.decode_tokens)
        scores[f"decode_ms@{C}"] = ms
        rows.append({"context": C, "decode_ms_per_token": ms, "note": ""})
    scores.update(params=float(model.num_params()), params_non_embedding=float(model.num_params(embeddings=False)),
                  params_active=float(model.num_params(active=True)),  # an MoE's router and routed experts only
                  train_flops_per_token=float(flops))
    dev = torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else "cpu"
    notes = [f"{dev}, {str(target.dtype or torch.float32).replace('torch.', '')}; training and prefill at "
             f"{cfg.batch_size} x {seq_len}, {cfg.train_steps} timed training steps after as many warm-up ones; "
             f"decoding at batch 1, {cfg.decode_tokens} steps per context"]
    if "mfu" not in scores:
        notes.append("no MFU: " + ("on a CPU" if target.device.type != "cuda" else "this GPU is not in lmtk.device.PEAK_TFLOPS"))
    if past:
        notes.append(f"decoding contexts past the model's context ({mc.max_seq_len} tokens): {', '.join(map(str, past))} (reported, not measured)")
    return {"scores": scores, "samples": cfg.batch_size * seq_len * cfg.train_steps, "rows": rows, "notes": notes}

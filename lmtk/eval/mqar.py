"""suite=mqar: multi-query associative recall (Zoology, Arora et al. 2023) on the run's architecture.

For each (sequence length, key-value pairs) cell of a grid, a fresh model of the run's
config (d_model, layers, mixer and the rest kept; vocab_size the task's, max_seq_len the
cell's length) is trained on MQAR made on the fly (lmtk.data.synthetic) through the one
training loop (train.loop.fit, objectives.Labelled: the loss on the query positions only),
then scored on held-out sequences: the share of queries whose value it predicts (greedy).
Nothing is written: fit runs without a run directory or checkpoints. Recall is what tells
attention from fixed-state recurrent mixers apart, and how a bigger state buys it back.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from lmtk.data.synthetic import MQARData, mqar, mqar_fits
from lmtk.errors import UserError
from lmtk.schema import CHOICES

# grid presets: sequence lengths x key-value pairs (cells with kv > seq/4 are left out), the
# task's vocabulary and the training steps per cell
GRIDS = {
    # CPU-sized: minutes for a 2-layer d 64 model
    "small": dict(seq_lens=[64, 128], kv_pairs=[4, 8, 16], vocab_size=64, steps=400),
    # Zoology's figure-2 range (vocabulary 8192): a GPU's work
    "zoology": dict(seq_lens=[64, 128, 256, 512], kv_pairs=[4, 8, 16, 32, 64], vocab_size=8192, steps=4000),
}


@dataclass
class Config:
    grid: str = "small"  # small | zoology (GRIDS): the cells, vocabulary and steps below when they are null
    seq_lens: Optional[List[int]] = None  # sequence lengths (null: the grid's)
    kv_pairs: Optional[List[int]] = None  # key-value pairs per sequence (null: the grid's); each must fit: kv <= seq/4
    vocab_size: Optional[int] = None  # keys from the lower half, values from the upper half (null: the grid's)
    steps: Optional[int] = None  # optimizer steps per cell (null: the grid's)
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3  # peak learning rate
    schedule: str = "constant"  # constant | cosine | triangle (lmtk's schedules), after the warmup
    warmup: float = 0.5  # share of the steps the lr ramps up over (a slow ramp is what got past the plateau: DESIGN.md)
    weight_decay: float = 0.1
    power_a: float = 0.01  # query gaps: weight (g+1)^(a-1); 1.0 uniform
    random_filler: bool = False  # filler tokens random from the whole vocabulary (Zoology's generator default) instead of 0
    test_sequences: int = 256  # held-out sequences scored per cell
    seed: Optional[int] = None  # null: the eval's seed

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise UserError(f"mqar.grid={self.grid} is not one of: {', '.join(GRIDS)}")
        schedules = CHOICES["schedule.name"]
        if self.schedule not in schedules:
            raise UserError(f"mqar.schedule={self.schedule} is not one of: {', '.join(schedules)}")
        for key in ("batch_size", "test_sequences"):
            if getattr(self, key) < 1:
                raise UserError(f"mqar.{key}={getattr(self, key)} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"mqar.steps={self.steps} must be at least 1")
        cells(self)  # cells that do not fit, a vocabulary too small: before any model is loaded


def cells(cfg: Config) -> tuple[list[tuple[int, int]], int, int, list[str]]:
    """([(seq_len, kv_pairs), ...], vocab_size, steps, notes). A grid preset leaves out the cells
    whose pairs do not fit; lengths and pairs given explicitly must all fit (else a UserError)."""
    g = GRIDS[cfg.grid]
    explicit = cfg.seq_lens is not None or cfg.kv_pairs is not None
    seq_lens = list(cfg.seq_lens if cfg.seq_lens is not None else g["seq_lens"])
    kvs = list(cfg.kv_pairs if cfg.kv_pairs is not None else g["kv_pairs"])
    vocab = cfg.vocab_size if cfg.vocab_size is not None else g["vocab_size"]
    steps = cfg.steps if cfg.steps is not None else g["steps"]
    if not seq_lens or not kvs:
        raise UserError("mqar.seq_lens and mqar.kv_pairs need at least one value each")
    out, notes = [], []
    for L in seq_lens:
        for kv in kvs:
            if mqar_fits(L, kv):
                out.append((L, kv))
            elif explicit:
                raise UserError(f"mqar: kv_pairs={kv} does not fit seq_len={L}: the pairs take {2 * kv} tokens and the "
                                f"queries {2 * kv} more (kv_pairs <= seq_len/4 = {L // 4}); lower mqar.kv_pairs or raise mqar.seq_lens")
    if len(out) < len(seq_lens) * len(kvs):
        notes.append(f"grid {cfg.grid}: {len(seq_lens) * len(kvs) - len(out)} cells with kv_pairs > seq_len/4 left out")
    need = 2 * (max(kv for _, kv in out) + 1)
    if vocab < need:
        raise UserError(f"mqar.vocab_size={vocab} is too small for kv_pairs={max(kv for _, kv in out)}: keys and values "
                        f"take half the vocabulary each, so it needs at least {need}")
    return out, vocab, steps, notes


def train_config(cfg: Config, seq_len: int, steps: int, seed: int):
    """The loop's config for one cell: lmtk's schema with this suite's knobs; no validation, no
    checkpoints; null sinks take the log rows."""
    from omegaconf import OmegaConf

    from lmtk.schema import Config as Schema

    c = OmegaConf.structured(Schema)
    c.seed = seed
    c.data.seq_len = seq_len
    c.budget.steps = steps
    c.train.batch_size = c.train.micro_batch_size = cfg.batch_size
    c.train.lr = cfg.lr
    c.schedule.name, c.schedule.warmup = cfg.schedule, cfg.warmup
    c.optim.weight_decay = cfg.weight_decay
    c.val.at_start, c.val.every = False, 0
    c.checkpoint.every = 0
    c.logger.every = max(1, steps // 10)  # the summary's train_loss: the mean over the last tenth
    return c


def model_config(target, vocab_size: int, seq_len: int):
    """The run's ModelConfig with the task's vocabulary and the cell's length: width, depth and mixers kept."""
    return dataclasses.replace(target.model_cfg, vocab_size=vocab_size, max_seq_len=seq_len)


@torch.no_grad()
def accuracy(model, objective, inputs: torch.Tensor, targets: torch.Tensor, device, dtype, batch: int = 64) -> float:
    """Share of the query positions whose target the model's most likely next token is."""
    from lmtk.device import autocast

    model.eval()
    correct = total = 0
    for i in range(0, len(inputs), batch):
        b = torch.stack([inputs[i:i + batch], targets[i:i + batch]], dim=1).to(device)
        with autocast(device, dtype):
            h, t = objective.predict(model, b)
            pred = model.logits(h).argmax(-1)
        correct += int((pred == t).sum())
        total += t.numel()
    return correct / total


def train_cell(target, cfg: Config, seq_len: int, kv: int, vocab: int, steps: int, seed: int) -> dict:
    """Train a fresh model of the run's architecture on one cell and score it: a table row."""
    from lmtk.log import null_sinks
    from lmtk.models import build_model
    from lmtk.objectives import Labelled
    from lmtk.train.loop import Job, fit

    mcfg = model_config(target, vocab, seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(mcfg)
    objective = Labelled(kv, seq_len)
    data = dict(seq_len=seq_len, kv_pairs=kv, vocab_size=vocab, power_a=cfg.power_a, random_filler=cfg.random_filler)
    dtype = target.dtype or torch.float32
    job = Job(cfg=train_config(cfg, seq_len, steps, seed), model=model, objective=objective,
              train_data=MQARData(seed=seed, **data), val_data=None, val_objectives={}, run=None, sinks=null_sinks(),
              device=target.device, dtype=dtype, checkpoints=False)
    t0 = time.perf_counter()
    summary = fit(job)
    seconds = time.perf_counter() - t0
    # held out: a seed no training batch uses (those are seed * 1_000_003 + sample index)
    inputs, targets = mqar(cfg.test_sequences, seed=seed * 1_000_003 + 2**45, **data)
    acc = accuracy(model, objective, inputs, targets, target.device, dtype)
    del model, job
    return {"seq_len": seq_len, "kv_pairs": kv, "accuracy": acc, "chance": 1 / (vocab - vocab // 2),
            "steps": summary["steps"], "train_loss": summary.get("train_loss"), "seconds": round(seconds, 1)}


def run(target, cfg: Config) -> dict:
    from lmtk.log import _fmt_eta, console

    grid, vocab, steps, notes = cells(cfg)
    seed = target.seed if cfg.seed is None else cfg.seed
    rows = []
    for k, (L, kv) in enumerate(grid, 1):
        row = train_cell(target, cfg, L, kv, vocab, steps, seed)
        rows.append(row)
        left = sum(r["seconds"] for r in rows) / k * (len(grid) - k)  # the cells so far, per cell
        console.print(f"mqar cell {k}/{len(grid)} seq_len {L} kv_pairs {kv}: accuracy {row['accuracy']:.3f} (chance {row['chance']:.4f}) "
                      f"after {row['steps']} steps, {row['seconds']:.0f} s" + (f"; ETA {_fmt_eta(left)}" if k < len(grid) else ""),
                      markup=False)
    chance = 1 / (vocab - vocab // 2)
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    scores = {"accuracy": mean, "chance": chance, **{f"seq{r['seq_len']}_kv{r['kv_pairs']}": r["accuracy"] for r in rows}}
    notes = [*notes,
             f"vocabulary {vocab} (keys {vocab // 2 - 1}, values {vocab - vocab // 2}); chance {chance:.4f} per query "
             f"(1/kv_pairs for a guess among the sequence's own values); {steps} steps x {cfg.batch_size} per cell, "
             f"fresh weights of the run's model config",
             f"{cfg.test_sequences} held-out sequences per cell, seed {seed}"]
    if any(math.isnan(r["train_loss"] or 0.0) for r in rows):
        notes.append("some cells ended with a non-finite training loss: lower mqar.lr")
    return {"scores": scores, "samples": cfg.test_sequences * len(rows), "rows": rows, "notes": notes, "seed": seed}

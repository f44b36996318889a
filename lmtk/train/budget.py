"""Budgets: steps, tokens, wall-clock hours or epochs; the first one reached ends training."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must restore (besides weights/optimizer)."""

    step: int = 0
    samples: int = 0  # windows consumed: the data position
    tokens: int = 0
    seconds: float = 0.0  # training wall time spent (validation and checkpoints excluded)
    skipped_steps: int = 0
    bad_streak: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Budget:
    def __init__(self, cfg, windows_per_epoch: int):
        self.cfg = cfg
        self.windows = windows_per_epoch

    def fraction(self, s: TrainState) -> float:
        c = self.cfg
        parts = []
        if c.steps is not None:
            parts.append(s.step / c.steps)
        if c.tokens is not None:
            parts.append(s.tokens / c.tokens)
        if c.hours is not None:
            parts.append(s.seconds / (3600 * c.hours))
        if c.epochs is not None:
            parts.append(s.samples / (self.windows * c.epochs))
        return max(parts)

    def describe(self) -> str:
        c = self.cfg
        items = [
            f"{c.steps} steps" if c.steps is not None else None,
            f"{c.tokens:,} tokens" if c.tokens is not None else None,
            f"{c.hours} h" if c.hours is not None else None,
            f"{c.epochs} epochs" if c.epochs is not None else None,
        ]
        return " or ".join(i for i in items if i)


def micro_steps(cfg_train, frac: float, world: int = 1) -> int:
    """Micro-batches per rank in this optimizer step: the batch ramps linearly from one
    micro-batch to the full batch over the first `batch_ramp` of the budget (Cramming's ramp).
    train.batch_size is global: split over `world` data-parallel ranks."""
    full = max(1, cfg_train.batch_size // (cfg_train.micro_batch_size * world))
    if cfg_train.batch_ramp <= 0 or frac >= cfg_train.batch_ramp:
        return full
    return max(1, min(full, 1 + int((full - 1) * frac / cfg_train.batch_ramp)))

"""Learning-rate schedules as functions of the budget fraction used (0..1).

Driving the schedule by the fraction, not the step, is what lets a wall-clock budget
decay the LR to its end without knowing the step count in advance (Cramming)."""

from __future__ import annotations

import math


def lr_factor(cfg, frac: float) -> float:
    frac = min(max(frac, 0.0), 1.0)
    if cfg.name == "triangle":
        peak = min(max(cfg.peak, 1e-6), 1 - 1e-6)
        if frac < peak:
            return frac / peak
        return cfg.final + (1 - cfg.final) * (1 - frac) / (1 - peak)
    if cfg.warmup > 0 and frac < cfg.warmup:
        return frac / cfg.warmup
    if cfg.name == "constant":
        return 1.0
    progress = (frac - cfg.warmup) / max(1e-9, 1 - cfg.warmup)
    return cfg.final + (1 - cfg.final) * 0.5 * (1 + math.cos(math.pi * progress))

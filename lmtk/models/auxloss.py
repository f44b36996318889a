"""Auxiliary losses: terms a model's layers add to the training loss (an MoE router's
load-balancing loss), whatever the objective.

The training loop runs each micro-batch's objective.loss inside `collect(model)`: every layer
with an `aux_losses` attribute gets the micro-batch's AuxLosses while it runs and adds its terms
to it; the loop then backpropagates loss + AuxLosses.total() and logs AuxLosses.metrics() beside
the objective's. So every objective (CLM, MLM, the hybrids, a task's, distillation's stages) gets
them with no code of its own, a model without such layers gets nothing (total() is None), and
forwards outside the loop's step (validation, generation, a frozen teacher, activation
checkpointing's recomputation in backward) add nothing."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch


class AuxLosses:
    """Terms (name, value, weight) of one training forward; weight 0: a metric only."""

    def __init__(self):
        self.terms: list[tuple[str, object, float]] = []

    def add(self, name: str, value, weight: float = 0.0) -> None:
        self.terms.append((name, value, weight))

    def total(self) -> torch.Tensor | None:
        """sum of weight x value over the weighted terms (None: nothing to add)."""
        parts = [w * v for _, v, w in self.terms if w]
        return sum(parts[1:], parts[0]) if parts else None

    def metrics(self) -> dict:
        """{name: mean of its values}: over layers (and forwards). Tensors stay on the device, detached."""
        groups = defaultdict(list)
        for name, v, _ in self.terms:
            groups[name].append(v.detach().float() if torch.is_tensor(v) else float(v))
        return {name: sum(vs) / len(vs) for name, vs in groups.items()}


@contextlib.contextmanager
def collect(model: torch.nn.Module):
    """The AuxLosses that the model's layers fill during the block (see the module docstring)."""
    aux = AuxLosses()
    layers = [m for m in model.modules() if hasattr(m, "aux_losses")]
    for m in layers:
        m.aux_losses = aux
    try:
        yield aux
    finally:
        for m in layers:
            m.aux_losses = None

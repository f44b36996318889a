"""The task objective: cross-entropy over classes (or squared error for regression) of a task
model's head on labelled, padded batches (dicts: input_ids, attention_mask, labels).

Like every objective it is all the loop knows about the task: loss(model, batch, gen, frac).
count(batch) is the number of examples, so the loop weights micro-batches by examples
(the step's loss is the mean over its examples, not a mean of micro-batch means)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TaskObjective:
    name = "task"
    masked_shift = 0
    val_key = "task"
    head_fraction = 0.0  # no LM head

    def __init__(self, kind: str, bidirectional: bool):
        self.kind = kind
        self.bidirectional = bidirectional

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss [B]."""
        if self.kind == "regression":
            return F.mse_loss(logits[:, 0].float(), labels.float(), reduction="none")
        return F.cross_entropy(logits.float(), labels.long(), reduction="none")

    def loss(self, model, batch: dict, gen=None, frac: float = 0.0):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.losses(logits, batch["labels"]).mean(), {}

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["labels"].shape[0])

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0].float() if self.kind == "regression" else logits.argmax(-1)

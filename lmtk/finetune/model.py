"""A task model: a LanguageModel (the base) plus a classification / regression head.

Pooling: an encoder (a base trained with a masked objective, read bidirectionally) pools its
first token ([CLS]) through a tanh dense layer, as BERT does; a causal model reads left to
right, so only its last real token has seen the whole text, and that token's state goes to the
output layer. Batches are right-padded with attention masks (models/transformer.py)."""

from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierHead(nn.Module):
    def __init__(self, d: int, num_outputs: int, dense: bool, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d, d) if dense else None
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d, num_outputs)
        for lin in (self.dense, self.out):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, 0.02)
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            h = torch.tanh(self.dense(self.drop(h)))
        return self.out(self.drop(h))


class TaskModel(nn.Module):
    """lm (the base LanguageModel, its parameter names under `lm.`) + classifier (`classifier.`)."""

    def __init__(self, lm: nn.Module, num_outputs: int, causal: bool, pooling: str = "auto", dropout: float = 0.1):
        super().__init__()
        self.lm = lm
        self.causal = causal
        self.pooling = pooling if pooling != "auto" else ("last" if causal else "first")
        self.num_outputs = num_outputs
        self.classifier = ClassifierHead(lm.cfg.d_model, num_outputs, dense=self.pooling == "first", dropout=dropout)

    @property
    def cfg(self):
        return self.lm.cfg

    def head_meta(self) -> dict:
        return {"num_outputs": self.num_outputs, "causal": self.causal, "pooling": self.pooling,
                "dropout": self.classifier.drop.p}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_outputs] logits (regression: [B, 1] predictions), in fp32."""
        h = self.lm.hidden(input_ids, causal=self.causal, attention_mask=attention_mask)
        if self.pooling == "first":
            pooled = h[:, 0]
        else:  # the last real token of each right-padded row
            last = (attention_mask.long().sum(1) - 1) if attention_mask is not None else \
                torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
            pooled = h[torch.arange(h.shape[0], device=h.device), last.clamp(min=0)]
        return self.classifier(pooled).float()

    @property
    def activation_checkpointing(self):
        return self.lm.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value):
        if "lm" in self._modules:
            self.lm.activation_checkpointing = value

    def compile_blocks(self) -> None:
        self.lm.compile_blocks()

    def num_params(self, embeddings: bool = True) -> int:
        return self.lm.num_params(embeddings) + sum(p.numel() for p in self.classifier.parameters())

    def flops_per_token(self, seq_len: int, head_fraction: float = 1.0) -> float:
        return self.lm.flops_per_token(seq_len, 0.0)  # no LM head: the classifier's cost is per example


def build_task_model(lm: nn.Module, head: dict) -> TaskModel:
    return TaskModel(lm, head["num_outputs"], head["causal"], head.get("pooling", "auto"), head.get("dropout", 0.1))

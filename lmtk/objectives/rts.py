"""Random token substitution (Di Liello, Gabburo & Moschitti, "Efficient pre-training objectives
for Transformers" 2021 and "Effective Pre-Training Objectives for Transformer-based Autoencoders",
EMNLP 2022; Di Liello's thesis "Structural Self-Supervised Objectives for Transformers").

ELECTRA's replaced-token detection without its generator: a fixed share of each window's tokens
(objective.replace_rate, round(rate x L) per row: static shapes) is replaced by tokens drawn
uniformly from the vocabulary's non-special ids, never the token already there (a "replacement"
by itself would be an original token labelled replaced), and the encoder, reading the corrupted
window bidirectionally, classifies every token as replaced (1) or original (0) with a small head
(dense -> activation -> one logit; ELECTRA's discriminator head). The loss is the binary
cross-entropy over all tokens, which is what the papers train: the whole output carries signal,
not 15% of it.

objective.lm_weight > 0 adds the papers' swapped language modelling (SLM) term on the same
corrupted window: cross-entropy of the model's own (tied) head for the original token at each
replaced position, times lm_weight. Without it (the default, the papers' RTS) the LM head is never
trained, so the masked validation every run reports (val/mlm_*) measures nothing for this
objective; with it the head learns to restore swapped tokens, though validation's [MASK] token is
one it never sees in training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.errors import UserError
from lmtk.objectives import Objective


def check_knobs(rate: float, lm_weight: float) -> None:
    if not 0 < rate < 1:
        raise UserError(f"objective.replace_rate={rate} must be between 0 and 1 (the share of tokens replaced)")
    if lm_weight < 0:
        raise UserError(f"objective.lm_weight={lm_weight} must be >= 0 (0: replaced-token detection alone)")


class ReplacedHead(nn.Module):
    """Per-token replaced/original logit: w . act(W h + b) + c."""

    def __init__(self, cfg):
        super().__init__()
        from lmtk.models.layers import activation

        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation(cfg.mlp if cfg.mlp in ("gelu", "gelu-tanh") else "gelu")
        self.out = nn.Linear(cfg.d_model, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(h))).squeeze(-1)


class RTS(Objective):
    name = "rts"
    val_key = "mlm"  # an encoder: its reading is the masked one
    bidirectional = True

    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.rate = float(getattr(cfg, "replace_rate", 0.15))
        self.lm_weight = float(getattr(cfg, "lm_weight", 0.0))
        check_knobs(self.rate, self.lm_weight)
        self.head_fraction = self.rate if self.lm_weight > 0 else 0.0  # the LM head runs on the replaced positions only
        # replacements: the non-special ids (lmtk's tokenizers: n_special..V-1; an imported one: a table),
        # and where each id sits in that table (-1: special), to draw "anything but the original"
        specials = {i for i in tok.special_ids if i < self.vocab}
        keep = torch.ones(self.vocab, dtype=torch.bool)
        keep[sorted(specials)] = False
        self.table = keep.nonzero().squeeze(1)
        if len(self.table) < 2:
            raise UserError("objective=rts needs at least two non-special tokens in the vocabulary to substitute")
        self.index = torch.full((self.vocab,), -1, dtype=torch.long)
        self.index[self.table] = torch.arange(len(self.table))

    def attach(self, model) -> None:
        if "rts" not in model.objective_heads:
            head = ReplacedHead(model.cfg)
            head.apply(model._init)
            model.objective_heads["rts"] = head
        if self.lm_weight == 0:
            # the LM head trains only through the lm_weight loss: without it, the head's own parameters
            # (an untied decoder, an import's head transform and bias) are frozen, not left without
            # gradients, which DDP would wait for (its second step failed); a tied decoder is the
            # input embedding and trains as that
            for part in (model.head, model.head_transform):
                for p in part.parameters() if part is not None else ():
                    if p is not model.embed.weight:
                        p.requires_grad_(False)

    def corrupt(self, batch: torch.Tensor, gen: torch.Generator):
        """(corrupted batch, replaced positions [B, k], labels [B, L]: 1.0 exactly at those positions).
        Each replacement is uniform over the non-special ids other than the token it replaces."""
        B, L = batch.shape
        dev = batch.device
        if self.table.device != dev:  # moved once, not every step
            self.table, self.index = self.table.to(dev), self.index.to(dev)
        k = max(1, round(self.rate * L))
        pos = torch.rand(B, L, generator=gen, device=dev).argsort(dim=1)[:, :k]
        orig = batch.gather(1, pos)
        at = self.index[orig]  # the original's place in the table, -1 for a special token
        n = len(self.table)
        regular = (at >= 0).long()
        # uniform over the n - 1 other entries (n for a special original): draw from 0..n-1-regular and
        # step over the original's own entry
        u = (torch.rand(B, k, generator=gen, device=dev) * (n - regular)).long().clamp_max(n - 1 - regular)
        u = u + (regular.bool() & (u >= at)).long()
        x = batch.clone()
        rows = torch.arange(B, device=dev)[:, None]
        x[rows, pos] = self.table[u]
        labels = torch.zeros(B, L, device=dev)
        labels[rows, pos] = 1.0
        return x, pos, labels

    def predict(self, model, batch, gen):
        """The swapped-token predictions (SLM's): final hidden states at the replaced positions,
        whose targets are the original tokens there."""
        x, pos, _ = self.corrupt(batch, gen)
        h = model.hidden(x, causal=False)
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])), pos

    def loss(self, model, batch, gen, frac: float = 0.0):
        x, pos, labels = self.corrupt(batch, gen)
        h = model.hidden(x, causal=False)
        logit = model.objective_heads["rts"](h).float()
        bce = F.binary_cross_entropy_with_logits(logit, labels)
        with torch.no_grad():
            guess = logit > 0
            replaced = labels > 0
            metrics = {
                "rts/bce": bce.detach(),
                "rts/accuracy": (guess == replaced).float().mean(),
                "rts/recall": (guess & replaced).float().sum() / replaced.sum(),  # replaced tokens found
                "rts/precision": (guess & replaced).float().sum() / guess.sum().clamp_min(1),
            }
        if self.lm_weight == 0:
            return bce, metrics
        slm = self.mean_loss(model, batch, h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])), pos)
        metrics["rts/lm_loss"] = slm.detach()
        return bce + self.lm_weight * slm, metrics

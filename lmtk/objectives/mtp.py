"""Multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via
Multi-token Prediction"; Walker 2024, "Future Token Prediction").

The shared trunk's final hidden state h_t predicts k future tokens: the model's own head
predicts x_{t+1} from h_t exactly as CLM does (and is all that generation, evaluation and export
ever use), and k - 1 light extra heads predict x_{t+j}, j = 2..k, from

    h_t^(j) = norm_j(h_t + MLP_j(h_t))

through the same (tied) unembedding. The loss is the weighted mean of the k cross-entropies,
sum_j w_j CE_j / sum_j w_j (objective.mtp_weights; equal by default), so k = 1 is CLM exactly.
Gloeckle's extra heads are whole transformer layers; a residual MLP per head keeps them light
(position-wise: their FLOPs are 6 x their parameters per token, which the model's count includes
once they are attached) and leaves the trunk to carry everything the heads need to look ahead.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmtk.errors import UserError
from lmtk.objectives import CLM, Objective


class FutureHead(nn.Module):
    """One extra head: h -> norm(h + MLP(h)), the input the shared unembedding reads for token t+j."""

    def __init__(self, cfg):
        super().__init__()
        from lmtk.models.layers import MLP, MLPS, make_norm

        kind = cfg.mlp if cfg.mlp in MLPS else "gelu"  # a dense MLP of the model's kind where it has one
        self.mlp = MLP(cfg.d_model, cfg.d_ff, kind, cfg.bias, cfg.dropout)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.mlp(h))


def check_knobs(k: int, weights: list, seq_len: int | None = None) -> list[float]:
    """The heads' weights (main head first) for objective.mtp_k / mtp_weights, or a one-line error."""
    if k < 1 or (seq_len is not None and k >= seq_len):
        raise UserError(f"objective.mtp_k={k} must be at least 1 (1: clm)" + (f" and below data.seq_len={seq_len}" if seq_len else ""))
    weights = [float(w) for w in weights or []]
    if weights and len(weights) != k:
        raise UserError(f"objective.mtp_weights has {len(weights)} weights for objective.mtp_k={k} heads; "
                        "give one per head (the main head first), or [] for equal weights")
    if weights and (min(weights) < 0 or weights[0] <= 0):
        raise UserError(f"objective.mtp_weights={weights}: weights must be >= 0 and the main head's (the first) > 0")
    return weights or [1.0] * k


class MTP(Objective):
    name = "mtp"

    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.k = int(getattr(cfg, "mtp_k", 4))
        self.weights = check_knobs(self.k, list(getattr(cfg, "mtp_weights", None) or []))
        self.head_fraction = float(self.k)  # the unembedding runs once per head on (nearly) every position
        self.clm = CLM(cfg, tok)

    def attach(self, model) -> None:
        if self.k > 1 and "mtp" not in model.objective_heads:
            heads = nn.ModuleList(FutureHead(model.cfg) for _ in range(self.k - 1))
            heads.apply(model._init)  # the model's initialisation (GPT-2's scaled residual outputs)
            model.objective_heads["mtp"] = heads

    def predict(self, model, batch, gen):
        """The main head's predictions: next-token, as CLM's (what validation reads)."""
        return self.clm.predict(model, batch, gen)

    @staticmethod
    def targets(batch: torch.Tensor, j: int) -> torch.Tensor:
        """Positions [B, L - j] of head j's targets (1: the main head): the output at t predicts the
        token j ahead, t + j, for t = 0 .. L-1-j."""
        B, L = batch.shape
        return torch.arange(j, L, device=batch.device).expand(B, -1)

    def loss(self, model, batch, gen, frac: float = 0.0):
        if batch.shape[1] <= self.k:
            raise UserError(f"objective.mtp_k={self.k} needs windows longer than {self.k} tokens (data.seq_len)")
        h = model.hidden(batch, causal=True)
        heads = model.objective_heads["mtp"] if self.k > 1 else []
        total, metrics = 0.0, {}
        for j in range(1, self.k + 1):
            pos = self.targets(batch, j)
            hj = h[:, : pos.shape[1]]
            lj = self.mean_loss(model, batch, hj if j == 1 else heads[j - 2](hj), pos)
            total = total + self.weights[j - 1] * lj
            metrics[f"mtp/loss_{j}"] = lj.detach()
        return total / sum(self.weights), (metrics if self.k > 1 else {})

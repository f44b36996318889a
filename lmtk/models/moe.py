"""Sparse mixture-of-experts MLP (model.mlp=moe): each token's MLP output is the gated sum of
k of E small MLPs (experts), chosen per token by a linear router.

    s_t = W_r x_t                                   router logits [E]
    softmax router (Switch / GShard: the token-level MoE of sparse all-MLP, Yu et al. 2022):
        p_t = softmax(s_t),   K_t = top-k(p_t),   y_t = sum_{e in K_t} p_t[e] FFN_e(x_t)
        balance = E sum_e f_e P_e        f_e: share of the batch's k N assignments that went to e,
                                         P_e = mean_t p_t[e]; 1 when both are uniform
    sigmoid router (sigma-MoE in MoEUT, Csordas et al. 2023 / 2024):
        g_t = sigmoid(s_t),   K_t = top-k(g_t),   y_t = sum_{e in K_t} g_t[e] FFN_e(x_t)
        balance = -H(mean_t softmax(s_t))     entropy regularisation of the batch's mean routing
                                              distribution; -log E when it is uniform

The gates are not renormalised over the k chosen (Switch's and MoEUT's form), so the router
learns from the language-model loss through them even at k = 1. Each FFN_e is a layers.MLP of
width d_expert (default d_ff / k: the dense MLP's active parameters) and kind moe.kind. No
capacity limit, no dropped tokens: a token's output never depends on the other tokens of the
batch, so cached decoding equals the full forward and padding cannot reach a real token.

Computation: the k N (token, expert) assignments are sorted by expert; each expert runs once on
its contiguous slice of the gathered tokens (index_select), and the gated outputs are added back
to their tokens (index_add). Every expert runs, on an empty slice when it got no tokens, so every
parameter gets a gradient each step (data-parallel DDP needs no find_unused_parameters).

In training (grad enabled) the balance loss goes into the model's auxiliary losses
(models/auxloss.py), which the training loop adds to the objective's loss with weight
moe.balance, and the share of each expert's tokens into moe/usage (its entropy / log E: 1 when
all experts get equal shares)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.errors import UserError
from lmtk.models.layers import MLP, MLPS

ROUTERS = ("softmax", "sigmoid")


@dataclass
class Config:
    """model.moe.* (conf/base.yaml): read when model.mlp=moe."""

    experts: int = 16  # E
    top_k: int = 4  # k experts per token
    d_expert: Optional[int] = None  # each expert's hidden width; null: model.d_ff // top_k (the dense MLP's active size)
    router: str = "sigmoid"  # softmax (Switch; balance = E sum f P) | sigmoid (MoEUT; balance = entropy regularisation)
    balance: float = 0.01  # weight of the balance loss in the training loss (Switch's alpha, MoEUT's gamma: 0.01)
    kind: str = "swiglu"  # each expert's MLP: one of layers.MLPS

    def __post_init__(self):
        if self.experts < 1:
            raise UserError(f"model.moe.experts={self.experts}: at least 1")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"model.moe.top_k={self.top_k}: between 1 and model.moe.experts={self.experts}")
        if self.d_expert is not None and self.d_expert < 1:
            raise UserError(f"model.moe.d_expert={self.d_expert}: at least 1 (or null: model.d_ff // model.moe.top_k)")
        if self.router not in ROUTERS:
            raise UserError(f"model.moe.router={self.router}: one of {', '.join(ROUTERS)}")
        if self.kind not in MLPS:
            raise UserError(f"model.moe.kind={self.kind}: one of {', '.join(MLPS)}")
        if self.balance < 0:
            raise UserError(f"model.moe.balance={self.balance}: a loss weight, >= 0")


def moe_config(knobs: dict | None) -> dict:
    """model.moe completed with the defaults and checked (one-line errors for unknown keys and bad values)."""
    knobs = dict(knobs or {})
    known = [f.name for f in dataclasses.fields(Config)]
    for key in knobs:
        if key not in known:
            from lmtk.errors import suggest

            raise UserError(f"unknown config key 'model.moe.{key}'{suggest(key, known)}; its keys: {', '.join(known)}")
    return dataclasses.asdict(Config(**knobs))


def switch_balance(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E sum_e f_e P_e: probs [N, E] the router's softmax, counts [E] assignments per expert.
    f (a count) carries no gradient; P does, pulling probability away from crowded experts."""
    f = counts.to(probs.dtype) / counts.sum()
    return probs.shape[-1] * (f * probs.mean(0)).sum()


def entropy_balance(logits: torch.Tensor) -> torch.Tensor:
    """-H(mean_t softmax(s_t)) for logits [N, E], in log space (a mean of probabilities is a
    logsumexp of log-probabilities minus log N)."""
    log_mean = torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=0) - math.log(logits.shape[0])
    return (log_mean.exp() * log_mean).sum()


class MoE(nn.Module):
    aux_losses = None  # set by auxloss.collect() around a training forward
    _eager = False  # forward wrapped in torch.compiler.disable yet (at the first MoE built)

    def __init__(self, d: int, d_ff: int, moe: dict, bias: bool, dropout: float, router_mult: float = 1.0):
        super().__init__()
        c = Config(**moe)
        self.router_mult = router_mult  # muP's readout multiplier base/width on the scores (models/mup.py); 1 in SP
        self.n_experts, self.k, self.sigmoid, self.weight = c.experts, c.top_k, c.router == "sigmoid", c.balance
        self.d_expert = c.d_expert or max(1, d_ff // c.top_k)
        self.router = nn.Linear(d, c.experts, bias=False)
        self.experts = nn.ModuleList(MLP(d, self.d_expert, c.kind, bias, dropout) for _ in range(c.experts))
        if not MoE._eager:
            # data-dependent slice sizes: eager even inside a compiled block. Applied here, not as a
            # decorator: torch.compiler.disable imports torch._dynamo, ~1.1 s of every command's start-up
            MoE.forward, MoE._eager = torch.compiler.disable(MoE.forward), True

    def inactive_params(self) -> int:
        """Parameters a token does not use: the E - k experts it is not routed to (for FLOPs)."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.n_experts - self.k) * per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        logits = self.router(x)  # [N, E]
        if self.router_mult != 1.0:
            logits = logits * self.router_mult
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        gate, expert = scores.topk(self.k, dim=-1)  # [N, k]
        # the k N assignments sorted by expert: expert e's tokens are one contiguous slice
        flat = expert.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.k
        counts = torch.bincount(flat, minlength=self.n_experts)
        sizes = counts.tolist()
        xs = x.index_select(0, token).split(sizes)
        ys = torch.cat([ffn(xe) for ffn, xe in zip(self.experts, xs)])  # every expert runs (an empty slice too)
        ys = ys * gate.reshape(-1)[order, None].to(ys.dtype)
        y = torch.zeros_like(x, dtype=ys.dtype).index_add_(0, token, ys)
        if self.training and torch.is_grad_enabled():
            # computed whenever training (not only when collected), so activation checkpointing's
            # recomputation runs the same operations as the forward it replays
            balance = entropy_balance(logits) if self.sigmoid else switch_balance(scores.float(), counts)
            if self.aux_losses is not None:
                self.aux_losses.add("moe/balance", balance, self.weight)
                self.aux_losses.add("moe/usage", usage_entropy(sizes))
        return y.reshape(shape)


def usage_entropy(sizes: list[int]) -> float:
    """Entropy of the experts' shares of the assignments over log E: 1 when all get equal shares,
    0 when one gets them all (from the host-side counts: no device sync of its own)."""
    total, n = sum(sizes), len(sizes)
    if n == 1 or total == 0:
        return 1.0
    return -sum(s / total * math.log(s / total) for s in sizes if s) / math.log(n)

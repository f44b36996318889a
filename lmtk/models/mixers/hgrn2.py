"""HGRN2 (Qin, Yang, Sun, Shen, Li, Sun and Zhong 2024, "HGRN2: Gated Linear RNNs with State
Expansion", arXiv:2404.07904). HGRN's gated recurrence with its element-wise product replaced by
an outer product, which expands the state of each head to expand_ratio x Dv: it is GLA-shaped,
with the forget gate's complement as the key. Per head, on the recurrence of recurrence.py:

    f_t = beta + (1 - beta) sigmoid(x_t W_f)        (forget gate, per key channel; beta: lower bound)
    i_t = x_t W_i                                   (input)
    q_t = swish(x_t W_q)                            (HGRN's output gate, now the query)
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T       (q = q, k = 1 - f, v = i, g = log f)
    o_t = S_t^T q_t / sqrt(Dk)
    y_t = RMSNorm(o_t) W_o                          (per head; swish(x W_r) * first if output_gate)

The lower bound beta rises with depth (HGRN): the first layer has none (beta = 0, short
memories) and layer l of L starts at beta = l / L (long memories higher up). HGRN makes the bounds
of all layers one cumulative softmax of a shared parameter; here each layer owns its bound (the
layer index comes to the constructor): beta = sigmoid(gamma), a learnable gamma per forget
channel, set in init_weights to logit(l / L), so the bounds rise with depth at initialisation
but are not forced to stay ordered. log f is computed without cancelling:
log f = logaddexp(log beta, log(1 - beta) + logsigmoid(x W_f)), and k = 1 - f = -expm1(log f).

Heads as the paper: H = d_model / expand_ratio (at least 1), each with a state of
expand_ratio x (d_model / H), so the state holds expand_ratio x d_model numbers per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models.layers import RMSNorm
from lmtk.models.mixers.common import Slot, RecurrentMixer, check_knobs, short_conv, split_heads
from lmtk.models.mixers.recurrence import CHUNK


class HGRN2(RecurrentMixer):
    @dataclass
    class Config:
        expand_ratio: int = 64  # state expansion: key (forget-gate) size per head
        n_heads: Optional[int] = None  # heads (None: d_model / expand_ratio, at least 1, as the paper)
        output_gate: bool = False  # swish(x W_r) * RMSNorm(o) (the paper has none: q is HGRN's output gate)
        conv: int = 0  # short causal conv on q, f, i (size; 0: none, as the paper; no activation)
        chunk: int = CHUNK  # chunk length of the chunked (training) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)

        def __post_init__(self):
            from lmtk.errors import UserError

            check_knobs("hgrn2", self.chunk, self.conv, self.kernel)
            if self.expand_ratio < 1:
                raise UserError(f"model.mixer.expand_ratio={self.expand_ratio} for mixer hgrn2: must be >= 1")

    def __init__(self, cfg, layer: int):
        super().__init__()
        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        d = cfg.d_model
        self.n_heads = H = c.n_heads or max(1, d // c.expand_ratio)
        self.dk = c.expand_ratio
        self.dv = split_heads("hgrn2", d, H, "input")
        forget_width = H * self.dk
        self.chunk, self.kernel = c.chunk, c.kernel
        self.layer, self.n_layers = layer, cfg.n_layers
        self.q = nn.Linear(d, forget_width, bias=cfg.bias)
        self.f = nn.Linear(d, forget_width, bias=cfg.bias)
        self.i = nn.Linear(d, d, bias=cfg.bias)
        # no activation: a swish before the forget gate would bound f away from 0
        self.conv = short_conv("hgrn2", 2 * forget_width + d, c.conv, activation=False)  # over [q, f, i]
        # gamma: the forget gate's lower bound beta = sigmoid(gamma); none in the first layer
        self.lower_bound = nn.Parameter(torch.zeros(forget_width)) if layer > 0 else None
        self.norm = RMSNorm(self.dv)
        self.gate = nn.Linear(d, d, bias=cfg.bias) if c.output_gate else None
        self.out = nn.Linear(d, d, bias=cfg.bias)
        self.out.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """gamma = logit(l / L): layer l's forget gates start bounded below by l / L."""
        if self.lower_bound is not None:
            beta = self.layer / self.n_layers
            self.lower_bound.fill_(math.log(beta / (1 - beta)))  # plain floats: also on the meta device

    def log_forget(self, z: torch.Tensor) -> torch.Tensor:
        """log f = log(beta + (1 - beta) sigmoid(z)), <= 0 (layer 0: logsigmoid(z))."""
        if self.lower_bound is None:
            return F.logsigmoid(z)
        return torch.logaddexp(F.logsigmoid(self.lower_bound), F.logsigmoid(-self.lower_bound) + F.logsigmoid(z))

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        S, conv_state = state if state is not None else (None, None)
        (q, f, i), conv_state = self.convolve([self.q(x), self.f(x), self.i(x)], conv_state, decode)
        g = self.log_forget(f)  # log f_t
        k = -torch.expm1(g)  # 1 - f_t
        q = F.silu(q)
        H = self.n_heads
        o, S = self.recur(self.heads(q, H), self.heads(k, H), self.heads(i, H), self.heads(g, H), S, decode,
                          scale=self.dk ** -0.5)
        y = self.merge(self.norm(o.float()))  # in fp32 (o comes back in q's dtype: bf16 under autocast)
        return self.gated_out(y, x, S, conv_state, decode)

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's q, v, o shapes (distill.init=qkv_copy)."""
        return {"n_heads": None, "expand_ratio": tcfg.d_model // tcfg.n_heads}

    def attention_slots(self):
        # key-free: k = 1 - f is the forget gate's, which stays fresh
        return {"q": Slot(self.q, self.n_heads, self.dk), "v": Slot(self.i, self.n_heads, self.dv),
                "o": Slot(self.out, self.n_heads, self.dv)}

    def flops_per_token(self, seq_len: int) -> float:
        """The recurrence's state update and readout (common.RecurrentMixer.recurrence_flops)."""
        return self.recurrence_flops(self.n_heads, self.dk, self.dv)

"""Gated Linear Attention (Yang, Wang, Shen, Panda and Kim 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training", arXiv:2312.06635). Per head (key width Dk,
value width Dv), on the recurrence of recurrence.py with a data-dependent decay per key channel:

    q_t = x_t W_q,   k_t = x_t W_k,   v_t = x_t W_v         (short causal conv first if conv > 0)
    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a) ^ (1 / tau)       (low-rank gate: W_a1 d x gate_rank)
    g_t = log alpha_t = logsigmoid(x_t W_a1 W_a2 + b_a) / tau          (tau = 16: decays near 1)
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T
    o_t = S_t^T q_t / sqrt(Dk)
    y_t = (swish(x_t W_r) * RMSNorm(o_t)) W_o               (RMSNorm per head; gate: output_gate)

The paper's widths: keys 0.5 d_model (expand_k), values d_model (expand_v). b_a is set in
init_weights so that at x = 0 each head's key channels decay per step by factors spread from
0.9 to 0.999 (memories of ~10 to ~1000 steps): b_a = logit(a^tau).

State expansion (StateX, Shen et al. 2025, arXiv:2509.22630; `lmtk finetune
model.mixer.state_expand=f`): each head's key width Dk grows f-fold, so its state S [Dk, Dv] does;
the readout keeps the unexpanded 1 / sqrt(Dk / f), so a trained model widened by
widen_state_from() computes what it did before (its new key channels start unread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models.layers import RMSNorm
from lmtk.models.mixers.common import Slot, RecurrentMixer, check_knobs, check_state_expand, short_conv, split_heads
from lmtk.models.mixers.recurrence import CHUNK

# Per-step decay factors the gate starts at (x = 0), spread over each head's key channels.
DECAY_RANGE = (0.9, 0.999)


class GLA(RecurrentMixer):
    @dataclass
    class Config:
        n_heads: Optional[int] = None  # heads (None: model.n_heads)
        expand_k: float = 0.5  # key width H Dk = expand_k d_model (the paper's 0.5)
        expand_v: float = 1.0  # value width H Dv = expand_v d_model
        gate_rank: int = 16  # rank of the decay gate's projection W_a1 W_a2
        gate_temperature: float = 16.0  # tau in g = logsigmoid(.) / tau
        output_gate: bool = True  # swish(x W_r) * RMSNorm(o)
        conv: int = 0  # short causal conv on q, k, v (size; 0: none, as the paper)
        chunk: int = CHUNK  # chunk length of the chunked (training) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)
        state_expand: int = 1  # StateX: keys (so the state) state_expand x expand_k d_model wide; set by lmtk finetune

        def __post_init__(self):
            check_knobs("gla", self.chunk, self.conv, self.kernel)
            check_state_expand("gla", self.state_expand)

    def __init__(self, cfg, layer: int):
        super().__init__()
        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        d = cfg.d_model
        self.n_heads = H = c.n_heads or cfg.n_heads
        key_width, value_width = int(c.expand_k * d) * c.state_expand, int(c.expand_v * d)
        self.dk = split_heads("gla", key_width, H, "key")
        self.scale = (self.dk // c.state_expand) ** -0.5  # the unexpanded key width's: widening rescales nothing
        self.dv = split_heads("gla", value_width, H, "value")
        self.chunk, self.kernel, self.tau = c.chunk, c.kernel, c.gate_temperature
        self.q = nn.Linear(d, key_width, bias=cfg.bias)
        self.k = nn.Linear(d, key_width, bias=cfg.bias)
        self.v = nn.Linear(d, value_width, bias=cfg.bias)
        self.gate_down = nn.Linear(d, c.gate_rank, bias=False)  # W_a1
        self.gate_up = nn.Linear(c.gate_rank, key_width, bias=True)  # W_a2, b_a
        self.conv = short_conv("gla", 2 * key_width + value_width, c.conv)  # one depthwise conv over [q, k, v]
        self.norm = RMSNorm(self.dv)  # per head (one weight shared by the heads)
        self.gate = nn.Linear(d, value_width, bias=cfg.bias) if c.output_gate else None  # W_r
        self.out = nn.Linear(value_width, d, bias=cfg.bias)
        self.out.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """b_a = logit(a^tau): per-step decays a from DECAY_RANGE, log-spaced in 1 - a over each
        head's key channels."""
        lo, hi = DECAY_RANGE
        a = 1 - torch.logspace(math.log10(1 - lo), math.log10(1 - hi), self.dk, dtype=torch.float64)
        p = a ** self.tau
        self.gate_up.bias.copy_(torch.log(p / (1 - p)).repeat(self.n_heads).to(self.gate_up.bias))

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        S, conv_state = state if state is not None else (None, None)
        (q, k, v), conv_state = self.convolve([self.q(x), self.k(x), self.v(x)], conv_state, decode)
        g = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.tau  # [B, T, H Dk], <= 0
        H = self.n_heads
        o, S = self.recur(self.heads(q, H), self.heads(k, H), self.heads(v, H), self.heads(g, H), S, decode,
                          scale=self.scale)
        y = self.merge(self.norm(o.float()))  # in fp32 (o comes back in q's dtype: bf16 under autocast)
        return self.gated_out(y, x, S, conv_state, decode)

    @torch.no_grad()
    def widen_state_from(self, base: "GLA") -> None:
        """StateX's expansion with the function kept: `base`'s weights into this mixer, which has
        base's knobs and an f times wider key (hence state) per head. Per head the key channels are
        [base's Dk | new (f-1) Dk]: q, k and the decay gate of the old channels are copied; the new
        channels' queries are zero, so q_t . k_s over them is 0 and S_t^T q_t is base's (the scale is
        base's too), while their keys keep this mixer's fresh init (a zero key as well would leave
        both at a saddle: no gradient reaches either); their decays copy the old channels' gates
        (trained, and alpha <= 1 whatever the input). The short conv's old channels are copied, the
        new ones take their old channel's taps with a zero bias on the queries (silu(0) = 0). Values,
        the norm, the output gate and W_o are unchanged."""
        f = self.dk // base.dk
        old, H = base.dk, self.n_heads

        def keys(new, base_rows, fill):  # [H f Dk, ...] <- [H Dk, ...], base's channels first in each head; new: fill
            w, o = new.unflatten(0, (H, self.dk)), base_rows.unflatten(0, (H, old))  # views: writing w writes `new`
            w[:, :old] = o
            if fill == "zero":
                w[:, old:] = 0
            elif fill == "copy":
                w[:, old:] = o.repeat(1, f - 1, *([1] * (o.dim() - 2)))

        keys(self.q.weight, base.q.weight, "zero")
        keys(self.k.weight, base.k.weight, "fresh")
        keys(self.gate_up.weight, base.gate_up.weight, "copy")
        keys(self.gate_up.bias, base.gate_up.bias, "copy")
        if self.q.bias is not None:
            keys(self.q.bias, base.q.bias, "zero")
            keys(self.k.bias, base.k.bias, "fresh")
        if self.conv is not None:  # channels [q, k, v]
            kw, ko, vw = H * self.dk, H * old, self.v.out_features
            for what, q_fill in (("weight", "copy"), ("bias", "zero")):
                q, k, v = getattr(self.conv, what).split([kw, kw, vw])
                bq, bk, bv = getattr(base.conv, what).split([ko, ko, vw])
                keys(q, bq, q_fill)
                keys(k, bk, "copy")
                v.copy_(bv)
        widened = ("q.", "k.", "gate_up.", "conv.")
        for name, p in self.named_parameters():
            if not name.startswith(widened):
                p.copy_(base.get_parameter(name))

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's q, k, v, o shapes (distill.init=qkv_copy)."""
        return {"n_heads": None, "expand_k": 1.0, "expand_v": 1.0}

    def attention_slots(self):
        return {"q": Slot(self.q, self.n_heads, self.dk), "k": Slot(self.k, self.n_heads, self.dk),
                "v": Slot(self.v, self.n_heads, self.dv), "o": Slot(self.out, self.n_heads, self.dv)}

    def flops_per_token(self, seq_len: int) -> float:
        """The recurrence's state update and readout (common.RecurrentMixer.recurrence_flops)."""
        return self.recurrence_flops(self.n_heads, self.dk, self.dv)

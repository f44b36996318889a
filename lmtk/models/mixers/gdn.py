"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv 2412.06464) on the gated delta rule (delta.py).

    q_t, k_t, v_t = silu(conv1d(W_q x)), silu(conv1d(W_k x)), silu(conv1d(W_v x))   (short convs)
    q_t, k_t <- q_t / ||q_t||, k_t / ||k_t||                                          (per head)
    beta_t = sigmoid(W_beta x_t)                        the delta rule's step size, per head
    g_t = -exp(A_log) softplus(W_a x_t + dt_bias)        Mamba-2's scalar log-decay per head
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t / sqrt(Dk)
    out = W_o (RMSNorm(o_t) * silu(W_g x_t))            per-head RMSNorm, SiLU output gate

As the op: q, k the normalised conv outputs, v the value heads (Dv = expand_v * Dk), beta, and g
[B, H, T] (initial A / dt spectra as Mamba-2's, gating.MambaDecay). H = model.n_heads.
Decoding state: (S [B, H, Dk, Dv], conv state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.errors import UserError
from lmtk.models.mixers.gating import (
    GatedRMSNorm, MambaDecay, check_causal, conv, delta_step_or_chunk, heads, make_conv, recurrence_flops,
)


class GatedDeltaNet(nn.Module):
    causal_only = True  # a recurrence reads left to right only

    @dataclass
    class Config:
        head_dim: Optional[int] = None  # Dk, the query/key head dim; null: d_model / model.n_heads
        expand_v: float = 2.0  # value head dim Dv = expand_v * Dk (the paper's 2)
        conv: int = 4  # short causal conv size on q, k, v (0: none)
        chunk: int = 64  # chunk length of the chunked (WY, training / prefill) form

    def __init__(self, cfg, layer: int):
        super().__init__()
        m = cfg.mixer
        H = cfg.n_heads
        Dk = m["head_dim"] or heads(cfg.d_model, None, H, "gdn's d_model")[1]
        Dv = int(round(m["expand_v"] * Dk))
        if Dv <= 0:
            raise UserError(f"model.mixer.expand_v={m['expand_v']} gives value heads of {Dv} channels")
        self.n_heads, self.dk, self.dv, self.chunk = H, Dk, Dv, m["chunk"]
        d = cfg.d_model
        self.q_proj = nn.Linear(d, H * Dk, bias=cfg.bias)
        self.k_proj = nn.Linear(d, H * Dk, bias=cfg.bias)
        self.v_proj = nn.Linear(d, H * Dv, bias=cfg.bias)
        self.beta_proj = nn.Linear(d, H, bias=cfg.bias)
        self.a_proj = nn.Linear(d, H, bias=cfg.bias)  # dt~ of the decay
        self.g_proj = nn.Linear(d, H * Dv, bias=cfg.bias)  # output gate
        self.conv = make_conv(2 * H * Dk + H * Dv, m["conv"])  # one depthwise conv over [q, k, v]
        self.decay = MambaDecay(H)
        self.norm = GatedRMSNorm(H * Dv, Dv, norm_before_gate=True)
        self.out_proj = nn.Linear(H * Dv, d, bias=cfg.bias)
        self.out_proj.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        self.decay.init_weights()

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        check_causal(causal, "gdn")
        B, T, _ = x.shape
        H, Dk, Dv = self.n_heads, self.dk, self.dv
        S0, conv0 = state if state is not None else (None, None)
        qkv, conv1 = conv(self.conv, torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1), conv0, decode)
        q, k, v = (t.unflatten(-1, (H, -1)).transpose(1, 2) for t in qkv.split([H * Dk, H * Dk, H * Dv], -1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # [B, H, T]
        g, _ = self.decay(self.a_proj(x))
        o, S = delta_step_or_chunk(q, k, v, beta, g.transpose(1, 2), chunk=self.chunk, state=S0, decode=decode,
                                   scale=Dk ** -0.5)
        o = self.norm(o.transpose(1, 2).flatten(2), self.g_proj(x))
        return self.drop(self.out_proj(o)), ((S, conv1) if decode else None)

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops of the delta rule: 18 H Dk Dv per token."""
        return recurrence_flops(self.n_heads, self.dk, self.dv, delta_rule=True)

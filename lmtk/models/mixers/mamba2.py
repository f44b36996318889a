"""Mamba-2's SSD layer (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060) on the shared
gated linear recurrence (recurrence.py).

    [z, x, B, C, dt~] = in_proj(u)                      x, z: [E = expand * d_model]; B, C: [N]
    [x, B, C] = silu(conv1d([x, B, C]))                 short causal depthwise conv
    dt_t = softplus(dt~_t + dt_bias),  a_t = exp(-exp(A_log) dt_t)          one decay per head
    h_t = a_t h_{t-1} + B_t (dt_t x_t)^T                 per head: h [N, P], x_t's head slice [P]
    y_t = h_t^T C_t + D x_t
    out = out_proj(RMSNorm(y * silu(z)))                 the gated norm, over all E channels

As the op: q = C, k = B (one group: shared by every head), v = dt * x, g = -exp(A_log) dt
(a scalar per head and step, [B, H, T]); no q scaling. Heads: H = E / head_dim. A's and dt's
initial spectra are the paper's (gating.MambaDecay: A ~ U[1, 16], dt log-uniform in
[1e-3, 1e-1]); D starts at 1. Decoding state: (h [B, H, N, P], conv state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lmtk.models.mixers.gating import (
    GatedRMSNorm, MambaDecay, check_causal, conv, heads, make_conv, recurrence_flops, step_or_chunk,
)


class Mamba2(nn.Module):
    causal_only = True  # a recurrence reads left to right only

    @dataclass
    class Config:
        expand: int = 2  # inner width E = expand * d_model (x, z)
        head_dim: Optional[int] = None  # P, channels per head; null: E / model.n_heads
        d_state: int = 64  # N, the state size (B, C)
        conv: int = 4  # short causal conv size on x, B, C (0: none)
        chunk: int = 64  # chunk length of the chunked (training / prefill) form

    def __init__(self, cfg, layer: int):
        super().__init__()
        m = cfg.mixer
        self.d_inner = E = m["expand"] * cfg.d_model
        self.n_heads, self.head_dim = heads(E, m["head_dim"], cfg.n_heads, "mamba2's inner width expand * d_model")
        self.d_state, self.chunk = m["d_state"], m["chunk"]
        H, N = self.n_heads, self.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * E + 2 * N + H, bias=cfg.bias)
        self.conv = make_conv(E + 2 * N, m["conv"])
        self.decay = MambaDecay(H)
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(E, E, norm_before_gate=False)
        self.out_proj = nn.Linear(E, cfg.d_model, bias=cfg.bias)
        self.out_proj.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        self.decay.init_weights()
        nn.init.ones_(self.D)

    def forward(self, u, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        check_causal(causal, "mamba2")
        Bsz, T, _ = u.shape
        E, N, H, P = self.d_inner, self.d_state, self.n_heads, self.head_dim
        h0, conv0 = state if state is not None else (None, None)
        z, xBC, dt = self.in_proj(u).split([E, E + 2 * N, H], dim=-1)
        xBC, conv1 = conv(self.conv, xBC, conv0, decode)
        x, Bm, Cm = xBC.split([E, N, N], dim=-1)
        g, dt = self.decay(dt)  # [B, T, H]
        xh = x.unflatten(-1, (H, P))  # [B, T, H, P]
        v = (xh * dt.unsqueeze(-1).to(x.dtype)).transpose(1, 2)  # [B, H, T, P]
        k = Bm.unsqueeze(1).expand(Bsz, H, T, N)  # one group: B and C shared by all heads
        q = Cm.unsqueeze(1).expand(Bsz, H, T, N)
        y, h = step_or_chunk(q, k, v, g.transpose(1, 2), chunk=self.chunk, state=h0, decode=decode)
        y = y.transpose(1, 2) + xh * self.D.to(x.dtype).unsqueeze(-1)  # D skip
        y = self.norm(y.flatten(2), z)
        return self.drop(self.out_proj(y)), ((h, conv1) if decode else None)

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops with Dk = N, Dv = P: 12 H N P per token."""
        return recurrence_flops(self.n_heads, self.d_state, self.head_dim)

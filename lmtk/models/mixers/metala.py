"""MetaLA (Chou et al. 2024, "MetaLA: Unified Optimal Linear Approximation to Softmax Attention
Map", NeurIPS 2024, arXiv 2411.10741) on the shared gated linear recurrence (recurrence.py).

Key-free linear attention with a data-dependent per-channel decay whose complement is the key:

    x~_t = silu(conv1d(x))_t                                       short causal conv on the input
    alpha_t = exp(logsigmoid(W_a x~_t) / tau)      per key channel, in (0, 1)   (tau = decay_norm)
    S_t = diag(alpha_t) S_{t-1} + (1 - alpha_t) v_t^T                k_t = 1 - alpha_t (no W_k)
    o_t = S_t^T q_t + sigmoid((q_t . (mu * (1 - alpha_t))) v_t)      self-augmentation (mu learned,
                                                                      per head and key channel)
    out = W_o (silu(W_g x~_t) * LN(o_t))                              per-head norm, output gate

The self-augmentation lets the current token's value reach the output through its own
query-key score (q_t . mu (1 - alpha_t)) without passing through the decayed state; mu starts at 0.
As the op: q = W_q x~, k = 1 - alpha, v = W_v x~, g = log alpha [B, H, T, Dk]; no q scaling.
The key dim is qk_ratio x the value head dim (the paper halves it: qk_ratio 0.5).
Decoding state: (S [B, H, Dk, Dv], conv state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.errors import UserError
from lmtk.models.mixers.gating import check_causal, conv, heads, make_conv, recurrence_flops, step_or_chunk


class MetaLA(nn.Module):
    causal_only = True  # a recurrence reads left to right only

    @dataclass
    class Config:
        qk_ratio: float = 0.5  # key/query head dim = qk_ratio x value head dim (d_model / n_heads)
        decay_norm: float = 16.0  # tau: log alpha = logsigmoid(W_a x) / tau (slow decays at init)
        conv: int = 4  # short causal conv size on the input (0: none)
        chunk: int = 64  # chunk length of the chunked (training / prefill) form

    def __init__(self, cfg, layer: int):
        super().__init__()
        m = cfg.mixer
        d = cfg.d_model
        self.n_heads, self.dv = H, Dv = heads(d, None, cfg.n_heads, "metala's d_model")
        self.dk = Dk = int(round(m["qk_ratio"] * Dv))
        if Dk <= 0:
            raise UserError(f"model.mixer.qk_ratio={m['qk_ratio']} gives key heads of {Dk} channels")
        if m["decay_norm"] <= 0:
            raise UserError(f"model.mixer.decay_norm={m['decay_norm']} must be > 0")
        self.tau, self.chunk = m["decay_norm"], m["chunk"]
        self.conv = make_conv(d, m["conv"])
        self.q_proj = nn.Linear(d, H * Dk, bias=cfg.bias)
        self.a_proj = nn.Linear(d, H * Dk, bias=cfg.bias)  # the decay (and through it the key)
        self.v_proj = nn.Linear(d, H * Dv, bias=cfg.bias)
        self.g_proj = nn.Linear(d, H * Dv, bias=True)  # output gate
        self.mu = nn.Parameter(torch.zeros(H, Dk))  # self-augmentation weights
        self.out_proj = nn.Linear(H * Dv, d, bias=cfg.bias)
        self.out_proj.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        nn.init.zeros_(self.mu)

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        check_causal(causal, "metala")
        H = self.n_heads
        S0, conv0 = state if state is not None else (None, None)
        xc, conv1 = conv(self.conv, x, conv0, decode)
        q, a, v = (p(xc).unflatten(-1, (H, -1)).transpose(1, 2) for p in (self.q_proj, self.a_proj, self.v_proj))
        g = F.logsigmoid(a.float()) / self.tau  # log alpha_t, [B, H, T, Dk]
        k = -torch.expm1(g)  # 1 - alpha_t
        o, S = step_or_chunk(q, k.to(q.dtype), v, g, chunk=self.chunk, state=S0, decode=decode)
        score = (q * (self.mu.to(q.dtype).unsqueeze(1) * k.to(q.dtype))).sum(-1, keepdim=True)  # q_t . mu (1 - alpha_t)
        o = o + torch.sigmoid(score * v)  # self-augmentation
        o = F.layer_norm(o, (o.shape[-1],))  # per head, no affine
        y = F.silu(self.g_proj(xc)) * o.transpose(1, 2).flatten(2)
        return self.drop(self.out_proj(y)), ((S, conv1) if decode else None)

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops with the key dim Dk and value dim Dv: 12 H Dk Dv per token."""
        return recurrence_flops(self.n_heads, self.dk, self.dv)

"""Multi-head softmax attention on F.scaled_dot_product_attention (flash / efficient kernels
on GPU; no materialised mask: `is_causal` selects the causal kernel)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from lmtk.models.layers import Rotary


class Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.out.is_residual_out = True
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(self.head_dim, cfg.rope_base, cfg.max_seq_len) if cfg.positions == "rope" else None

    def forward(self, x, causal: bool = True):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(T, q.dtype)
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(B, T, D)))

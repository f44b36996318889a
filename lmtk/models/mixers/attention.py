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
        self.rotary = Rotary(self.head_dim, cfg.rope_base, cfg.max_seq_len, cfg.rope_layout) if cfg.positions == "rope" else None
        self.half = self.rotary is not None and cfg.rope_layout == "half"

    def forward(self, x, causal: bool = True):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        if self.half:  # q and k rotated in one pass, before the heads move in front of time
            cos, sin = self.rotary.cos_sin(T, qkv.dtype)
            q, k = (t.transpose(1, 2) for t in self.rotary.rotate_qk(qkv[:, :, :2], cos, sin).unbind(2))
            v = qkv[:, :, 2].transpose(1, 2)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.rotary is not None and not self.half:
            cos, sin = self.rotary.cos_sin(T, q.dtype)
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(B, T, D)))

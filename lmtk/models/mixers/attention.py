"""Multi-head softmax attention on F.scaled_dot_product_attention (flash / efficient kernels
on GPU), with grouped-query heads, an optional sliding window and a KV cache for decoding.

    q = x W_q,  k = x W_k,  v = x W_v        (n_kv_heads <= n_heads: each k/v head serves a group)
    o_i = sum_{j in N(i)} softmax_j(q_i k_j / sqrt(d)) v_j     (muP: q_i k_j sqrt(d_0) / d, models/mup.py)
    N(i) = {j <= i}  (causal; and j > i - window with a sliding window) | all j (bidirectional)

Decoding passes the cache of earlier positions as `state` = (k, v) [B, n_kv_heads, S, Dh] and
the absolute position of the first new token as `offset`. Queries then sit at the bottom right
of the score matrix (query i is position offset + i); SDPA's `is_causal` aligns them top-left,
so with a cache (or a window) the mask is built explicitly. A padded batch passes
attention_mask [B, S] (True at real tokens): padded keys are masked out for every query (a
query always sees itself, so a padded query's row is never empty, which would give NaN)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models import mup
from lmtk.models.layers import Rotary


class Attention(nn.Module):
    causal_only = False  # softmax attention reads both ways: masked objectives can use it

    @dataclass
    class Config:
        """No knobs of its own: n_heads, n_kv_heads and window are model-level (hybrids' attention
        layers use them too)."""

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.scale = mup.attention_scale(cfg, self.head_dim)  # None: 1/sqrt(d); muP: ∝ 1/d (models/mup.py)
        self.window = cfg.window
        # one projection for q, k and v: [H + 2 Hkv] heads (the layout of 3 x d when Hkv == H)
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.out.is_residual_out = True
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(self.head_dim, cfg.rope_base, cfg.max_seq_len, cfg.rope_layout) if cfg.positions == "rope" else None

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False, attention_mask=None):
        """(y [B, T, D], new state). Decoding (decode=True) returns the KV cache extended by this
        call's keys and values (cut to the window); training returns None."""
        B, T, D = x.shape
        Dh, H, Hkv = self.head_dim, self.n_heads, self.n_kv
        qkv = self.qkv(x)
        if Hkv == H:
            qkv = qkv.view(B, T, 3, H, Dh)
            if self.rotary is not None:  # q and k rotated in one op, before the heads move in front of time
                cos, sin = self.rotary.cos_sin(T, qkv.dtype, offset)
                qk, v = self.rotary.rotate_qkv(qkv, cos, sin)
                q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), v.transpose(1, 2)
            else:
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
        else:  # grouped-query: fewer k/v heads than q heads
            q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
            q, k, v = (t.view(B, T, -1, Dh).transpose(1, 2) for t in (q, k, v))
            if self.rotary is not None:
                cos, sin = self.rotary.cos_sin(T, q.dtype, offset)
                q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if state is not None:
            k = torch.cat([state[0], k], dim=2)
            v = torch.cat([state[1], v], dim=2)
        mask, is_causal = self._mask(T, k.shape[2], causal, x.device)
        if attention_mask is not None:
            if is_causal:  # the causal kernel's implicit mask, made explicit to combine with the keys'
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask, is_causal = self._key_mask(mask, attention_mask, T), False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads, scale=self.scale,
        )
        new_state = None
        if decode:
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            new_state = (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:])
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(B, T, D))), new_state

    def _mask(self, T: int, S: int, causal: bool, device):
        """(boolean mask [T, S] or None, is_causal) for T queries at the bottom right of S keys."""
        if not causal:
            return None, False
        if S == T and self.window is None:
            return None, True  # SDPA's causal kernel: no mask tensor
        i = torch.arange(T, device=device)[:, None] + (S - T)  # the queries' positions among the keys
        j = torch.arange(S, device=device)[None, :]
        allowed = j <= i
        if self.window is not None:
            allowed &= j > i - self.window
        return allowed, False

    @staticmethod
    def _key_mask(mask, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """[B, 1, T, S]: `mask` ([T, S] or None: all keys) without the padded keys, the diagonal kept."""
        S = attention_mask.shape[1]
        keys = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        allowed = keys if mask is None else keys & mask
        own = torch.arange(T, device=keys.device)[:, None] + (S - T) == torch.arange(S, device=keys.device)[None, :]
        return allowed | own

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the score and value matmuls (fwd + bwd): 12 x width x the
        keys each query sees (PaLM's 12 L H Q T, per layer)."""
        keys = seq_len if self.window is None else min(seq_len, self.window)
        return 12 * self.n_heads * self.head_dim * keys

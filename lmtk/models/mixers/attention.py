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
query always sees itself, so a padded query's row is never empty, which would give NaN).

Positions: rotary (model.positions=rope) rotates q and k; ALiBi (model.positions=alibi, Press et
al. 2022) adds -m_h |i - j| to head h's scores (layers.alibi_bias), passed to SDPA as a float
attn_mask with the boolean masks above folded in as -inf. Learned and sinusoidal positions are
added to the embeddings (LanguageModel), none: no positions at all (NoPE).

KV shifting (model.mixer.kv_shift=true; Xu et al. 2024, "KV Shifting Attention Enhances Language
Modeling"): before rotary, each key and value is a learned mix of its own token's and the previous
token's, per kv head,

    k_i <- a1 k_i + a2 k_{i-1},   v_i <- b1 v_i + b2 v_{i-1}     (k_{-1} = v_{-1} = 0)

so a key can announce "the token before me was A" and its value carry what followed: one layer
does what an induction head needs two for. a1, b1 ~ U(0, 1), a2 = 1 - a1, b2 = 1 - b1 at
initialisation (the paper's); a1 = b1 = 1, a2 = b2 = 0 is plain attention. Decoding carries the
last token's unshifted k and v as a third element of the state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models import mup
from lmtk.models.layers import Rotary, alibi_bias, alibi_slopes


class Attention(nn.Module):
    causal_only = False  # softmax attention reads both ways: masked objectives can use it

    @dataclass
    class Config:
        """n_heads, n_kv_heads and window are model-level (hybrids' attention layers use them too).
        kv_shift is attention's own knob (model.mixer.kv_shift with model/mixer=attention); a
        hybrid's attention layers, whose model.mixer is the recurrent one, are built with the
        default (mixers.build_mixer)."""

        kv_shift: bool = False  # keys and values mixed with the previous token's (KV shifting attention)

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
        if cfg.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.n_heads), persistent=False)
        else:
            self.alibi_slopes = None
        # [k | v, current | previous token, kv head]: (a1, a2) and (b1, b2) of each kv head; set in init_weights
        self.kv_shift = nn.Parameter(torch.empty(2, 2, self.n_kv)) if cfg.mixer.get("kv_shift", False) else None

    def init_weights(self) -> None:
        """KV shifting's mix: a1, b1 ~ U(0, 1), a2 = 1 - a1, b2 = 1 - b1 (the paper's init: k and v
        keep their scale while each head starts somewhere between its own and the previous token)."""
        if self.kv_shift is not None:
            with torch.no_grad():
                self.kv_shift[:, 0].uniform_(0.0, 1.0)
                self.kv_shift[:, 1] = 1.0 - self.kv_shift[:, 0]

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False, attention_mask=None):
        """(y [B, T, D], new state). Decoding (decode=True) returns the KV cache extended by this
        call's keys and values (cut to the window); training returns None."""
        B, T, D = x.shape
        Dh, H, Hkv = self.head_dim, self.n_heads, self.n_kv
        qkv = self.qkv(x)
        if self.kv_shift is not None:
            qkv, last = self._shift_kv(qkv, state, attention_mask)
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
        if self.alibi_slopes is not None:
            mask, is_causal = self._alibi(mask, is_causal, T, k.shape[2], q.dtype), False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads, scale=self.scale,
        )
        new_state = None
        if decode:
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            new_state = (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:])
            if self.kv_shift is not None:
                new_state += (last,)  # the next call's k_{i-1}, v_{i-1}, unshifted
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

    def _shift_kv(self, qkv, state, attention_mask):
        """(qkv with k, v shifted, this call's last unshifted k/v row [B, 1, 2, Hkv, Dh]). The
        previous token of the call's first is the state's last row when decoding, else zero;
        a padded position is no token's predecessor (left-padded batches)."""
        B, T, _ = qkv.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.head_dim
        q, kv = qkv.split([H * Dh, 2 * Hkv * Dh], dim=-1)
        kv = kv.view(B, T, 2, Hkv, Dh)
        first = state[2] if state is not None else kv.new_zeros(B, 1, 2, Hkv, Dh)
        prev = torch.cat([first, kv[:, :-1]], dim=1)
        if attention_mask is not None:
            real = torch.cat([attention_mask.new_ones(B, 1), attention_mask[:, :-1]], dim=1)
            prev = prev * real.to(kv.dtype)[:, :, None, None, None]
        w = self.kv_shift.to(kv.dtype)[..., None]  # [2, 2, Hkv, 1]
        shifted = w[:, 0] * kv + w[:, 1] * prev
        return torch.cat([q, shifted.flatten(2)], dim=-1), kv[:, -1:]

    def _alibi(self, mask, is_causal: bool, T: int, S: int, dtype) -> torch.Tensor:
        """The float attn_mask [H, T, S] (or [B, H, T, S] with a padding mask): ALiBi's distance
        bias, -inf where `mask` (or the implicit causal one) forbids a key."""
        bias = alibi_bias(self.alibi_slopes, T, S)
        if is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=bias.device).tril(S - T)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        return bias.to(dtype)

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

"""Building blocks: norms, MLPs, positions."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


NORM_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}  # each norm's usual epsilon (model.norm_eps: null)


def make_norm(kind: str, d: int, bias: bool, eps: float | None = None) -> nn.Module:
    """LayerNorm or RMSNorm over the last dimension; eps None: the norm's usual (NORM_EPS)."""
    eps = NORM_EPS[kind] if eps is None else eps
    return RMSNorm(d, eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps, bias=bias)


def default_d_ff(d_model: int, mlp: str) -> int:
    if mlp == "gelu":
        return 4 * d_model
    return 64 * math.ceil(8 * d_model / 3 / 64)  # gated: same parameters as a 4x GELU MLP


class MLP(nn.Module):
    """gelu: W2 gelu(W1 x).  gated-gelu / swiglu: W2 (act(W1a x) * W1b x)."""

    def __init__(self, d: int, d_ff: int, kind: str, bias: bool, dropout: float):
        super().__init__()
        self.gated = kind != "gelu"
        self.act = F.silu if kind == "swiglu" else F.gelu
        self.up = nn.Linear(d, d_ff * (2 if self.gated else 1), bias=bias)
        self.down = nn.Linear(d_ff, d, bias=bias)
        self.down.is_residual_out = True
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = self.act(a) * b
        else:
            h = self.act(h)
        return self.drop(self.down(h))


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: d // 2])
    return table


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), applied to q and k of shape [B, H, T, Dh].

    The cos/sin tables are buffers built once for max_len positions: no state changes inside
    forward, so torch.compile sees a static graph (a lazily filled cache forced a recompile)."""

    def __init__(self, head_dim: int, base: float, max_len: int):
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        cos, sin = self._table(max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, n: int):
        freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        return freqs.cos(), freqs.sin()

    def cos_sin(self, T: int, dtype, offset: int = 0):
        """Tables for positions offset .. offset+T-1 (decoding continues at an offset)."""
        end = offset + T
        # past max_seq_len (e.g. generating past it): computed for this call only
        cos, sin = (self.cos, self.sin) if end <= len(self.cos) else self._table(end)
        return cos[offset:end].to(dtype), sin[offset:end].to(dtype)

    def forward(self, x, cos, sin):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

"""Linear attention (Katharopoulos, Vyas, Pappas and Fleuret 2020, "Transformers are RNNs",
arXiv:2006.16236, and the feature maps of its successors). Softmax's exp(q . k) is replaced by a
kernel phi(q) . phi(k), so causal attention becomes the recurrence of recurrence.py without decay:

    q_t = x_t W_q,  k_t = x_t W_k,  v_t = x_t W_v          (short causal conv first if conv > 0)
    S_t = S_{t-1} + phi(k_t) v_t^T                          (g = None)
    z_t = z_{t-1} + phi(k_t)
    y_t = S_t^T phi(q_t) / (z_t . phi(q_t) + eps)   normalize: true (the paper)
    y_t = S_t^T phi(q_t)                            normalize: false (then output_norm helps, as TransNormer)
    out_t = ([swish(x_t W_r) *] [RMSNorm_head] (y_t)) W_o

z_t is one more value column: the op runs on v' = [v, 1], so S' = [S, z] and the denominator is
the last output column, in the same call (and carried in the same decoding state).

Feature maps phi (model.mixer.feature_map), per head:
  elu1      elu(x) + 1 (Katharopoulos et al.), on Dk = head size
  relu      max(x, 0), on Dk = head size
  taylor    Based (Arora et al. 2024): the 2nd-order Taylor expansion of exp(q . k / sqrt(f)),
            phi(x) = [1, x / f^(1/4), (x (x) x) / (sqrt(2) sqrt(f))], so phi(q) . phi(k) =
            1 + q.k/sqrt(f) + (q.k)^2 / (2 f); q, k are projected to f = feature_dim per head
            (1 + f + f^2 features)
  rebased   ReBased (Aksenov et al. 2024): a learnable affine of the normalised input, then
            squared as a kernel: x~ = gamma * LayerNorm(x) + beta, phi(x) = x~ (x) x~, so
            phi(q) . phi(k) = (q~ . k~)^2; f = feature_dim per head (f^2 features)
  hedgehog  Hedgehog (Zhang et al. 2024): a learnable linear map per head, then softmax over
            [x W + b, -(x W + b)] (exp's spikiness and monotonicity); Dk = head size, 2 f features,
            separate maps for q and k, W starting as the identity
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
from lmtk.models.mixers.recurrence import CHUNK, compute_dtype

FEATURE_MAPS = ("elu1", "relu", "taylor", "rebased", "hedgehog")


class Taylor(nn.Module):
    """Based: phi(x) = [1, x / f^(1/4), (x (x) x) / (sqrt 2 sqrt f)], x [..., f] -> [..., 1 + f + f^2]."""

    def __init__(self, f: int):
        super().__init__()
        self.f = f

    def forward(self, x):
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
        return torch.cat([torch.ones_like(x[..., :1]), x / self.f ** 0.25, outer / (math.sqrt(2) * math.sqrt(self.f))], dim=-1)


class ReBased(nn.Module):
    """ReBased: x~ = gamma * LayerNorm(x) + beta, phi(x) = x~ (x) x~ ([..., f] -> [..., f^2])."""

    def __init__(self, f: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(f))
        self.beta = nn.Parameter(torch.zeros(f))

    def forward(self, x):
        x = self.gamma * F.layer_norm(x, (x.shape[-1],)) + self.beta
        return (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


class Hedgehog(nn.Module):
    """Hedgehog: phi(x) = softmax([x W + b, -(x W + b)]) per head, W [H, Dk, f] (identity at init)."""

    def __init__(self, n_heads: int, dk: int, f: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, dk, f))
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, f))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.weight.copy_(torch.eye(*self.weight.shape[1:]).expand_as(self.weight))
        self.bias.zero_()

    def forward(self, x):  # x [B, H, T, Dk]
        z = x @ self.weight + self.bias
        return torch.cat([z, -z], dim=-1).softmax(-1)


def feature_map(name: str, n_heads: int, dk: int, f: int) -> tuple[nn.Module | None, int]:
    """(phi's module, None for the element-wise maps; phi's output size) for keys of size dk per head."""
    if name in ("elu1", "relu"):
        return None, dk
    if name == "taylor":
        return Taylor(dk), 1 + dk + dk * dk
    if name == "rebased":
        return ReBased(dk), dk * dk
    return Hedgehog(n_heads, dk, f), 2 * f


class LinearAttention(RecurrentMixer):
    @dataclass
    class Config:
        feature_map: str = "elu1"  # elu1, relu, taylor (Based), rebased, hedgehog
        feature_dim: int = 16  # taylor / rebased: q, k size per head; hedgehog: the map's width f
        normalize: bool = True  # divide by phi(q) . sum phi(k) (the paper's normaliser)
        eps: float = 1e-6  # added to the normaliser
        output_norm: bool = False  # RMSNorm per head on the output (TransNormer; for normalize: false)
        output_gate: bool = False  # swish(x W_r) * output
        n_heads: Optional[int] = None  # heads (None: model.n_heads); values d_model / H per head
        conv: int = 0  # short causal conv on q, k, v (size; 0: none. Based puts convs in other layers)
        chunk: int = CHUNK  # chunk length of the chunked (training) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)

        def __post_init__(self):
            from lmtk.errors import UserError

            check_knobs("linear", self.chunk, self.conv, self.kernel, feature_map=(self.feature_map, FEATURE_MAPS))
            if self.feature_dim < 1:
                raise UserError(f"model.mixer.feature_dim={self.feature_dim} for mixer linear: must be >= 1")

    def __init__(self, cfg, layer: int):
        super().__init__()
        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        d = cfg.d_model
        self.n_heads = H = c.n_heads or cfg.n_heads
        self.dv = split_heads("linear", d, H, "value")
        self.dk = c.feature_dim if c.feature_map in ("taylor", "rebased") else self.dv  # q, k size per head
        self.kind, self.chunk, self.kernel = c.feature_map, c.chunk, c.kernel
        self.normalize, self.eps = c.normalize, c.eps
        self.q = nn.Linear(d, H * self.dk, bias=cfg.bias)
        self.k = nn.Linear(d, H * self.dk, bias=cfg.bias)
        self.v = nn.Linear(d, d, bias=cfg.bias)
        self.conv = short_conv("linear", 2 * H * self.dk + d, c.conv)  # one depthwise conv over [q, k, v]
        self.phi_q, self.n_features = feature_map(c.feature_map, H, self.dk, c.feature_dim)
        # Hedgehog learns separate maps for q and k; ReBased's affine is shared by q and k
        self.phi_k = feature_map(c.feature_map, H, self.dk, c.feature_dim)[0] if c.feature_map == "hedgehog" else self.phi_q
        self.norm = RMSNorm(self.dv) if c.output_norm else None
        self.gate = nn.Linear(d, d, bias=cfg.bias) if c.output_gate else None
        self.out = nn.Linear(d, d, bias=cfg.bias)
        self.out.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hedgehog's maps start as the identity (so phi starts as softmax([x, -x]))."""
        for phi in (self.phi_q, self.phi_k):
            if isinstance(phi, Hedgehog):
                phi.init_weights()

    def phi(self, x: torch.Tensor, which: nn.Module | None) -> torch.Tensor:
        if self.kind == "elu1":
            return F.elu(x) + 1
        if self.kind == "relu":
            return F.relu(x)
        return which(x)

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        S, conv_state = state if state is not None else (None, None)
        (q, k, v), conv_state = self.convolve([self.q(x), self.k(x), self.v(x)], conv_state, decode)
        H = self.n_heads
        q, k, v = self.phi(self.heads(q, H), self.phi_q), self.phi(self.heads(k, H), self.phi_k), self.heads(v, H)
        if self.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # v' = [v, 1]: the last column sums phi(k)
            q = q.to(compute_dtype(q.dtype))  # o in the op's fp32 (fp64): no division in bf16
        o, S = self.recur(q, k, v, None, S, decode)
        if self.normalize:
            o = o[..., :-1] / (o[..., -1:] + self.eps)
        if self.norm is not None:
            o = self.norm(o.float())  # in fp32 (o is bf16 under autocast)
        y = self.merge(o)
        return self.gated_out(y, x, S, conv_state, decode)

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's q, k, v, o shapes (distill.init=qkv_copy)."""
        out = {"n_heads": None}
        if knobs.get("feature_map") in ("taylor", "rebased"):
            out["feature_dim"] = tcfg.d_model // tcfg.n_heads
        return out

    def attention_slots(self):
        return {"q": Slot(self.q, self.n_heads, self.dk), "k": Slot(self.k, self.n_heads, self.dk),
                "v": Slot(self.v, self.n_heads, self.dv), "o": Slot(self.out, self.n_heads, self.dv)}

    def flops_per_token(self, seq_len: int) -> float:
        """The recurrence's state update and readout (common.RecurrentMixer.recurrence_flops) on
        the feature-mapped keys (and the normaliser's extra value column)."""
        return self.recurrence_flops(self.n_heads, self.n_features, self.dv + int(self.normalize))

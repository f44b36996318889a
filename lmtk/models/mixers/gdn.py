"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv 2412.06464) on the gated delta rule (delta.py).

    q_t, k_t, v_t = silu(conv1d(W_q x)), silu(conv1d(W_k x)), silu(conv1d(W_v x))   (short convs)
    q_t, k_t <- q_t / ||q_t||, k_t / ||k_t||                                          (per head)
    beta_t = sigmoid(W_beta x_t)                        the delta rule's step size, per head
    g_t = -exp(A_log) softplus(W_a x_t + dt_bias)        Mamba-2's scalar log-decay per head
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t / sqrt(Dk)
    out = W_o (RMSNorm(o_t) * silu(W_g x_t))            per-head RMSNorm, SiLU output gate (output_gate)

As the op: q, k the normalised conv outputs, v the value heads (Dv = expand_v * Dk), beta, and g
[B, H, T] (initial A / dt spectra as Mamba-2's, common.MambaDecay). H = model.n_heads.
Decoding state: (S [B, H, Dk, Dv], conv state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models.mixers.common import Slot, GatedRMSNorm, MambaDecay, RecurrentMixer, check_knobs, short_conv, split_heads


class GatedDeltaNet(RecurrentMixer):
    silu_without_conv = True  # q, k, v = silu(W x) when model.mixer.conv=0

    @dataclass
    class Config:
        head_dim: Optional[int] = None  # Dk, the query/key head dim; null: d_model / model.n_heads
        expand_v: float = 2.0  # value head dim Dv = expand_v * Dk (the paper's 2)
        output_gate: bool = True  # RMSNorm(o) * silu(W_g x) (the paper's)
        conv: int = 4  # short causal conv size on q, k, v (0: none)
        chunk: int = 32  # chunk length of the chunked (WY, training / prefill) form (32: fastest here)
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)

        def __post_init__(self):
            check_knobs("gdn", self.chunk, self.conv, self.kernel)

    def __init__(self, cfg, layer: int):
        super().__init__()
        from lmtk.errors import UserError

        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        H = cfg.n_heads
        Dk = c.head_dim or split_heads("gdn", cfg.d_model, H, "d_model")
        Dv = int(round(c.expand_v * Dk))
        if Dk <= 0 or Dv <= 0:
            raise UserError(f"model.mixer.head_dim={Dk}, expand_v={c.expand_v} for mixer gdn: "
                            f"gives heads of {Dk} / {Dv} channels (both must be >= 1)")
        self.n_heads, self.dk, self.dv, self.chunk, self.kernel = H, Dk, Dv, c.chunk, c.kernel
        d = cfg.d_model
        self.q_proj = nn.Linear(d, H * Dk, bias=cfg.bias)
        self.k_proj = nn.Linear(d, H * Dk, bias=cfg.bias)
        self.v_proj = nn.Linear(d, H * Dv, bias=cfg.bias)
        self.beta_proj = nn.Linear(d, H, bias=cfg.bias)
        self.a_proj = nn.Linear(d, H, bias=cfg.bias)  # dt~ of the decay
        self.gate = nn.Linear(d, H * Dv, bias=cfg.bias) if c.output_gate else None  # W_g
        self.conv = short_conv("gdn", 2 * H * Dk + H * Dv, c.conv)  # one depthwise conv over [q, k, v]
        self.decay = MambaDecay(H)
        self.norm = GatedRMSNorm(H * Dv, Dv, norm_before_gate=True)
        self.out = nn.Linear(H * Dv, d, bias=cfg.bias)
        self.out.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        self.decay.init_weights()

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        H, Dk = self.n_heads, self.dk
        S0, conv0 = state if state is not None else (None, None)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if all(type(p) is nn.Linear for p in projs):
            # W_q, W_k, W_v as one product with their concatenation: its output is already the conv's
            # input [q, k, v], no [T, 2 H Dk + H Dv] copy forward or back (not when adapted, e.g. LoRA)
            bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
            qkv = F.linear(x, torch.cat([p.weight for p in projs]), bias)
        else:
            qkv = torch.cat([p(x) for p in projs], dim=-1)
        (qkv,), conv1 = self.convolve([qkv], conv0, decode)
        q, k, v = qkv.split([H * Dk, H * Dk, H * self.dv], dim=-1)
        q, k, v = self.heads(q, H), self.heads(k, H), self.heads(v, H)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # [B, H, T]
        g, _ = self.decay(self.a_proj(x))
        o, S = self.recur_delta(q, k, v, beta, g.transpose(1, 2), S0, decode, scale=Dk ** -0.5)
        o = self.norm(self.merge(o), None if self.gate is None else self.gate(x))
        return self.drop(self.out(o)), ((S, conv1) if decode else None)

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's q, k, v, o shapes (distill.init=qkv_copy)."""
        return {"head_dim": None, "expand_v": 1.0}

    def attention_slots(self):
        return {"q": Slot(self.q_proj, self.n_heads, self.dk), "k": Slot(self.k_proj, self.n_heads, self.dk),
                "v": Slot(self.v_proj, self.n_heads, self.dv), "o": Slot(self.out, self.n_heads, self.dv)}

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops of the delta rule: 18 H Dk Dv per token."""
        return self.recurrence_flops(self.n_heads, self.dk, self.dv, delta_rule=True)

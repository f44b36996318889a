"""Multi-scale retention (Sun, Dong, Huang, Ma, Xia, Xue, Wang and Wei 2023, "Retentive Network:
A Successor to Transformer for Large Language Models", arXiv:2307.08621). Head h of H, on the
recurrence of recurrence.py with one fixed decay per head:

    q_t = RoPE_t(x_t W_Q),  k_t = RoPE_t(x_t W_K),  v_t = x_t W_V     (short causal conv first if conv > 0)
    gamma_h = 1 - 2^(-5-h),  g_h = log gamma_h                       (h = 0 .. H-1: multi-scale decay)
    S_t = gamma_h S_{t-1} + k_t v_t^T
    o_t = S_t^T q_t / sqrt(Dk)
    Y = GroupNorm_h(o)                                               (a LayerNorm per head)
    MSR(X) = (swish(X W_G) * Y) W_O                                  (gate: output_gate)

The paper's xPos is RoPE times a per-position decay; the decay part is gamma itself, so q and k
get plain RoPE (lmtk's Rotary, at positions offset .. offset+T-1 when decoding), always,
whatever model.positions. Widths as the paper: keys d_model (expand_k), values 2 d_model
(expand_v). The decays are a fixed buffer (not trained, not in checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lmtk.models.layers import Rotary
from lmtk.models.mixers.common import Slot, RecurrentMixer, check_knobs, short_conv, split_heads
from lmtk.models.mixers.recurrence import CHUNK


def retention_decays(n_heads: int) -> torch.Tensor:
    """g_h = log(1 - 2^(-5-h)), h = 0 .. n_heads-1 (fp32, [H])."""
    h = torch.arange(n_heads, dtype=torch.float64)
    return torch.log1p(-torch.exp2(-5.0 - h)).float()


class RetNet(RecurrentMixer):
    @dataclass
    class Config:
        n_heads: Optional[int] = None  # heads (None: model.n_heads); head h decays by 1 - 2^(-5-h)
        expand_k: float = 1.0  # key width H Dk = expand_k d_model (Dk even: RoPE)
        expand_v: float = 2.0  # value width H Dv = expand_v d_model (the paper's 2)
        output_gate: bool = True  # swish(X W_G) * GroupNorm(o)
        conv: int = 0  # short causal conv on q, k, v (size; 0: none, as the paper)
        chunk: int = CHUNK  # chunk length of the chunked (training) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)

        def __post_init__(self):
            check_knobs("retnet", self.chunk, self.conv, self.kernel)

    def __init__(self, cfg, layer: int):
        super().__init__()
        from lmtk.errors import UserError

        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        d = cfg.d_model
        self.n_heads = H = c.n_heads or cfg.n_heads
        key_width, value_width = int(c.expand_k * d), int(c.expand_v * d)
        self.dk = split_heads("retnet", key_width, H, "key")
        self.dv = split_heads("retnet", value_width, H, "value")
        if self.dk % 2:
            raise UserError(f"mixer retnet: the key head size {self.dk} must be even (RoPE rotates pairs)")
        self.chunk, self.kernel = c.chunk, c.kernel
        self.q = nn.Linear(d, key_width, bias=cfg.bias)
        self.k = nn.Linear(d, key_width, bias=cfg.bias)
        self.v = nn.Linear(d, value_width, bias=cfg.bias)
        self.conv = short_conv("retnet", 2 * key_width + value_width, c.conv)  # one depthwise conv over [q, k, v]
        self.rotary = Rotary(self.dk, cfg.rope_base, cfg.max_seq_len)
        self.register_buffer("log_decay", retention_decays(H), persistent=False)  # g_h
        self.group_norm = nn.GroupNorm(H, value_width)
        self.gate = nn.Linear(d, value_width, bias=cfg.bias) if c.output_gate else None  # W_G
        self.out = nn.Linear(value_width, d, bias=cfg.bias)
        self.out.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The multi-scale decays (a buffer; set again so that nothing before can change them)."""
        self.log_decay.copy_(retention_decays(self.n_heads).to(self.log_decay))

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        B, T, _ = x.shape
        S, conv_state = state if state is not None else (None, None)
        (q, k, v), conv_state = self.convolve([self.q(x), self.k(x), self.v(x)], conv_state, decode)
        H = self.n_heads
        q, k, v = self.heads(q, H), self.heads(k, H), self.heads(v, H)
        cos, sin = self.rotary.cos_sin(T, q.dtype, offset)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        o, S = self.recur(q, k, v, self.log_decay, S, decode, scale=self.dk ** -0.5)
        y = self.group_norm(self.merge(o).float().reshape(B * T, -1)).view(B, T, -1)  # in fp32
        return self.gated_out(y, x, S, conv_state, decode)

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's q, k, v, o shapes (distill.init=qkv_copy)."""
        return {"n_heads": None, "expand_k": 1.0, "expand_v": 1.0}

    def attention_slots(self):
        return {"q": Slot(self.q, self.n_heads, self.dk), "k": Slot(self.k, self.n_heads, self.dk),
                "v": Slot(self.v, self.n_heads, self.dv), "o": Slot(self.out, self.n_heads, self.dv)}

    def flops_per_token(self, seq_len: int) -> float:
        """The recurrence's state update and readout (common.RecurrentMixer.recurrence_flops)."""
        return self.recurrence_flops(self.n_heads, self.dk, self.dv)

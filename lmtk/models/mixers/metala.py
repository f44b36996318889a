"""MetaLA (Chou et al. 2024, "MetaLA: Unified Optimal Linear Approximation to Softmax Attention
Map", NeurIPS 2024, arXiv 2411.10741) on the shared gated linear recurrence (recurrence.py).

Key-free linear attention with a data-dependent per-channel decay whose complement is the key:

    x~_t = silu(conv1d(x))_t                                       short causal conv on the input
    alpha_t = exp(logsigmoid(W_a x~_t) / tau)      per key channel, in (0, 1)   (tau = decay_norm)
    S_t = diag(alpha_t) S_{t-1} + (1 - alpha_t) v_t^T                k_t = 1 - alpha_t (no W_k)
    o_t = S_t^T q_t + sigmoid((q_t . (mu * (1 - alpha_t))) v_t)      self-augmentation (mu learned,
                                                                      per head and key channel)
    out = W_o (silu(W_g x~_t) * LN(o_t))                              per-head norm, output gate
                                                                      (output_gate; conv: the conv's size)

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

from lmtk.models.mixers.common import Slot, RecurrentMixer, check_knobs, short_conv, split_heads


class MetaLA(RecurrentMixer):
    silu_without_conv = True  # x~ = silu(x) when model.mixer.conv=0

    @dataclass
    class Config:
        qk_ratio: float = 0.5  # key/query head dim = qk_ratio x value head dim (d_model / n_heads)
        decay_norm: float = 16.0  # tau: log alpha = logsigmoid(W_a x) / tau (slow decays at init)
        output_gate: bool = True  # silu(W_g x~) * LN(o) (the paper's)
        conv: int = 4  # short causal conv size on the input (0: none)
        chunk: int = 64  # chunk length of the chunked (training / prefill) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)

        def __post_init__(self):
            from lmtk.errors import UserError

            check_knobs("metala", self.chunk, self.conv, self.kernel)
            if self.qk_ratio <= 0:
                raise UserError(f"model.mixer.qk_ratio={self.qk_ratio} for mixer metala: must be > 0")
            if self.decay_norm <= 0:
                raise UserError(f"model.mixer.decay_norm={self.decay_norm} for mixer metala: must be > 0")

    def __init__(self, cfg, layer: int):
        super().__init__()
        from lmtk.errors import UserError

        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        d = cfg.d_model
        self.n_heads = H = cfg.n_heads
        self.dv = Dv = split_heads("metala", d, H, "value")
        self.dk = Dk = int(round(c.qk_ratio * Dv))
        if Dk <= 0:
            raise UserError(f"model.mixer.qk_ratio={c.qk_ratio} gives key heads of {Dk} channels")
        self.tau, self.chunk, self.kernel = c.decay_norm, c.chunk, c.kernel
        self.conv = short_conv("metala", d, c.conv)
        self.q_proj = nn.Linear(d, H * Dk, bias=cfg.bias)
        self.a_proj = nn.Linear(d, H * Dk, bias=cfg.bias)  # the decay (and through it the key)
        self.v_proj = nn.Linear(d, H * Dv, bias=cfg.bias)
        self.gate = nn.Linear(d, H * Dv, bias=True) if c.output_gate else None  # W_g
        self.mu = nn.Parameter(torch.zeros(H, Dk))  # self-augmentation weights
        self.out = nn.Linear(H * Dv, d, bias=cfg.bias)
        self.out.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        nn.init.zeros_(self.mu)

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        H = self.n_heads
        S0, conv0 = state if state is not None else (None, None)
        (xc,), conv1 = self.convolve([x], conv0, decode)
        q, a, v = (self.heads(p(xc), H) for p in (self.q_proj, self.a_proj, self.v_proj))
        g = F.logsigmoid(a.float()) / self.tau  # log alpha_t, [B, H, T, Dk]
        k = -torch.expm1(g)  # 1 - alpha_t
        o, S = self.recur(q, k.to(q.dtype), v, g, S0, decode)
        score = (q * (self.mu.to(q.dtype).unsqueeze(1) * k.to(q.dtype))).sum(-1, keepdim=True)  # q_t . mu (1 - alpha_t)
        o = o + torch.sigmoid(score * v)  # self-augmentation
        o = F.layer_norm(o, (o.shape[-1],))  # per head, no affine
        return self.gated_out(self.merge(o), xc, S, conv1, decode)  # the gate reads x~

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's q, v, o shapes (distill.init=qkv_copy)."""
        return {"qk_ratio": 1.0}

    def attention_slots(self):
        # key-free: k = 1 - alpha is the decay's, which stays fresh
        return {"q": Slot(self.q_proj, self.n_heads, self.dk), "v": Slot(self.v_proj, self.n_heads, self.dv),
                "o": Slot(self.out, self.n_heads, self.dv)}

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops with the key dim Dk and value dim Dv: 12 H Dk Dv per token."""
        return self.recurrence_flops(self.n_heads, self.dk, self.dv)

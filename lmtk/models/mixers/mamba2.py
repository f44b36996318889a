"""Mamba-2's SSD layer (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060) on the shared
gated linear recurrence (recurrence.py).

    [z, x, B, C, dt~] = in_proj(u)                      x, z: [E = expand * d_model]; B, C: [N]
    [x, B, C] = silu(conv1d([x, B, C]))                 short causal depthwise conv
    dt_t = softplus(dt~_t + dt_bias),  a_t = exp(-exp(A_log) dt_t)          one decay per head
    h_t = a_t h_{t-1} + B_t (dt_t x_t)^T                 per head: h [N, P], x_t's head slice [P]
    y_t = h_t^T C_t + D x_t
    out = out_proj(RMSNorm(y * silu(z)))                 the gated norm, over all E channels
                                                        (output_gate: false drops z: RMSNorm(y))

As the op: q = C, k = B (one group by default: shared by every head, passed as one head
[B, 1, T, N] that the op broadcasts, so C B^T is computed once per chunk, not per head; with
`groups` G > 1, as the paper's ngroups, heads h of group h // (H / G) share theirs; G = H is
attention's shape, which distillation copies a teacher's queries and keys into), v = dt * x, g = -exp(A_log) dt
(a scalar per head and step, [B, H, T]); no q scaling. Heads: H = E / head_dim. A's and dt's
initial spectra are the paper's (common.MambaDecay: A ~ U[1, 16], dt log-uniform in
[1e-3, 1e-1]); D starts at 1. Decoding state: (h [B, H, N, P], conv state).

State expansion (StateX, Shen et al. 2025, arXiv:2509.22630; `lmtk finetune
model.mixer.state_expand=f`): N grows f-fold, so each head's state h [N, P] does; a trained model
widened by widen_state_from() computes what it did before (its new B rows write state that its
zero new C rows do not read yet)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lmtk.errors import UserError
from lmtk.models.mixers.common import (GatedRMSNorm, Slot, MambaDecay, RecurrentMixer, check_knobs, check_state_expand, head_size,
                                      short_conv)


class Mamba2(RecurrentMixer):
    silu_without_conv = True  # [x, B, C] = silu([x, B, C]) when model.mixer.conv=0

    @dataclass
    class Config:
        expand: int = 2  # inner width E = expand * d_model (x, z)
        head_dim: Optional[int] = None  # P, channels per head; null: E / model.n_heads
        d_state: int = 64  # N, the state size (B, C)
        groups: int = 1  # G: B and C per group of heads (the paper's ngroups; dividing the heads)
        output_gate: bool = True  # the norm's gate silu(z) (z from in_proj; the paper's)
        conv: int = 4  # short causal conv size on x, B, C (0: none)
        chunk: int = 64  # chunk length of the chunked (training / prefill) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)
        state_expand: int = 1  # StateX: the state is N = state_expand x d_state per group; set by lmtk finetune

        def __post_init__(self):
            from lmtk.errors import UserError

            check_knobs("mamba2", self.chunk, self.conv, self.kernel)
            check_state_expand("mamba2", self.state_expand)
            if self.expand < 1 or self.d_state < 1:
                raise UserError(f"model.mixer.expand={self.expand}, d_state={self.d_state} for mixer mamba2: both must be >= 1")

    def __init__(self, cfg, layer: int):
        super().__init__()
        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        self.d_inner = E = c.expand * cfg.d_model
        self.n_heads, self.head_dim = head_size("mamba2", E, c.head_dim, cfg.n_heads, "inner (expand * d_model)")
        self.d_state, self.chunk, self.kernel = c.d_state * c.state_expand, c.chunk, c.kernel
        H, N, G = self.n_heads, self.d_state, c.groups
        if G < 1 or H % G:
            raise UserError(f"model.mixer.groups={G} for mixer mamba2: must divide its {H} heads")
        self.groups = G
        self.z_width = E if c.output_gate else 0
        self.gate = None  # the gate's z is z_width more outputs of the fused projection, not a module
        self.in_proj = nn.Linear(cfg.d_model, self.z_width + E + 2 * G * N + H, bias=cfg.bias)  # [z, x, B, C, dt~]
        self.conv = short_conv("mamba2", E + 2 * G * N, c.conv)
        self.decay = MambaDecay(H)
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(E, E, norm_before_gate=False)
        self.out_proj = nn.Linear(E, cfg.d_model, bias=cfg.bias)
        self.out_proj.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        self.decay.init_weights()
        nn.init.ones_(self.D)

    def forward(self, u, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        Bsz, T, _ = u.shape
        E, N, H, P = self.d_inner, self.d_state, self.n_heads, self.head_dim
        h0, conv0 = state if state is not None else (None, None)
        G = self.groups
        z, xBC, dt = self.in_proj(u).split([self.z_width, E + 2 * G * N, H], dim=-1)
        (x, Bm, Cm), conv1 = self.convolve(list(xBC.split([E, G * N, G * N], dim=-1)), conv0, decode)
        g, dt = self.decay(dt)  # [B, T, H]
        xh = x.unflatten(-1, (H, P))  # [B, T, H, P]
        v = (xh * dt.unsqueeze(-1).to(x.dtype)).transpose(1, 2)  # [B, H, T, P]
        # one group: B and C shared by every head, passed once ([B, 1, T, N]; the op broadcasts them);
        # G groups: each head gets its group's ([B, H, T, N])
        Cm, Bm = (self.heads(t, G).repeat_interleave(H // G, dim=1) if G > 1 else t.unsqueeze(1) for t in (Cm, Bm))
        y, h = self.recur(Cm, Bm, v, g.transpose(1, 2), h0, decode)
        y = y.transpose(1, 2) + xh * self.D.to(x.dtype).unsqueeze(-1)  # D skip
        y = self.norm(y.flatten(2), z if self.z_width else None)
        return self.drop(self.out_proj(y)), ((h, conv1) if decode else None)

    @torch.no_grad()
    def widen_state_from(self, base: "Mamba2") -> None:
        """StateX's expansion with the function kept: `base`'s weights into this mixer, which has
        base's knobs and an f times larger N. Per group the state rows are [base's N | new (f-1) N]:
        B's and C's old rows are copied; the new C rows are zero, so y_t = h_t^T C_t reads nothing
        of the new state, while the new B rows keep this mixer's fresh init (so the new state fills
        and C's new rows get a gradient; zero B rows as well would stay at a saddle). The decay is
        per head, not per state row, so nothing about it changes. The short conv's new channels
        take their old channel's taps, C's with a zero bias (silu(0) = 0). z, x, dt, the decay, D,
        the norm and out_proj are unchanged."""
        zx, G, N, n = self.z_width + self.d_inner, self.groups, base.d_state, self.d_state
        f = n // N

        def rows(new, old, fill):  # [G n, ...] <- [G N, ...], base's rows first in each group; new: fill
            w, o = new.unflatten(0, (G, n)), old.unflatten(0, (G, N))  # views: writing w writes `new`
            w[:, :N] = o
            if fill == "zero":
                w[:, N:] = 0
            elif fill == "copy":
                w[:, N:] = o.repeat(1, f - 1, *([1] * (o.dim() - 2)))

        for what in ("weight", "bias"):
            p, q = getattr(self.in_proj, what), getattr(base.in_proj, what)
            if p is None:
                continue
            pz, pB, pC, pdt = p.split([zx, G * n, G * n, self.n_heads])
            qz, qB, qC, qdt = q.split([zx, G * N, G * N, self.n_heads])
            pz.copy_(qz)
            pdt.copy_(qdt)
            rows(pB, qB, "fresh")
            rows(pC, qC, "zero")
        if self.conv is not None:  # channels [x, B, C]
            for what, c_fill in (("weight", "copy"), ("bias", "zero")):
                px, pB, pC = getattr(self.conv, what).split([self.d_inner, G * n, G * n])
                qx, qB, qC = getattr(base.conv, what).split([self.d_inner, G * N, G * N])
                px.copy_(qx)
                rows(pB, qB, "copy")
                rows(pC, qC, c_fill)
        for name, p in self.named_parameters():
            if not name.startswith(("in_proj.", "conv.")):
                p.copy_(base.get_parameter(name))

    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict:
        """The knobs that give it attention's shapes (distill.init=qkv_copy): heads of attention's
        size, N = its head dim, B and C per head (C holds a query head, B its key/value head's key)."""
        return {"expand": 1, "head_dim": None, "d_state": tcfg.d_model // tcfg.n_heads, "groups": tcfg.n_heads}

    def attention_slots(self):
        # Mamba-in-the-Llama's map: C <- q, B <- k, x <- v (B, C in groups; attention's shape: a group per head)
        H, P, N, G, E, z = self.n_heads, self.head_dim, self.d_state, self.groups, self.d_inner, self.z_width
        return {"v": Slot(self.in_proj, H, P, z), "k": Slot(self.in_proj, G, N, z + E), "q": Slot(self.in_proj, G, N, z + E + G * N),
                "o": Slot(self.out_proj, H, P)}

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops with Dk = N, Dv = P: 12 H N P per token."""
        return self.recurrence_flops(self.n_heads, self.d_state, self.head_dim)

"""Pieces the recurrent mixers mamba2, gdn, mlstm and metala share: Mamba-2's decay
parametrisation, the gated (per-group) RMSNorm, the short conv with its decoding state, the
choice of the op's form, and the FLOPs of a recurrence.

Which form of the op runs (recurrence.py / delta.py): training and prefill use `chunked`
(prefill with the carried state); decoding a single token (decode=True, T == 1) uses
`recurrent`, one O(Dk Dv) step per head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.errors import UserError
from lmtk.models.mixers import delta, recurrence
from lmtk.models.mixers.common import ShortConv


def heads(width: int, head_dim: int | None, n_heads: int, what: str) -> tuple[int, int]:
    """(number of heads, head dim) of a `width`-channel stream: head_dim None splits it into
    model.n_heads heads; a width the head dim does not divide is a one-line error."""
    hd = head_dim or width // n_heads
    if hd <= 0 or width % hd:
        raise UserError(f"{what}: width {width} is not a multiple of head_dim {hd} (set model.mixer.head_dim)")
    return width // hd, hd


class MambaDecay(nn.Module):
    """Mamba-2's data-dependent scalar decay per head (Dao & Gu 2024):

        dt_t = softplus(dt~_t + dt_bias)        g_t = -exp(A_log) * dt_t    (log-decay, <= 0)

    i.e. the decay exp(g_t) = exp(-A dt_t) of the discretised A with step dt_t. Initial spectra
    as in the paper: A ~ U[1, 16] (A_log = log A), dt ~ log-uniform on [1e-3, 1e-1] at dt~ = 0,
    i.e. dt_bias = softplus^{-1}(dt)."""

    def __init__(self, n_heads: int, a_range=(1.0, 16.0), dt_range=(1e-3, 1e-1)):
        super().__init__()
        self.a_range, self.dt_range = a_range, dt_range
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.a_range).log())
        lo, hi = (math.log(x) for x in self.dt_range)
        dt = torch.empty_like(self.dt_bias).uniform_(lo, hi).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)

    def forward(self, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dt~ [..., H] -> (g [..., H] in fp32, dt [..., H] in fp32)."""
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        return -self.A_log.float().exp() * dt, dt


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of `group` channels (per head: group = head dim) with a learned scale and
    an optional SiLU gate z: norm_before_gate (Gated DeltaNet): rms(o) * w * silu(z); else
    (Mamba-2): rms(o * silu(z)) * w."""

    def __init__(self, dim: int, group: int, norm_before_gate: bool = True, eps: float = 1e-6):
        super().__init__()
        self.group, self.norm_before_gate, self.eps = group, norm_before_gate, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is not None and not self.norm_before_gate:
            o = o * F.silu(z)
        o = F.rms_norm(o.unflatten(-1, (-1, self.group)), (self.group,), eps=self.eps).flatten(-2) * self.weight
        if z is not None and self.norm_before_gate:
            o = o * F.silu(z)
        return o


def make_conv(channels: int, size: int) -> ShortConv | None:
    """The short causal conv (with SiLU) of `size` taps; None for size 0 (no conv)."""
    if size < 0:
        raise UserError(f"model.mixer.conv={size}: the short conv's size must be >= 0 (0: none)")
    return ShortConv(channels, size) if size > 0 else None


def conv(module: ShortConv | None, x: torch.Tensor, state, decode: bool):
    """(silu(conv(x)), new conv state); without a conv just the SiLU (and no state)."""
    if module is None:
        return F.silu(x), None
    return module(x, state, decode)


def step_or_chunk(q, k, v, g, *, chunk: int, state, decode: bool, scale: float = 1.0):
    """The gated linear recurrence (recurrence.py): `recurrent` for one decoded token, else `chunked`."""
    if decode and q.shape[2] == 1:
        return recurrence.recurrent(q, k, v, g, state=state, scale=scale)
    return recurrence.chunked(q, k, v, g, chunk=chunk, state=state, scale=scale)


def delta_step_or_chunk(q, k, v, beta, g, *, chunk: int, state, decode: bool, scale: float = 1.0):
    """The gated delta rule (delta.py): `recurrent` for one decoded token, else `chunked` (WY)."""
    if decode and q.shape[2] == 1:
        return delta.recurrent(q, k, v, beta, g, state=state, scale=scale)
    return delta.chunked(q, k, v, beta, g, chunk=chunk, state=state, scale=scale)


def recurrence_flops(n_heads: int, dk: int, dv: int, delta_rule: bool = False) -> float:
    """Training FLOPs per token of the recurrence (fwd + bwd = 3 x fwd, as for attention's 12 H Dh
    T): per head the state update S += k v^T (2 Dk Dv) and the readout S^T q (2 Dk Dv), plus the
    delta rule's prediction S^T k (2 Dk Dv): 12 H Dk Dv, or 18 H Dk Dv for the delta rule. The
    decay's elementwise product and the chunked form's intra-chunk terms are not counted: like
    attention's formula this is the recurrence's intrinsic work, not one kernel's."""
    return 3 * (6 if delta_rule else 4) * n_heads * dk * dv


def check_causal(causal: bool, name: str) -> None:
    if not causal:
        raise ValueError(f"the {name} mixer is causal only (causal_only = True): it has no bidirectional reading")

"""xLSTM's mLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", arXiv 2405.04517)
on the shared gated linear recurrence (recurrence.py).

The cell (per head; i~, f~ the gate pre-activations, k scaled by 1/sqrt(Dk)):

    C_t = f_t C_{t-1} + i_t v_t k_t^T          i_t = exp(i~_t)     (exponential input gate)
    n_t = f_t n_{t-1} + i_t k_t                f_t = sigmoid(f~_t) or exp(f~_t)  (forget_gate)
    h_t = C_t q_t / max(|n_t^T q_t|, 1)

exp(i~) overflows, so the paper carries a stabiliser m_t and the scaled states C'_t = C_t e^{-m_t},
n'_t = n_t e^{-m_t}:

    m_t  = max(log f_t + m_{t-1}, i~_t)                                      (m_0 = 0)
    i'_t = exp(i~_t - m_t) <= 1,    f'_t = exp(log f_t + m_{t-1} - m_t) <= 1
    C'_t = f'_t C'_{t-1} + i'_t v_t k_t^T,    n'_t = f'_t n'_{t-1} + i'_t k_t
    h_t  = C'_t q_t / (max(|n'_t^T q_t|, exp(-m_t)) + eps)                   (eps = 1e-6, as xLSTM)

As the op: g = log f'_t (a scalar per head and step, <= 0), k = i'_t k_t / sqrt(Dk) (the input
gate and the key's scale folded into k; q unscaled), v = [v_t, 1] (a ones column appended: the
op's state is then [C'^T, n'] and one call reads out both C'_t q_t and n'_t^T q_t). Every
exponent the op takes is therefore <= 0.

How the chunked form is stabilised: m is solved chunk by chunk in closed form. With b_i the
cumulative log f inside a chunk (chunk-local, so bounded by the chunk's length) and m_s the
stabiliser before the chunk,

    m_i = b_i + max(m_s, max_{j<=i} (i~_j - b_j))

one cumsum and one cummax per chunk (all chunks at once); only m_s is handed from chunk to chunk
in a loop over chunks, like the op's state. This is exactly the per-step m_t of the paper (so the
states equal the paper's stabilised C', n', m), computed without a sequential loop over steps and
without cumsums over the whole sequence (whose rounding would grow with T). The op's inputs are
formed from the same chunk-local numbers: with M_i = m_i - b_i (non-decreasing in the chunk),
log f'_i = M_{i-1} - M_i and log i'_i = (i~_i - b_i) - M_i, both exactly <= 0 and free of the
rounding of m itself (m grows without bound under the exponential forget gate). h does not
depend on the choice of m (numerator and both sides of the max scale by e^{-m}), so m is a
constant to autograd (see `mlstm_cell`). Decoding state: (state [B, H, Dk, Dv + 1] = [C'^T, n'], m [B, H], conv state).

The layer around the cell is the paper's mLSTM block: up-projection by `expand` into x and z,
short conv + SiLU on x, q and k from the conv output and v from x through block-diagonal
projections (blocks of `qkv_block`), i~ and f~ from [q, k, v], per-head norm of h (RMS here),
a learnable skip of the conv output, the SiLU(z) output gate and the down-projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmtk.errors import UserError
from lmtk.models.mixers import recurrence
from lmtk.models.mixers.common import GatedRMSNorm, RecurrentMixer, check_knobs, head_size, short_conv
from lmtk.models.mixers.recurrence import CHUNK, compute_dtype

EPS = 1e-6  # added to the normaliser (xLSTM's eps)
FORGET_GATES = ("sigmoid", "exp")
GROUP_WIDTH = 16  # BlockLinear's dense group width (its forward)
# Fewer rows than this (decoding steps) take the direct forms: BlockLinear's 4x4 blocks as they are
# and the gates on the concatenation, where forming the grouped or folded weights costs more
FEW_ROWS = 64


def stabiliser(logf: Tensor, logi: Tensor, m0: Tensor, chunk: int = CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """m_t = max(logf_t + m_{t-1}, logi_t) for all t, chunk by chunk in closed form (module
    docstring), with log f'_t and log i'_t computed from chunk-local quantities: with
    M_i = max(m_s, max_{j<=i} (i~_j - b_j)) (so m_i = b_i + M_i),

        log f'_i = M_{i-1} - M_i   (M_{-1} = m_s)        log i'_i = (i~_i - b_i) - M_i

    M is non-decreasing inside a chunk, so both are exactly <= 0, and they are differences of
    chunk-local numbers rather than of m's (which grow without bound under an exponential forget
    gate: their rounding, ~1e-7 |m| a step, would otherwise enter every decay).
    logf, logi [B, H, T], m0 [B, H] -> (m, log f', log i'), each [B, H, T]; no gradient."""
    T = logf.shape[-1]
    C = max(1, min(chunk, T))
    N = -(-T // C)
    pad = N * C - T  # padding: log f = 0, i~ = -inf leave m unchanged
    b = F.pad(logf, (0, pad)).unflatten(-1, (N, C)).cumsum(-1)  # [B, H, N, C]
    x = F.pad(logi, (0, pad), value=float("-inf")).unflatten(-1, (N, C)) - b  # i~_j - b_j
    a = x.cummax(-1).values
    starts, m_s = [], m0
    for b_n, a_n in zip(b.unbind(-2), a.unbind(-2)):
        starts.append(m_s)
        m_s = b_n[..., -1] + torch.maximum(m_s, a_n[..., -1])
    Ms = torch.stack(starts, dim=-1).unsqueeze(-1)  # [B, H, N, 1]: m before each chunk
    M = torch.maximum(Ms, a)
    logf_s = torch.cat([Ms, M[..., :-1]], dim=-1) - M
    logi_s = x - M
    return tuple(t.flatten(-2)[..., :T] for t in (b + M, logf_s, logi_s))


def mlstm_cell(q: Tensor, k: Tensor, v: Tensor, logi: Tensor, logf: Tensor, *, chunk: int = CHUNK,
               state=None, decode: bool = False, eps: float = EPS, recur=None):
    """The stabilised mLSTM cell through the op. q, k [B, H, T, Dk], v [B, H, T, Dv], logi = i~ and
    logf = log f [B, H, T], state None or (S [B, H, Dk, Dv + 1], m [B, H]) ->
    (h [B, H, T, Dv], (S, m)). Chunked form, or the step form for one token when `decode`; `recur`:
    the op's form choice (RecurrentMixer.recur, which may take fla's kernel), None: recurrence.py's.

    Gradients: h is invariant to m, so m is a constant to autograd; log f'_t = log f_t + m_{t-1}
    - m_t and log i'_t = i~_t - m_t then have derivative 1 in log f_t and i~_t. The values come
    from `stabiliser` (exact <= 0), the derivative through a detached offset."""
    B, H, T, Dk = q.shape
    cdt = compute_dtype(q.dtype)
    logi, logf = logi.to(cdt), logf.to(cdt)
    S0, m0 = state if state is not None else (None, logf.new_zeros(B, H))
    with torch.no_grad():
        m, logf_s, logi_s = stabiliser(logf, logi, m0.to(cdt), chunk)
    g = logf + (logf_s - logf).detach()  # log f'_t, value from stabiliser, d/dlog f = 1
    g = g - g.detach().clamp(min=0.0)  # the rounding of the line above may leave +1 ulp
    li = logi + (logi_s - logi).detach()  # log i'_t
    li = li - li.detach().clamp(min=0.0)
    k = k.to(cdt) * (li.exp() * Dk ** -0.5).unsqueeze(-1)  # i'_t k_t / sqrt(Dk), the paper's scaled key
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [v, 1]: the normaliser's column
    if recur is not None:
        o, S = recur(q, k, v, g, S0, decode)
    elif decode and T == 1:
        o, S = recurrence.recurrent(q, k, v, g, state=S0)
    else:
        o, S = recurrence.chunked(q, k, v, g, chunk=chunk, state=S0)
    num, qn = o[..., :-1], o[..., -1:]  # C'_t q_t and n'_t^T q_t
    h = num / (qn.abs().maximum((-m).exp().unsqueeze(-1).to(o.dtype)) + eps)
    return h, (S, m[..., -1] if T else m0)


class BlockLinear(nn.Module):
    """Block-diagonal linear map (xLSTM's q/k/v projections): independent `block` x `block`
    matrices on consecutive channel blocks. [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, block: int):
        super().__init__()
        if block <= 0 or dim % block:
            raise UserError(f"model.mixer.qkv_block={block} does not divide mlstm's inner width {dim}")
        self.block = block
        self.weight = nn.Parameter(torch.empty(dim // block, block, block))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.block ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        # Applied as G consecutive blocks at a time, each group one dense (G b) x (G b) block-diagonal
        # matrix (zeros between its blocks): on the CPU 16 matmuls of [T, 16] x [16, 16] run fwd+bwd
        # ~2x faster than 64 of [T, 4] x [4, 4] despite the zeros (same values: the zeros add 0).
        n, b = self.weight.shape[:2]
        if x.numel() < FEW_ROWS * x.shape[-1]:
            return torch.einsum("...ni,noi->...no", x.unflatten(-1, (n, b)), self.weight).flatten(-2)
        G = max((g for g in range(1, max(1, GROUP_WIDTH // b) + 1) if n % g == 0), default=1)
        w = self.weight.view(n // G, G, b, b)
        w = torch.einsum("gjoi,jk->gjoki", w, torch.eye(G, dtype=w.dtype, device=w.device)).reshape(n // G, G * b, G * b)
        return torch.einsum("...gi,goi->...go", x.unflatten(-1, (n // G, G * b)), w).flatten(-2)

    def fold(self, w: Tensor) -> Tensor:
        """w [R, dim] -> w' [R, dim] with x w'^T = self(x) w^T: a linear map after this one, as one
        map of this one's input."""
        n, b = self.weight.shape[:2]
        return torch.einsum("noi,rno->rni", self.weight, w.unflatten(-1, (n, b))).flatten(-2)


class MLSTM(RecurrentMixer):
    silu_without_conv = True  # x_c = silu(x) when model.mixer.conv=0

    @dataclass
    class Config:
        expand: int = 2  # inner width E = expand * d_model (the block's up-projection)
        head_dim: Optional[int] = None  # Dk = Dv; null: E / model.n_heads
        forget_gate: str = "sigmoid"  # sigmoid | exp: f_t = sigmoid(f~_t) or exp(f~_t)
        qkv_block: int = 4  # block size of the block-diagonal q/k/v projections (the paper's 4)
        output_gate: bool = True  # h * silu(z), z from the up-projection (the paper's)
        conv: int = 4  # short causal conv size on the up-projected x (0: none)
        chunk: int = 64  # chunk length of the chunked (training / prefill) form
        kernel: str = "auto"  # auto | torch | fla: the chunked form's kernel on CUDA (kernels.py)

        def __post_init__(self):
            check_knobs("mlstm", self.chunk, self.conv, self.kernel, forget_gate=(self.forget_gate, FORGET_GATES))
            if self.expand < 1:
                raise UserError(f"model.mixer.expand={self.expand} for mixer mlstm: must be >= 1")

    def __init__(self, cfg, layer: int):
        super().__init__()
        c = self.Config(**{k: v for k, v in cfg.mixer.items() if k != "name"})
        self.exp_forget, self.chunk, self.kernel = c.forget_gate == "exp", c.chunk, c.kernel
        self.d_inner = E = c.expand * cfg.d_model
        self.n_heads, self.head_dim = head_size("mlstm", E, c.head_dim, cfg.n_heads, "inner (expand * d_model)")
        H = self.n_heads
        self.z_width = E if c.output_gate else 0
        self.gate = None  # the gate's z is z_width more outputs of the fused projection, not a module
        self.up = nn.Linear(cfg.d_model, E + self.z_width, bias=cfg.bias)  # [x, z]
        self.conv = short_conv("mlstm", E, c.conv)
        self.q, self.k, self.v = (BlockLinear(E, c.qkv_block) for _ in range(3))
        self.gates = nn.Linear(3 * E, 2 * H)  # [i~, f~]; biases always (their init matters)
        self.norm = GatedRMSNorm(E, self.head_dim)  # per head, no gate
        self.skip = nn.Parameter(torch.ones(E))
        self.down = nn.Linear(E, cfg.d_model, bias=cfg.bias)
        self.down.is_residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """xLSTM's gate init: zero gate weights, input-gate biases ~ N(0, 0.1), forget-gate biases
        spread over the heads so that f = sigmoid(linspace(3, 6)) (both gate kinds start with
        those forget values: the exp gate's bias is their log)."""
        H = self.n_heads
        nn.init.zeros_(self.gates.weight)
        nn.init.normal_(self.gates.bias[:H], 0.0, 0.1)
        f = torch.linspace(3.0, 6.0, H)
        self.gates.bias[H:] = F.logsigmoid(f) if self.exp_forget else f
        for proj in (self.q, self.k, self.v):
            proj.init_weights()
        nn.init.ones_(self.skip)

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False):
        self.check_causal(causal)
        H, E = self.n_heads, self.d_inner
        cell0, m0, conv0 = state if state is not None else (None, None, None)
        xm, z = self.up(x).split([E, self.z_width], dim=-1)
        (xc,), conv1 = self.convolve([xm], conv0, decode)
        q, k, v = self.q(xc), self.k(xc), self.v(xm)
        if type(self.gates) is nn.Linear and x.shape[0] * x.shape[1] >= FEW_ROWS:
            # [i~, f~] = W [q, k, v] + b with W's three parts folded through the (linear) block
            # projections: two [T, E] x [E, 2H] products of xc and xm, not one on a [T, 3E] concatenation
            wq, wk, wv = self.gates.weight.split(E, dim=1)
            gates = F.linear(xc, self.q.fold(wq) + self.k.fold(wk), self.gates.bias) + F.linear(xm, self.v.fold(wv))
        else:  # decoding steps, or an adapted gate layer (e.g. LoRA) that computes its own map
            gates = self.gates(torch.cat([q, k, v], dim=-1))
        ig, fg = gates.float().transpose(1, 2).split([H, H], dim=1)
        logf = fg if self.exp_forget else F.logsigmoid(fg)
        h, (S, m) = mlstm_cell(self.heads(q, H), self.heads(k, H), self.heads(v, H), ig, logf, chunk=self.chunk,
                               decode=decode, state=None if cell0 is None else (cell0, m0), recur=self.recur)
        h = torch.addcmul(self.norm(self.merge(h)), self.skip, xc)  # + skip * x_c
        y = self.down(self.gated(h, z if self.z_width else None))
        return self.drop(y), ((S, m, conv1) if decode else None)

    def flops_per_token(self, seq_len: int) -> float:
        """recurrence_flops with Dk = P and Dv = P + 1 (the normaliser's column): 12 H P (P + 1)."""
        return self.recurrence_flops(self.n_heads, self.head_dim, self.head_dim + 1)

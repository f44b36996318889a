"""The gated delta rule (Gated DeltaNet; DeltaNet when g is None). Per batch element and head:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

i.e. decay the state, then take one step of online regression of v_t on k_t with step size
beta_t: with S' = exp(g_t) S_{t-1}, S_t = S' + k_t u_t^T where u_t = beta_t (v_t - S'^T k_t) is the
"new value" (the part of v_t the decayed state does not already predict). k is L2-normalised by
the caller and beta_t in (0, 1), so (I - beta_t k_t k_t^T) is a contraction.

Shapes (head-first, as in recurrence.py): q, k [B, H, T, Dk], v [B, H, T, Dv], beta [B, H, T],
g None (plain DeltaNet), [H] or [B, H, T] (one log-decay <= 0 per head and step; a size-1 batch
dimension broadcasts), state [B, H, Dk, Dv]. Each form returns (o [B, H, T, Dv], final state).

Chunked form (WY / UT representation, Yang et al. 2024). Inside a chunk with start state S_0,
position i = 0..C-1, b_i = sum_{t<=i} g_t and gamma_i = exp(b_i), unrolling the recurrence gives

    S_i = gamma_i S_0 + sum_{j<=i} exp(b_i - b_j) k_j u_j^T
    u_i = beta_i v_i - beta_i gamma_i S_0^T k_i - sum_{j<i} beta_i exp(b_i - b_j) (k_i . k_j) u_j

so the u's of a chunk solve one unit lower-triangular system. With
A[i, j] = beta_i exp(b_i - b_j) (k_i . k_j) for j < i (0 elsewhere) and T = (I + A)^{-1}:

    U = T (beta * V) - T (beta * gamma * K) S_0  =  U~ - W S_0

U~ [C, Dv] and W [C, Dk] depend only on the chunk's own inputs, so they are computed for all
chunks at once (T explicit: one batched triangular solve against I, then matmuls, forward and
back). The hand-off

    S_C = gamma_{C-1} S_0 + sum_j exp(b_{C-1} - b_j) k_j u_j^T = M S_0 + c,
    M = gamma_{C-1} I - K_d^T W,   c = K_d^T U~          (K_d: rows exp(b_{C-1} - b_j) k_j)

is affine in S_0 with M, c from one product K_d^T [U~, W] for all chunks at once, so the loop over
chunks is one fused matmul-add per chunk (an autograd Function whose backward is the adjoint
scan); then, with P[i, j] = exp(b_i - b_j) (q_i . k_j) for j <= i,

    o_i = gamma_i (q_i^T S_0) + sum_{j<=i} P[i, j] u_j,   i.e.   O = P U~ + (gamma Q - P W) S_0

batched over all chunks (P [U~, W] one product; the u's are never formed). All decay exponents
are segment sums of g's (<= 0), computed as in recurrence.py, so strong decays underflow rather
than overflow. Cost per chunk: O(C^2 (Dk + Dv) + C^3) for the solve; memory O(C^2) per chunk.

`recurrent` is the step form for decoding; `naive` writes the first equation out literally
(explicit identity matrix) for tests. Compute is fp32 (fp64 for fp64 inputs); o comes back in q's
dtype, the state in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtk.models.mixers.recurrence import CHUNK, compute_dtype, decay_mask, log_decay, pad_time, suffix_sum


def _scalar_decay(g: Tensor | None, B: int, H: int, T: int, dtype: torch.dtype) -> Tensor | None:
    """g None / [H] / [B, H, T] -> None or [B|1, H, T, 1]."""
    if g is not None and g.dim() == 4:
        raise ValueError("the delta rule takes one log-decay per head and step: g [H] or [B, H, T]")
    return log_decay(g, B, H, T, 1, dtype)


class _UnitLowerSolve(torch.autograd.Function):
    """X = (I + A)^{-1} R for strictly lower-triangular A [..., C, C] and R [..., C, D], through the
    explicit inverse T = (I + A)^{-1} (one batched trsm against I, no gradient): the solve and its
    backward are then batched matmuls, dR = T^T dX and dA = -tril_{-1}(dR X^T). LAPACK's batched
    trsm on 32 x 32 systems runs at a few GFLOP/s on the CPU, and autograd's backward of
    solve_triangular is another trsm (the layer's fwd+bwd spent ~10% in them at L = 4096)."""

    @staticmethod
    def forward(ctx, A: Tensor, R: Tensor) -> Tensor:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
        X = Tinv @ R
        ctx.save_for_backward(Tinv, X)
        return X

    @staticmethod
    def backward(ctx, dX: Tensor):
        Tinv, X = ctx.saved_tensors
        dR = Tinv.transpose(-1, -2) @ dX
        dA = -(dR @ X.transpose(-1, -2)).tril(-1) if ctx.needs_input_grad[0] else None
        return dA, dR


class _AffineScan(torch.autograd.Function):
    """The chunk-to-chunk hand-off S_{n+1} = M_n S_n + c_n along dim 1: M [B, N, Dk, Dk],
    c [B, N, Dk, Dv], S_0 [B, Dk, Dv] -> (every chunk's start state [B, N, Dk, Dv], S_N). One
    baddbmm a chunk each way: the backward is the adjoint scan G_n = M_n^T G_{n+1} + dS_n
    (dc_n = G_{n+1}), with dM_n = G_{n+1} S_n^T for all chunks in one batched product afterwards,
    rather than autograd's two products and an add per chunk."""

    @staticmethod
    def forward(ctx, M: Tensor, c: Tensor, S0: Tensor):
        starts = c.new_empty(c.shape)
        S = S0
        for n in range(c.shape[1]):
            starts[:, n] = S
            S = torch.baddbmm(c[:, n], M[:, n], S)
        ctx.save_for_backward(M, starts)
        return starts, S

    @staticmethod
    def backward(ctx, dstarts: Tensor, dS: Tensor):
        M, starts = ctx.saved_tensors
        dc = torch.empty_like(starts)  # dc_n = G_{n+1}, the gradient of S_{n+1}
        G = dS
        for n in range(M.shape[1] - 1, -1, -1):
            dc[:, n] = G
            G = torch.baddbmm(dstarts[:, n], M[:, n].transpose(-1, -2), G)
        dM = dc @ starts.transpose(-1, -2) if ctx.needs_input_grad[0] else None
        return dM, dc, G


def chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    chunk: int = CHUNK,
    state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form (see the module docstring). T need not be a multiple of `chunk`: the
    tail is zero-padded (beta = 0 and g = 0 there leave the state unchanged)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    g = _scalar_decay(g, B, H, T, cdt)
    S = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if state is None else state.to(cdt)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv, dtype=out_dtype), S
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    q, k, v = (pad_time(x.to(cdt), pad).unflatten(2, (N, C)) for x in (q, k, v))  # [B, H, N, C, D]
    q = q * scale
    beta = pad_time(beta.to(cdt).unsqueeze(-1), pad).unflatten(2, (N, C))  # [B, H, N, C, 1]

    if g is None:
        L = torch.ones(C, C, dtype=cdt, device=q.device).tril()  # causal mask, diagonal included
        gamma, kd, decay = None, k, None
    else:
        g = pad_time(g, pad).unflatten(2, (N, C))  # [B|1, H, N, C, 1]
        L = decay_mask(g.squeeze(-1))  # L[i, j] = exp(b_i - b_j) for j <= i, else 0
        gamma = g.cumsum(-2).exp()  # exp(b_i)
        kd = k * suffix_sum(g).exp()  # k_j exp(b_{C-1} - b_j)
        decay = g.sum(-2).exp().unsqueeze(-1)  # [B|1, H, N, 1, 1]: gamma_{C-1}
    A = (beta * (k @ k.transpose(-1, -2)) * L).tril(-1)
    rhs = torch.cat([beta * v, beta * k if gamma is None else beta * gamma * k], dim=-1)
    sol = _UnitLowerSolve.apply(A, rhs)  # [U~, W]: [B, H, N, C, Dv + Dk]
    P = (q @ k.transpose(-1, -2)) * L  # intra-chunk scores, causal with decays
    qg = q if gamma is None else q * gamma

    # Sequential only in the chunk start state S, as one affine map per chunk: with the chunk's
    # pseudo-values u = U~ - W S_0,
    #     S_C = gamma_{C-1} S_0 + K_d^T u = (gamma_{C-1} I - K_d^T W) S_0 + K_d^T U~ = M S_0 + c
    # (K_d: the keys decayed to the chunk end). M [Dk, Dk] (the chunk's transition, a product of
    # contractions) and c come from one product K_d^T [U~, W] batched over all chunks; then the
    # scan (_AffineScan), over [B*H, N, ., .] views.
    c, KW = (kd.transpose(-1, -2) @ sol).split([Dv, Dk], -1)
    M = torch.eye(Dk, dtype=cdt, device=q.device) * (1.0 if decay is None else decay) - KW
    starts, S = _AffineScan.apply(M.reshape(B * H, N, Dk, Dk), c.reshape(B * H, N, Dk, Dv), S.reshape(B * H, Dk, Dv))
    starts = starts.view(B, H, N, Dk, Dv)
    # o = gamma q^T S_0 + P u = P U~ + (gamma q - P W) S_0: P [U~, W] in one product, and the
    # pseudo-values u themselves are never formed
    PU, PW = (P @ sol).split([Dv, Dk], -1)
    o = (PU + (qg - PW) @ starts).flatten(2, 3)[:, :, :T]
    return o.to(out_dtype), S.view(B, H, Dk, Dv)


def recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Step form (decoding): decay, predict, correct by the new value, read out; O(Dk Dv) a step."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    g = _scalar_decay(g, B, H, T, cdt)
    S = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if state is None else state.to(cdt)
    q, k, v, beta = q.to(cdt) * scale, k.to(cdt), v.to(cdt), beta.to(cdt)
    decay = [None] * T if g is None else g.exp().unsqueeze(-1).unbind(2)  # T x [B|1, H, 1, 1]
    outs = []
    for qt, kt, vt, bt, dt in zip(q.unbind(2), k.unbind(2), v.unbind(2), beta.unbind(2), decay):
        if dt is not None:
            S = S * dt
        u = bt[..., None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qt, S))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv, dtype=cdt)
    return o.to(out_dtype), S


def naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Reference for tests: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T (scale q_t), matrices written out. Same shapes as `chunked`."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    if g is None:
        g = torch.zeros(B, H, T, dtype=cdt, device=q.device)
    elif g.dim() == 1:
        g = g[None, :, None].expand(B, H, T)
    g, beta = g.to(cdt).expand(B, H, T), beta.to(cdt)
    I = torch.eye(Dk, dtype=cdt, device=q.device)
    S = torch.zeros(B, H, Dk, Dv, dtype=cdt, device=q.device) if state is None else state.to(cdt)
    o = []
    for t in range(T):
        kt, vt, qt = k[:, :, t, :, None].to(cdt), v[:, :, t, :, None].to(cdt), q[:, :, t, :, None].to(cdt)
        bt, at = beta[:, :, t, None, None], g[:, :, t, None, None].exp()
        S = at * (I - bt * kt @ kt.transpose(-1, -2)) @ S + bt * kt @ vt.transpose(-1, -2)
        o.append(S.transpose(-1, -2) @ (scale * qt))
    o = torch.cat(o, dim=-1).transpose(-1, -2) if o else torch.zeros(B, H, 0, Dv, dtype=cdt, device=q.device)
    return o.to(q.dtype), S

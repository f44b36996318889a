"""The gated linear recurrence that linear attention, RetNet, GLA, HGRN2, MetaLA, Mamba-2 and
mLSTM all parametrise. Per batch element and head, with a matrix-valued state S_t in R^{Dk x Dv}:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          (S_0 = the initial state, zeros by default)
    o_t = S_t^T (scale * q_t)

g_t <= 0 is the log-decay (decay factor exp(g_t) in (0, 1]). The mixers differ only in how they
produce q, k, v, g, hence in the shape of g:

    g = None            no decay: plain (causal) linear attention, S_t = S_{t-1} + k_t v_t^T
    g: [H]              one fixed decay per head (RetNet: g_h = log(1 - 2^(-5-h)))
    g: [B, H, T]        data-dependent scalar per head and step (Mamba-2, mLSTM's forget gate)
    g: [B, H, T, Dk]    data-dependent per key channel (GLA, HGRN2, MetaLA)

A size-1 batch dimension of g broadcasts over B. Layout is head-first throughout:
q, k [B, H, T, Dk], v [B, H, T, Dv], state [B, H, Dk, Dv], output o [B, H, T, Dv]. q and k may
instead be shared by every head, [B, 1, T, Dk] (Mamba-2's one group of B and C): they broadcast,
so the chunked form computes the intra-chunk q k^T once for all heads and applies each head's
decay mask to it, rather than computing and storing H copies (H is v's head count).

Three forms, all returning (o, final_state) and all taking an optional initial `state`:

  chunked    training form. Split T into chunks of C steps. With b_i = sum_{t<=i} g_t the
             cumulative log-decay inside a chunk (position i = 0..C-1, S_0 the state at its start):

                 o_i = (q_i * exp(b_i))^T S_0                            (inter-chunk, one matmul)
                     + sum_{j<=i} (q_i * exp(b_i - b_j))^T k_j  v_j      (intra-chunk, causal)
                 S_C = diag(exp(b_{C-1})) S_0 + sum_j (k_j * exp(b_{C-1} - b_j)) v_j^T

             The intra-chunk terms of all chunks are computed at once; only the state hand-off
             S_0 -> S_C is a Python loop over chunks. Every exponent above is a sum of g's over a
             stretch of steps, hence <= 0, and is exp'd as such (only the per-channel fast path
             below splits one into two bounded parts), so strong decays underflow to 0 rather
             than overflow; the pairwise sums b_i - b_j stay accurate too: for scalar decays they
             are differences of a chunk-local fp64 cumsum, rounded once to fp32 (decay_mask), and
             elsewhere segment sums (cumsums of masked g's, not differences of two large cumsums).
             Intra-chunk scores, by decay shape:
             - None / scalar: A = (Q K^T) * exp(b_i - b_j) masked causal: a [C, C] mask per chunk,
               cost like attention restricted to the chunk.
             - per channel, fast path: the decay cannot be pulled out of q.k, so factor it through
               a reference r = b_{C-1}/2 (half the chunk's decay, per channel):
               exp(b_i - b_j) = exp(b_i - r) exp(r - b_j), |b_i - r| <= |b_{C-1}|/2, and A is one
               matmul. Taken when every chunk decays by at most 2 * FACTOR_LIMIT in every channel
               (fp32: 60, e.g. a 32-step chunk averaging g >= -1.9; the naive q e^{b} . k e^{-b}
               split would overflow fp32 once |b| > ~88); if `chunk` is too long for that, the
               longest of chunk/2, chunk/4, ... (>= SUBCHUNK) that qualifies is used instead.
             - per channel, exact path, when no chunk length qualifies (any finite g; the path
               depends on the values of g: one host sync per call, and a graph break under
               torch.compile): cut the chunk into sub-chunks of c = SUBCHUNK steps (c = C when C
               is not a multiple of it). Inside a sub-chunk, the [c, c, Dk] pairwise decay
               tensor; between sub-chunks J < I the decay factorises through their boundaries,
               exp(b_i - b_j) = exp(b_i - e_{I-1}) exp(e_{I-1} - e_J) exp(e_J - b_j) (e_K = b at
               the end of sub-chunk K), each factor <= 1, so those blocks are matmuls. Memory per
               chunk O(C c Dk + (C/c) C Dk + C^2) instead of O(C^2 Dk).
  recurrent  step form for decoding (any T, typically T = 1): the equation above, one step at a
             time, O(Dk Dv) per step and head.
  naive      the equation written out literally (diag matrices and all), for tests only.

`scale` multiplies q (e.g. Dk**-0.5). Decays are handled in fp32 (fp64 when the inputs are
fp64); o is returned in q's dtype, the state stays in that fp32/fp64 compute dtype so that a
state carried across decoding steps does not round to bf16 each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Sub-chunk length for per-key-channel decays inside a chunk (see the module docstring).
SUBCHUNK = 8
# Per-channel fast path: exponents up to +-FACTOR_LIMIT are allowed (exp(30) ~ 1e13 leaves fp32
# ample headroom, and the rounding of b_i - r stays ~1e-6 relative).
FACTOR_LIMIT = {torch.float32: 30.0, torch.float64: 300.0}
# Default chunk length of the chunked form, by bench/recurrence.py (fwd+bwd, B=1 H=4 T=4096 D=32
# fp32, 1 CPU thread, vs causal SDPA): C=32 was fastest or tied for every decay shape and for the
# delta rule (C=16 / 32 / 64: scalar decay 0.10 / 0.10 / 0.14x attention, delta rule 0.32 / 0.25 /
# 0.27x), and it keeps the per-channel fast path for decays averaging down to g = -1.9 a step.
CHUNK = 32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64: decays are never handled in half."""
    return torch.promote_types(dtype, torch.float32)


def log_decay(g: Tensor | None, B: int, H: int, T: int, Dk: int, dtype: torch.dtype) -> Tensor | None:
    """Normalise g to 4-D [B or 1, H, T, 1 or Dk] in `dtype` (None stays None)."""
    if g is None:
        return None
    if g.dim() == 1:
        if g.shape[0] != H:
            raise ValueError(f"per-head log-decay g must be [H={H}], got {tuple(g.shape)}")
        return g.to(dtype).view(1, H, 1, 1).expand(1, H, T, 1)
    if g.dim() == 3:
        g = g.unsqueeze(-1)
    if g.dim() != 4 or g.shape[0] not in (1, B) or g.shape[1] != H or g.shape[2] != T or g.shape[3] not in (1, Dk):
        raise ValueError(
            f"log-decay g must be None, [H], [B, H, T] or [B, H, T, Dk] with B={B}, H={H}, T={T}, "
            f"Dk={Dk} (B may be 1), got {tuple(g.shape)}"
        )
    return g.to(dtype)


def _shape(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int]:
    """(B, H, T, Dk) of an op's inputs: H is v's head count; q and k have H heads or 1 (shared)."""
    B, H, T, _ = v.shape
    Dk = q.shape[-1]
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4 or x.shape[0] != B or x.shape[1] not in (1, H) or x.shape[2] != T or x.shape[3] != Dk:
            raise ValueError(f"{name} must be [B={B}, H={H} or 1, T={T}, Dk={Dk}] (v {tuple(v.shape)}), "
                             f"got {tuple(x.shape)}")
    return B, H, T, Dk


def segsum(x: Tensor) -> Tensor:
    """x [..., L, R] -> [..., L, L, R] with out[i, j] = sum_{t=j+1}^{i} x_t for j <= i (so the
    diagonal is 0) and -inf for j > i, i.e. exp(out) is the causal decay mask. Computed as a cumsum
    of masked copies of x rather than b_i - b_j, so no cancellation between large cumsums."""
    L = x.shape[-2]
    ones = torch.ones(L, L, dtype=torch.bool, device=x.device)
    xr = x.unsqueeze(-2).expand(*x.shape[:-1], L, x.shape[-1])  # [..., t, j, R] = x_t
    xr = xr.masked_fill(~torch.tril(ones, -1)[..., None], 0.0)  # keep t > j
    return xr.cumsum(-3).masked_fill(~torch.tril(ones)[..., None], float("-inf"))


# Scalar decays below this (per step) are clamped to it in the fp32 mask: exp(-1e4) is 0 even in
# fp64, so every value is unchanged, and the fp64 cumsum stays small enough (>= -1e4 C) to be exact.
MIN_LOG_DECAY = -1e4


class _ScalarDecayMask(torch.autograd.Function):
    """L = exp(segsum(g)) for one log-decay per step: g [..., C] -> L [..., C, C], L[i, j] =
    exp(b_i - b_j) for j <= i, 0 above (b: the chunk-local cumsum of g). In fp32 the exponents are
    differences of an fp64 cumsum, rounded once: exact to fp32 rounding and <= 0 (a cumsum of
    non-positive numbers never increases), with a backward of two reductions and a reverse cumsum,
    rather than segsum's masked [C, C] cumsum (several passes over [..., C, C] each way; the
    largest cost after the matmuls at chunk 64). fp64 inputs (tests' references) keep segsum."""

    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        b = g.clamp(min=MIN_LOG_DECAY).to(torch.float64).cumsum(-1)
        L = (b.unsqueeze(-1) - b.unsqueeze(-2)).to(g.dtype).exp_().tril_()  # (above: e^{>= 0}, zeroed)
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, dL: Tensor) -> Tensor:
        (L,) = ctx.saved_tensors
        dD = dL * L  # d/d(b_i - b_j)
        # summed in fp64: dg_s = sum_{t >= s} (row_t - col_t) cancels the pairs on both sides of s
        db = dD.sum(-1, dtype=torch.float64) - dD.sum(-2, dtype=torch.float64)
        return db.flip(-1).cumsum(-1).flip(-1).to(dL.dtype)  # dg_s = sum_{t >= s} db_t


def decay_mask(g: Tensor) -> Tensor:
    """exp(segsum) of scalar log-decays g [..., C] -> [..., C, C]: the causal decay mask of a chunk."""
    if g.dtype == torch.float64:
        return segsum(g.unsqueeze(-1)).squeeze(-1).exp()
    return _ScalarDecayMask.apply(g)


def suffix_sum(x: Tensor) -> Tensor:
    """Exclusive reverse cumsum along dim -2: out_j = sum_{t>j} x_t (shifted, not subtracted)."""
    rev = x.flip(-2).cumsum(-2).flip(-2)
    return torch.cat([rev[..., 1:, :], torch.zeros_like(rev[..., :1, :])], dim=-2)


def pad_time(x: Tensor, n: int) -> Tensor:
    """Zero-pad dim 2 (time) of a [B, H, T, ...] tensor by n steps at the end."""
    if n == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 3) + (0, n))


def _channel_chunk(g: Tensor, C: int) -> tuple[int, bool]:
    """Chunk length for per-channel decays g [B|1, H, T, Dk]: the largest of C, C/2, C/4, ...
    (>= SUBCHUNK) at which every chunk decays by at most 2 * FACTOR_LIMIT in every channel, with
    True (the fast path); else (C, False): the exact path. One host sync per call."""
    T, limit = g.shape[2], 2 * FACTOR_LIMIT[g.dtype]
    sizes = [C]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= SUBCHUNK:
        sizes.append(sizes[-1] // 2)
    with torch.no_grad():
        worst = [pad_time(g, -T % c).unflatten(2, (-(-T // c), c)).sum(3).amin() for c in sizes]
        ok = (torch.stack(worst) >= -limit).tolist()
    return next(((c, True) for c, fine in zip(sizes, ok) if fine), (C, False))


def _intra_channel_fast(q: Tensor, k: Tensor, g: Tensor) -> Tensor:
    """Intra-chunk scores A[i, j] = sum_d q_id k_jd exp(b_id - b_jd) for j <= i, zero above, with
    per-channel log-decays. q, k, g [..., C, Dk] (g may broadcast) -> [..., C, C].

    With r = b_{C-1} / 2 (half the chunk's decay, per channel), exp(b_i - b_j) =
    exp(b_i - r) exp(r - b_j) and |b_i - r| <= |b_{C-1}| / 2 <= FACTOR_LIMIT (checked by
    `_channel_chunk`), so both factors stay far from overflow and A is one matmul."""
    half = g.sum(-2, keepdim=True) / 2  # [..., 1, Dk], <= 0
    b = g.cumsum(-2)
    A = (q * (b - half).exp()) @ (k * (half - b).exp()).transpose(-1, -2)
    C = q.shape[-2]
    # j > i entries are exp(+...) and may be huge; they are discarded, never multiplied.
    return A.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=q.device).tril(), 0.0)


def _intra_channel_exact(q: Tensor, k: Tensor, g: Tensor) -> Tensor:
    """`_intra_channel_fast` for any finite decays: no exponent is ever positive (see the module
    docstring: pairwise decays inside sub-chunks, factorised through sub-chunk boundaries between
    them)."""
    C = q.shape[-2]
    c = SUBCHUNK if C % SUBCHUNK == 0 else C
    ns = C // c
    qs, ks, gs = (x.unflatten(-2, (ns, c)) for x in (q, k, g))  # [..., ns, c, Dk]
    # Diagonal sub-blocks: the exact pairwise decay tensor [c, c, Dk].
    A = torch.einsum("...id,...jd,...ijd->...ij", qs, ks, segsum(gs).exp())  # [..., ns, c, c]
    if ns == 1:
        return A.squeeze(-3)
    # Off-diagonal sub-blocks (J < I): decay to/from the sub-chunk boundaries, each factor <= 1.
    qh = qs * gs.cumsum(-2).exp()  # exp(b_i - e_{I-1})
    kh = ks * suffix_sum(gs).exp()  # exp(e_J - b_j)
    tot = gs.sum(-2)  # [..., ns, Dk]: log-decay over each whole sub-chunk
    between = segsum(tot)  # [I, J] = sum_{K=J+1}^{I} tot_K; we need up to I-1: shift one row down
    between = torch.cat([torch.full_like(between[..., :1, :, :], float("-inf")), between[..., :-1, :, :]], dim=-3)
    off = torch.einsum("...Iid,...IJd,...Jjd->...IJij", qh, between.exp(), kh)  # zero for J >= I
    eye = torch.eye(ns, dtype=A.dtype, device=A.device)[:, :, None, None]
    full = off + eye * A.unsqueeze(-3)  # [..., I, J, i, j]
    return full.transpose(-3, -2).reshape(*full.shape[:-4], C, C)


def chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    chunk: int = CHUNK,
    state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form. q, k [B, H, T, Dk], v [B, H, T, Dv], g None / [H] / [B, H, T] /
    [B, H, T, Dk], state [B, H, Dk, Dv] or None -> (o [B, H, T, Dv], state [B, H, Dk, Dv]).
    T need not be a multiple of `chunk`: the tail is zero-padded (k = v = 0, g = 0 leaves S as is).
    Per-channel decays too strong for the fast path at `chunk` run at a shorter chunk (see above)."""
    B, H, T, Dk, Dv = *_shape(q, k, v), v.shape[-1]
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    g = log_decay(g, B, H, T, Dk, cdt)
    S = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if state is None else state.to(cdt)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv, dtype=out_dtype), S
    C, fast = min(chunk, T), False
    if g is not None and g.shape[-1] > 1:
        C, fast = _channel_chunk(g, C)
    N = -(-T // C)
    pad = N * C - T
    # [B, H, N, C, D]
    q, k, v = (pad_time(x.to(cdt), pad).unflatten(2, (N, C)) for x in (q, k, v))
    if scale != 1.0:  # (a pass over q and one back for nothing otherwise)
        q = q * scale

    if g is None:
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        A = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
        qb, kb, decay = q, k, None
    else:
        g = pad_time(g, pad).unflatten(2, (N, C))  # [B|1, H, N, C, 1|Dk]
        if g.shape[-1] == 1:  # (shared q, k: one q k^T [B, 1, N, C, C], each head's mask applied to it)
            A = (q @ k.transpose(-1, -2)) * decay_mask(g.squeeze(-1))
        else:
            A = _intra_channel_fast(q, k, g) if fast else _intra_channel_exact(q, k, g)
        qb = q * g.cumsum(-2).exp()  # exp(b_i): decay from the chunk start to i
        kb = k * suffix_sum(g).exp()  # exp(b_{C-1} - b_j): decay from j to the chunk end
        decay = g.sum(-2).exp().unsqueeze(-1).unbind(2)  # N x [B|1, H, 1|Dk, 1]: decay over a chunk
    o = A @ v
    U = kb.transpose(-1, -2) @ v  # [B, H, N, Dk, Dv]: what each chunk adds to the state

    # The only sequential part: hand the state from chunk to chunk. unbind, not U[:, :, n]: each
    # indexing op would backpropagate a zero-filled copy of all of U (quadratic in N).
    starts = []
    for n, Un in enumerate(U.unbind(2)):
        starts.append(S)
        S = (S if decay is None else S * decay[n]) + Un
    o = o + qb @ torch.stack(starts, dim=2)
    return o.flatten(2, 3)[:, :, :T].to(out_dtype), S


def recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Step form (decoding). Same shapes as `chunked`; one O(Dk Dv) update per step."""
    B, H, T, Dk, Dv = *_shape(q, k, v), v.shape[-1]
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    g = log_decay(g, B, H, T, Dk, cdt)
    S = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if state is None else state.to(cdt)
    q, k, v = q.to(cdt) * scale, k.to(cdt), v.to(cdt)
    decay = None if g is None else g.exp().unsqueeze(-1).unbind(2)  # T x [B|1, H, 1|Dk, 1]
    outs = []
    for t, (qt, kt, vt) in enumerate(zip(q.unbind(2), k.unbind(2), v.unbind(2))):
        if decay is not None:
            S = S * decay[t]
        S = S + kt[..., :, None] * vt[..., None, :]
        outs.append((qt.unsqueeze(-2) @ S).squeeze(-2))  # q_t^T S_t (q_t may broadcast over heads)
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv, dtype=cdt)
    return o.to(out_dtype), S


def naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Reference for tests: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t),
    with the diagonal matrix built explicitly. Same shapes as `chunked`."""
    B, H, T, Dk, Dv = *_shape(q, k, v), v.shape[-1]
    cdt = compute_dtype(q.dtype)
    if g is None:
        gk = torch.zeros(B, H, T, Dk, dtype=cdt, device=q.device)
    elif g.dim() == 1:
        gk = g.to(cdt)[None, :, None, None].expand(B, H, T, Dk)
    elif g.dim() == 3:
        gk = g.to(cdt)[..., None].expand(B, H, T, Dk)
    else:
        gk = g.to(cdt).expand(B, H, T, Dk)
    S = torch.zeros(B, H, Dk, Dv, dtype=cdt, device=q.device) if state is None else state.to(cdt)
    o = []
    for t in range(T):
        S = torch.diag_embed(gk[:, :, t].exp()) @ S + k[:, :, t, :, None].to(cdt) @ v[:, :, t, None, :].to(cdt)
        o.append(S.transpose(-1, -2) @ (scale * q[:, :, t, :, None].to(cdt)))
    o = torch.cat(o, dim=-1).transpose(-1, -2) if o else torch.zeros(B, H, 0, Dv, dtype=cdt, device=q.device)
    return o.to(q.dtype), S

"""Building blocks: norms, MLPs, positions."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w with a hand-written backward: on CPU F.rms_norm is a
    composite of ~6 ops whose autograd graph costs ~2x a LayerNorm (bench/RESULTS.md, issue 16);
    this is 2 reductions (vecdot) and 4 element-wise passes in all, equal to F.rms_norm to float
    rounding (tests/test_model.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        d = x.shape[-1]
        r = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(d).add_(eps))
        xn = x * r
        ctx.save_for_backward(xn, r, weight)
        return xn * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xn, r, weight = ctx.saved_tensors
        d = xn.shape[-1]
        grad_w = (grad * xn).reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        gx = grad * weight
        # dx = r * (g*w - xn * mean(g*w*xn))
        m = torch.linalg.vecdot(gx, xn).unsqueeze(-1).div_(-d)
        return gx.addcmul_(xn, m).mul_(r), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. CPU eager: _RMSNormFn (2x faster than F.rms_norm at the
    default recipe's shape); CUDA and torch.compile: F.rms_norm (a fused kernel / fused by inductor)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and x.dtype == weight.dtype:
        return _RMSNormFn.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


NORM_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}  # each norm's usual epsilon (model.norm_eps: null)


def make_norm(kind: str, d: int, bias: bool, eps: float | None = None) -> nn.Module:
    """LayerNorm or RMSNorm over the last dimension; eps None: the norm's usual (NORM_EPS)."""
    eps = NORM_EPS[kind] if eps is None else eps
    return RMSNorm(d, eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps, bias=bias)


MLPS = ("gelu", "gelu-tanh", "gated-gelu", "swiglu")


def activation(mlp: str):
    """The MLP kind's activation: erf GELU (BERT's), tanh-approximated GELU (GPT-2's gelu_new), SiLU."""
    if mlp == "swiglu":
        return F.silu
    if mlp == "gelu-tanh":
        return _gelu_tanh
    return F.gelu


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def default_d_ff(d_model: int, mlp: str) -> int:
    if mlp in ("gelu", "gelu-tanh"):
        return 4 * d_model
    return 64 * math.ceil(8 * d_model / 3 / 64)  # gated: same parameters as a 4x GELU MLP


class MLP(nn.Module):
    """gelu / gelu-tanh: W2 gelu(W1 x).  gated-gelu / swiglu: W2 (act(W1a x) * W1b x)."""

    def __init__(self, d: int, d_ff: int, kind: str, bias: bool, dropout: float):
        super().__init__()
        self.gated = kind in ("gated-gelu", "swiglu")
        self.act = activation(kind)
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


class _RotateHalf(torch.autograd.Function):
    """The half-split rotation [a, b] -> [a cos - b sin, b cos + a sin] (a, b: the two halves of the
    last dimension); its backward is the inverse rotation (sin -> -sin), so nothing but the tables
    is saved and no strided slices or re-stacking are involved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def _rotate(x, cos, sin, sign: float):
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    oa, ob = out[..., :h], out[..., h:]
    torch.mul(a, cos, out=oa)
    oa.addcmul_(b, sin, value=-sign)
    torch.mul(b, cos, out=ob)
    ob.addcmul_(a, sin, value=sign)
    return out


ROPE_LAYOUTS = ("half", "interleaved")


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer). Channel pairs (i, i + Dh/2) rotate together in the
    "half" layout (GPT-NeoX / Llama's rotate_half), pairs (2i, 2i+1) in the "interleaved" one
    (RoFormer's, lmtk's before issue 16: strided slices and a re-stack, ~2x the cost on CPU).
    The two are the same model up to a permutation of each head's q and k channels
    (rope_permutation), which a linear q/k projection absorbs (convert_rope_layout).

    The cos/sin tables are buffers built once for max_len positions: no state changes inside
    forward, so torch.compile sees a static graph (a lazily filled cache forced a recompile)."""

    def __init__(self, head_dim: int, base: float, max_len: int, layout: str = "interleaved"):
        super().__init__()
        self.layout = layout
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
        """Interleaved layout: x [B, H, T, Dh], cos/sin [T, Dh/2]."""
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def rotate_qk(self, qk, cos, sin):
        """Half layout, q and k at once: qk [B, T, 2, H, Dh] (a view of the qkv projection),
        cos/sin [T, Dh/2]."""
        return _RotateHalf.apply(qk, cos[:, None, None, :], sin[:, None, None, :])


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Channel j of a head in the half layout is channel perm[j] of the interleaved one."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def convert_rope_layout(state_dict: dict, cfg, to: str = "half") -> dict:
    """A copy of a model's state dict with every attention's q and k projection rows permuted
    per head from cfg.rope_layout to `to` (the model's outputs are unchanged: q.k is invariant
    under one permutation of both). Weights of other layers are shared, not copied."""
    if cfg.positions != "rope" or cfg.rope_layout == to:
        return dict(state_dict)
    hd, d = cfg.d_model // cfg.n_heads, cfg.d_model
    n_kv = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
    perm = rope_permutation(hd)
    if to == "interleaved":
        perm = torch.argsort(perm)
    q_rows = (torch.arange(cfg.n_heads)[:, None] * hd + perm).reshape(-1)
    k_rows = d + (torch.arange(n_kv)[:, None] * hd + perm).reshape(-1)  # grouped-query: n_kv heads of keys
    index = torch.cat((q_rows, k_rows, torch.arange(d + n_kv * hd, d + 2 * n_kv * hd)))
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k.endswith("mixer.qkv.weight") or k.endswith("mixer.qkv.bias"):
            out[k] = v[index]
    return out


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., "Train Short, Test Long"): for n heads, n a power of
    two, the geometric sequence m_h = 2^(-8h/n), h = 1..n (n = 8: 1/2, 1/4, ..., 1/256). Otherwise
    the n0 = 2^floor(log2 n) slopes of n0 heads, then the remaining n - n0 heads take every other
    slope of 2 n0 heads (the odd powers, which fall between the first ones), as the paper's code."""

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n0 = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(n0) + geometric(2 * n0)[0::2][: n_heads - n0]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """[H, T, S]: -m_h |i - j| for T queries at the bottom right of S keys (query t is key position
    S - T + t: decoding after a cache). Added to the attention scores, it penalises each key by
    its distance, which needs no position past the training length. The causal mask hides j > i,
    where the symmetric form equals the paper's -m (i - j); bidirectional (masked) reading keeps
    the symmetric form on both sides (the paper defines the causal case only)."""
    i = torch.arange(S - T, S, device=slopes.device)[:, None]
    j = torch.arange(S, device=slopes.device)[None, :]
    return -slopes[:, None, None] * (i - j).abs()

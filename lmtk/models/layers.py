"""Building blocks: norms, MLPs, positions."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w with a hand-written backward: on CPU F.rms_norm is a
    composite of ~6 ops whose autograd graph costs ~2x a LayerNorm (bench/RESULTS.md, issue 16);
    this is 2 reductions, a matrix-vector product and 5 element-wise passes in all, equal to
    F.rms_norm to float rounding (tests/test_model.py)."""

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
        g_xn = grad * xn
        grad_w = g_xn.reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        # dx = r * (g*w - xn * mean(g*w*xn)); sum_j g_j w_j xn_j as a matrix-vector product of
        # g*xn (needed for grad_w anyway) with w, not another pass over g*w
        m = (g_xn @ weight).unsqueeze(-1).div_(-d)
        return (grad * weight).addcmul_(xn, m).mul_(r), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. CPU eager in fp32/fp64: _RMSNormFn (2x faster than F.rms_norm
    at the default recipe's shape); CUDA, torch.compile and half precision: F.rms_norm (a fused kernel /
    fused by inductor / accumulating in fp32, where x^2 summed in fp16 overflows)."""
    if (x.device.type == "cpu" and not torch.compiler.is_compiling() and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.float64)):  # half precision: F.rms_norm's fp32 accumulation
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


class _Gated(torch.autograd.Function):
    """act(a) * b for h = [a, b] (the two halves of a gated MLP's one up projection), with a
    backward that writes both halves' gradients into one buffer: autograd's would chunk-backward
    them into a concatenation, one more pass over [N, 2 d_ff] (bench/RESULTS.md, issue 16)."""

    @staticmethod
    def forward(ctx, h, gelu: bool):
        a, b = h.chunk(2, dim=-1)
        s = F.gelu(a) if gelu else F.silu(a)
        ctx.save_for_backward(h, s)
        ctx.gelu = gelu
        return s * b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, s = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.chunk(2, dim=-1)
        torch.mul(grad, s, out=grad_b)  # d/db = act(a)
        act_backward = torch.ops.aten.gelu_backward if ctx.gelu else torch.ops.aten.silu_backward
        act_backward.grad_input(grad * b, a, grad_input=grad_a)  # d/da = b act'(a)
        return grad_h, None


def gated(h: torch.Tensor, kind: str) -> torch.Tensor:
    """act(a) * b of the halves of h: swiglu (SiLU) or gated-gelu (erf GELU)."""
    if torch.compiler.is_compiling():  # inductor fuses the plain form
        a, b = h.chunk(2, dim=-1)
        return activation(kind)(a) * b
    return _Gated.apply(h, kind == "gated-gelu")


class MLP(nn.Module):
    """gelu / gelu-tanh: W2 gelu(W1 x).  gated-gelu / swiglu: W2 (act(W1a x) * W1b x)."""

    def __init__(self, d: int, d_ff: int, kind: str, bias: bool, dropout: float):
        super().__init__()
        self.kind = kind
        self.gated = kind in ("gated-gelu", "swiglu")
        self.act = activation(kind)
        self.up = nn.Linear(d, d_ff * (2 if self.gated else 1), bias=bias)
        self.down = nn.Linear(d_ff, d, bias=bias)
        self.down.is_residual_out = True
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            h = gated(h, self.kind)
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


class _Rotate(torch.autograd.Function):
    """x [..., T, Dh] rotated in either layout (pairs: channels 2i, 2i+1; else i, i + Dh/2); the
    backward is the inverse rotation (sin -> -sin), so nothing but the tables is saved.
    Grouped-query attention's and recurrent mixers' q and k, each on its own."""

    @staticmethod
    def forward(ctx, x, cos, sin, pairs: bool):
        ctx.save_for_backward(cos, sin)
        ctx.rotate = _rotate_pairs if pairs else _rotate_half
        return ctx.rotate(x, cos, sin, 1.0, _empty_like(x, cos))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return ctx.rotate(grad, cos, sin, -1.0, _empty_like(grad, cos)), None, None, None


def _empty_like(x, table):
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, table.dtype), device=x.device)


def _rotate_half(x, cos, sin, sign: float, out):
    """out = x rotated by +-theta, channel i paired with i + Dh/2 (four ops on the halves)."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    oa, ob = out[..., :h], out[..., h:]
    torch.mul(a, cos, out=oa)
    oa.addcmul_(b, sin, value=-sign)
    torch.mul(b, cos, out=ob)
    ob.addcmul_(a, sin, value=sign)
    return out


def _as_complex(x):
    """[..., Dh] real -> [..., Dh/2] complex view, channels (2i, 2i+1) as one number."""
    x = x.unflatten(-1, (-1, 2))
    # view_as_complex needs the pair dimension at stride 1 and every other stride and the offset
    # even; anything else (a gradient of .sum() is all stride 0, an odd offset) gets a fresh copy
    # (.contiguous() would return an already-contiguous tensor with an odd offset as it is)
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(st % 2 for st in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)
    return torch.view_as_complex(x)


def _rotate_pairs(x, cos, sin, sign: float, out):
    """out = x rotated by +-theta, channels (2i, 2i+1) paired: x_2i + i x_2i+1 times
    e^{+-i theta} is one complex multiply (a single vectorised pass; the real-valued form is
    four ops on strided slices, ~2x the time on CPU: bench/RESULTS.md, issue 16). Complex
    numbers exist for fp32/fp64 only, so bf16/fp16 round-trip through fp32."""
    cis = torch.complex(cos.float(), sin.float() * sign)
    if x.dtype == out.dtype == torch.float32 or x.dtype == out.dtype == torch.float64:
        torch.mul(_as_complex(x), cis.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64),
                  out=_as_complex_out(out))
    else:
        out.copy_(torch.view_as_real(_as_complex(x.float()) * cis).flatten(-2))
    return out


def _as_complex_out(out):
    v = _as_complex(out)
    assert v.data_ptr() == out.data_ptr(), "the output must be viewable as complex"
    return v


class _RotaryQKV(torch.autograd.Function):
    """q and k of a fused [B, T, 3, H, Dh] qkv projection rotated, and v passed through, as one
    op whose backward writes all three gradients into one [B, T, 3, H, Dh] buffer: slicing q, k
    and v out of qkv and rotating q and k separately would cost autograd a zero-filled buffer
    per slice and their sum (bench/RESULTS.md, issue 16). Returns (qk [B, T, 2, H, Dh], v)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, pairs: bool):
        ctx.save_for_backward(cos, sin)
        ctx.rotate = _rotate_pairs if pairs else _rotate_half
        qk = qkv[:, :, :2]
        return ctx.rotate(qk, cos, sin, 1.0, _empty_like(qk, cos)), qkv[:, :, 2]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_qk, grad_v):
        cos, sin = ctx.saved_tensors
        ref = grad_qk if grad_qk is not None else grad_v
        B, T = ref.shape[:2]
        grad = torch.empty((B, T, 3, *ref.shape[-2:]), dtype=ref.dtype, device=ref.device)
        if grad_qk is None:
            grad[:, :, :2].zero_()
        else:
            ctx.rotate(grad_qk, cos, sin, -1.0, grad[:, :, :2])
        if grad_v is None:
            grad[:, :, 2].zero_()
        else:
            grad[:, :, 2].copy_(grad_v)
        return grad, None, None, None


ROPE_LAYOUTS = ("half", "interleaved")


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer). Channel pairs (2i, 2i+1) rotate together in the
    "interleaved" layout (RoFormer's; the default: on CPU one complex multiply), pairs
    (i, i + Dh/2) in the "half" one (GPT-NeoX / Llama's rotate_half: Hugging Face imports).
    The two are the same model up to a permutation of each head's q and k channels
    (rope_permutation), which a linear q/k projection absorbs (convert_rope_layout).

    The cos/sin tables are buffers built once for max_len positions: no state changes inside
    forward, so torch.compile sees a static graph (a lazily filled cache forced a recompile).
    Under torch.compile the rotation is plain tensor arithmetic, which inductor fuses."""

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
        """x [..., T, Dh] (e.g. [B, H, T, Dh]) rotated at T positions; cos/sin [T, Dh/2]."""
        if self.layout == "interleaved" and torch.compiler.is_compiling():
            return _rotate_pairs_plain(x, cos, sin)
        return _Rotate.apply(x, cos, sin, self.layout == "interleaved")

    def rotate_qkv(self, qkv, cos, sin):
        """qkv [B, T, 3, H, Dh] (the fused projection's view) -> (q and k rotated [B, T, 2, H, Dh],
        v [B, T, H, Dh]); cos/sin [T, Dh/2]."""
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        if torch.compiler.is_compiling():
            qk = qkv[:, :, :2]
            qk = _Rotate.apply(qk, cos, sin, False) if self.layout == "half" else _rotate_pairs_plain(qk, cos, sin)
            return qk, qkv[:, :, 2]
        return _RotaryQKV.apply(qkv, cos, sin, self.layout == "interleaved")


def _rotate_pairs_plain(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


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

"""What every recurrent mixer (linear, retnet, gla, hgrn2, metala, mamba2, mlstm, gdn) shares: one
base class, RecurrentMixer, for the causality check, the head split, the optional short causal
convolution on the inputs (with its decoding state), the choice of the op's form, the optional
output gate and the FLOPs of the recurrence; `check_knobs` / `split_heads` / `head_size` for the
Config checks; and the two parametrisations more than one mixer uses (Mamba-2's decay, the gated
per-head RMSNorm).

Which form of the op runs (recurrence.py, delta.py): training and prefill use `chunked` (a prefill
continues from the carried state); decoding a single token (decode=True, T == 1) uses `recurrent`,
one O(Dk Dv) step per head. On CUDA the chunked form may be fla's kernel instead (kernels.py,
model.mixer.kernel); the PyTorch op is the reference and the only path on the CPU."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models.layers import rms_norm
from lmtk.models.mixers import delta, kernels, recurrence


class _CausalConv(torch.autograd.Function):
    """y_t = b + sum_j w_j x_{t+j-(size-1)} over x [B, T, C] (zeros before it; F.conv1d's
    cross-correlation on the left-padded input), w [C, size], then SiLU when `silu`, as size fused
    multiply-adds on time slices. The backward (SiLU's included) runs in blocks of BLOCK steps so
    that each block's gradient is reused from cache by every tap: unblocked, the conv's backward
    was ~16 passes over [T, C] and cost more than the conv (autograd's own backward zero-filled and
    added a full-size buffer per tap, and copied the padded input)."""

    BLOCK = 512

    @staticmethod
    def forward(ctx, x, w, bias, silu: bool):
        T, P = x.shape[1], w.shape[1] - 1
        y = torch.addcmul(bias, x, w[:, P])
        for j in range(P):  # tap j reads x shifted by P - j steps
            s = P - j
            y[:, s:].addcmul_(x[:, :T - s], w[:, j])
        ctx.silu = silu
        ctx.save_for_backward(x, w, y)
        return F.silu(y) if silu else y

    @staticmethod
    def backward(ctx, gout):
        x, w, pre = ctx.saved_tensors
        T, P = x.shape[1], w.shape[1] - 1
        gx, gw, gb = torch.empty_like(x), x.new_zeros(P + 1, x.shape[2]), x.new_zeros(x.shape[2])
        for t0 in range(0, T, _CausalConv.BLOCK):
            t1 = min(T, t0 + _CausalConv.BLOCK)
            n, h = t1 - t0, min(T, t1 + P) - t0  # the block's steps; with the P after it that its x reach
            gy = gout[:, t0:t0 + h]
            if ctx.silu:
                gy = torch.ops.aten.silu_backward(gy, pre[:, t0:t0 + h])
            gxb = torch.mul(gy[:, :n], w[:, P], out=gx[:, t0:t1])
            gb += gy[:, :n].sum((0, 1))
            gw[P] += (gy[:, :n] * x[:, t0:t1]).sum((0, 1))
            for j in range(P):
                s = P - j
                if h - s > 0:  # dx_t += w_j dy_{t+s}
                    gxb[:, :min(n, h - s)].addcmul_(gy[:, s:s + min(n, h - s)], w[:, j])
                lo = max(t0, s)  # dw_j += dy_t x_{t-s}
                if lo < t1:
                    gw[j] += (gy[:, lo - t0:n] * x[:, lo - s:t1 - s]).sum((0, 1))
        return gx, gw.t(), gb, None


class ShortConv(nn.Module):
    """Causal depthwise convolution over time of width `size` (Zoology / Based / Mamba: a short
    convolution on a mixer's inputs helps recall), optionally followed by a SiLU, with its decoding
    state: the last size-1 inputs. x [B, T, C] -> [B, T, C]."""

    def __init__(self, channels: int, size: int, activation: bool = True):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, 1, size))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.activation = activation
        nn.init.normal_(self.weight, 0.0, size ** -0.5)
        self.weight.lmtk_own_init = True  # the model-wide init leaves it alone

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, decode: bool = False):
        """(y, new state [B, size-1, C] when decoding else None)."""
        B, T, C = x.shape
        # y_t = b + sum_j w_j * full_{t+j} (F.conv1d's cross-correlation), full = [state, x], as size
        # fused multiply-adds on [B, T, C] slices (_CausalConv): oneDNN's depthwise conv1d backward is
        # erratic with 2 threads on this CPU (0.2-4 s for [4096, 512], vs ~0.05 s for these), and
        # this keeps the [B, T, C] layout. Without a state the zeros before x are implicit.
        w, bias = self.weight.squeeze(1).to(x.dtype), self.bias.to(x.dtype)  # [C, size], [C]
        full = x if state is None else torch.cat([state, x], dim=1)
        y = _CausalConv.apply(full, w, bias, self.activation)[:, full.shape[1] - T:]
        if not decode:
            return y, None
        if state is None:
            full = torch.cat([x.new_zeros(B, self.size - 1, C), x], dim=1)
        return y, full[:, full.shape[1] - (self.size - 1):]


class Slot:
    """Where a recurrent mixer takes softmax attention's q, k, v or o when distillation copies a
    teacher's attention into it (distill.init=qkv_copy): `heads` x `head_dim` rows of `linear`'s
    output from row `offset` on (q, k, v), or its input columns (o)."""

    def __init__(self, linear: nn.Linear, heads: int, head_dim: int, offset: int = 0):
        self.linear, self.heads, self.head_dim, self.offset = linear, heads, head_dim, offset


class RecurrentMixer(nn.Module):
    """Base of the recurrent mixers. They read left to right only, run an op of recurrence.py or
    delta.py on head-first q, k, v (, beta), g, and carry a decoding state that starts with the op's
    S [B, H, Dk, Dv] and ends with the short conv's state (None without a conv). A subclass sets
    `chunk` and `kernel` (its knobs), `conv` (`short_conv(...)`: one conv over the concatenation of
    its convolved inputs, or None) and `gate` (the output gate's projection of x, or None: no gate,
    or a gate whose input z comes from a fused in-projection, as mamba2's and mlstm's)."""

    causal_only = True  # a recurrence reads left to right: no masked (bidirectional) reading

    chunk: int  # chunk length of the chunked form (model.mixer.chunk)
    kernel: str = "auto"  # model.mixer.kernel: auto | torch | fla (kernels.py)
    # set by every subclass (no class-level defaults: nn.Module keeps submodules in _modules, and a
    # class attribute would shadow them)
    conv: ShortConv | None
    gate: nn.Module | None
    # mamba2, mlstm, gdn, metala: the SiLU after the conv stays when model.mixer.conv=0
    silu_without_conv = False
    @staticmethod
    def attention_knobs(tcfg, knobs: dict) -> dict | None:
        """model.mixer knobs that give this mixer the shapes of the attention of a model of config
        `tcfg` (its heads, head size, key/value heads), so distill.init=qkv_copy can copy q, k, v, o
        into it (`knobs`: the mixer's current ones); None: no setting does."""
        return None

    def attention_slots(self) -> dict[str, Slot] | None:
        """{role: Slot} for the roles among q, k, v, o this mixer has a projection for (a key-free
        mixer has no k); None when none fits (mlstm's block-diagonal q, k, v)."""
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the recurrent mixers shared this base keep loading: their
        per-input convs (convs.0, convs.1, ...: the same taps, one conv per input) become the one
        conv over the concatenated inputs, and metala's / gdn's g_proj, out_proj are now gate, out."""
        old = sorted((k for k in state_dict if k.startswith(prefix + "convs.")), key=lambda k: k[len(prefix):])
        if old and self.conv is not None:
            n = 1 + max(int(k[len(prefix) + 6:].split(".")[0]) for k in old)
            for what in ("weight", "bias"):
                parts = [state_dict.pop(f"{prefix}convs.{i}.{what}") for i in range(n) if f"{prefix}convs.{i}.{what}" in state_dict]
                if parts:
                    state_dict[f"{prefix}conv.{what}"] = torch.cat(parts, dim=0)
        for before, now in (("g_proj.", "gate."), ("out_proj.", "out.")):
            if not hasattr(self, before[:-1]) and hasattr(self, now[:-1]):
                for k in [k for k in state_dict if k.startswith(prefix + before)]:
                    state_dict[prefix + now + k[len(prefix + before):]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_causal(self, causal: bool) -> None:
        if not causal:
            raise ValueError(f"{type(self).__name__} is causal only (a left-to-right recurrence): "
                             "it has no bidirectional reading")

    @staticmethod
    def heads(x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, T, n * D] -> [B, n, T, D]."""
        B, T, _ = x.shape
        return x.view(B, T, n, -1).transpose(1, 2)

    @staticmethod
    def merge(o: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, H * D]."""
        B, H, T, D = o.shape
        return o.transpose(1, 2).reshape(B, T, H * D)

    def convolve(self, xs: list, state, decode: bool) -> tuple[list, torch.Tensor | None]:
        """The inputs xs [B, T, C_i] through the one short conv over their concatenation (decoding:
        continuing from its state) -> (outputs, new conv state). Without a conv (model.mixer.conv=0)
        the inputs unchanged (SiLU'd when `silu_without_conv`) and no state."""
        if self.conv is None:
            return ([F.silu(x) for x in xs] if self.silu_without_conv else list(xs)), None
        y, state = self.conv(xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1), state, decode)
        return list(y.split([x.shape[-1] for x in xs], dim=-1)), state

    def recur(self, q, k, v, g, S, decode: bool, scale: float = 1.0):
        """(o, final state) of S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t)
        (recurrence.py; q and k may be [B, 1, T, Dk], shared by every head): the step form for a
        decoding step of one token, the chunked form otherwise (training, and a prefill continuing
        from the carried state S), fla's chunk kernel there when kernels.py chooses it."""
        if decode and q.shape[2] == 1:
            return recurrence.recurrent(q, k, v, g, state=S, scale=scale)
        if kernels.use_fla(self.kernel, q):
            return kernels.fla_recurrence(q, k, v, g, state=S, scale=scale)
        return recurrence.chunked(q, k, v, g, chunk=self.chunk, state=S, scale=scale)

    def recur_delta(self, q, k, v, beta, g, S, decode: bool, scale: float = 1.0):
        """`recur` for the gated delta rule (delta.py): S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1}
        + beta_t k_t v_t^T."""
        if decode and q.shape[2] == 1:
            return delta.recurrent(q, k, v, beta, g, state=S, scale=scale)
        if kernels.use_fla(self.kernel, q):
            return kernels.fla_delta(q, k, v, beta, g, state=S, scale=scale)
        return delta.chunked(q, k, v, beta, g, chunk=self.chunk, state=S, scale=scale)

    @staticmethod
    def gated(y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The output gate: swish(z) * y, with z the gate's pre-activation (None: no gate, y)."""
        return y if z is None else F.silu(z) * y

    def gated_out(self, y, x, S, conv_state, decode: bool):
        """W_o (swish(x W_g) * y) (the gate when the mixer has one) and the decoding state (S, conv state)."""
        y = self.gated(y, None if self.gate is None else self.gate(x))
        return self.drop(self.out(y)), ((S, conv_state) if decode else None)

    @staticmethod
    def recurrence_flops(H: int, Dk: int, Dv: int, delta_rule: bool = False) -> float:
        """Training FLOPs per token of the recurrence (fwd + bwd = 3 x fwd, as for attention's
        12 H Dh T): per head the state update S += k v^T (2 Dk Dv: a multiply and an add per entry)
        and the readout S^T q (2 Dk Dv), plus the delta rule's prediction S^T k (2 Dk Dv):
        12 H Dk Dv, or 18 H Dk Dv for the delta rule. The decay's elementwise product and the
        chunked form's intra-chunk terms (O(chunk (Dk + Dv)) per token, half of it masked) are not
        counted: like attention's formula this is the recurrence's intrinsic work, not one kernel's."""
        return 3.0 * (6 if delta_rule else 4) * H * Dk * Dv


def short_conv(mixer: str, channels: int, size: int, activation: bool = True) -> ShortConv | None:
    """The short causal conv of `size` taps over `channels` (SiLU after it when `activation`); None
    for size 0 (no conv)."""
    from lmtk.errors import UserError

    if size < 0:
        raise UserError(f"model.mixer.conv={size} for mixer {mixer}: the short convolution's size must be >= 0 (0: none)")
    return ShortConv(channels, size, activation) if size > 0 else None


def check_knobs(mixer: str, chunk: int, conv: int, kernel: str = "auto", **choices) -> None:
    """The knobs every recurrent mixer has (model.mixer.chunk >= 1, model.mixer.conv >= 0,
    model.mixer.kernel auto | torch | fla, fla only where it can run) and `choices`:
    name=(value, allowed values). Raises a one-line UserError."""
    from lmtk.errors import UserError, suggest

    if chunk < 1:
        raise UserError(f"model.mixer.chunk={chunk} for mixer {mixer}: the chunk length must be >= 1 (e.g. 64)")
    if conv < 0:
        raise UserError(f"model.mixer.conv={conv} for mixer {mixer}: the short convolution's size must be >= 0 (0: none)")
    for key, (value, allowed) in {"kernel": (kernel, kernels.KERNELS), **choices}.items():
        if value not in allowed:
            raise UserError(f"model.mixer.{key}={value} is not one of: {', '.join(allowed)}{suggest(str(value), allowed)}")
    kernels.check(kernel, mixer)


def check_state_expand(mixer: str, factor) -> None:
    """model.mixer.state_expand (StateX's state-size factor) is a whole number >= 1."""
    from lmtk.errors import UserError

    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise UserError(f"model.mixer.state_expand={factor} for mixer {mixer}: the state-size factor must be a whole number >= 1")


def split_heads(mixer: str, width: int, n_heads: int, what: str) -> int:
    """Per-head size of a `width`-wide projection over n_heads heads (a UserError if it does not divide)."""
    from lmtk.errors import UserError

    if n_heads < 1 or width < 1 or width % n_heads:
        raise UserError(f"mixer {mixer}: {what} width {width} does not split into {n_heads} heads; "
                        "change model.mixer.n_heads (or the expansion knobs)")
    return width // n_heads


def head_size(mixer: str, width: int, head_dim: int | None, n_heads: int, what: str) -> tuple[int, int]:
    """(number of heads, head dim) of a `width`-channel stream: head_dim None splits it into
    n_heads heads (split_heads); a width the head dim does not divide is a one-line error."""
    from lmtk.errors import UserError

    if head_dim is None:
        return n_heads, split_heads(mixer, width, n_heads, what)
    if head_dim <= 0 or width % head_dim:
        raise UserError(f"mixer {mixer}: {what} width {width} is not a multiple of head_dim {head_dim} "
                        "(set model.mixer.head_dim)")
    return width // head_dim, head_dim


class MambaDecay(nn.Module):
    """Mamba-2's data-dependent scalar decay per head (Dao & Gu 2024), used by mamba2 and gdn:

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
    an optional SiLU gate z (the output gate; None: plain grouped RMSNorm): norm_before_gate (Gated
    DeltaNet): rms(o) * w * silu(z); else (Mamba-2): rms(o * silu(z)) * w."""

    def __init__(self, dim: int, group: int, norm_before_gate: bool = True, eps: float = 1e-6):
        super().__init__()
        self.group, self.norm_before_gate, self.eps = group, norm_before_gate, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if not self.norm_before_gate:
            o = RecurrentMixer.gated(o, z)
        if o.dtype != self.weight.dtype:  # (bf16 o under autocast: normalised without a weight, scaled in fp32)
            o = F.rms_norm(o.unflatten(-1, (-1, self.group)), (self.group,), eps=self.eps).flatten(-2) * self.weight
        elif self.group == o.shape[-1]:  # one group (Mamba-2's); layers.rms_norm: a faster backward on the CPU
            o = rms_norm(o, self.weight, self.eps)
        else:  # per head: normalise each group (unit weight, which takes no gradient), then scale
            o = rms_norm(o.unflatten(-1, (-1, self.group)), o.new_ones(self.group), self.eps).flatten(-2) * self.weight
        return RecurrentMixer.gated(o, z) if self.norm_before_gate else o
